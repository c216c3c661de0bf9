"""Overlay benchmarks (issue 6), each a ratio to a reference measured in the same run.

- Programming N remote peers (static FDB entry + permanent neighbour each, N = 10,000 by
  default, $CNM_BENCH_PEERS) on one host's VXLAN device, adding and deleting: cnm's
  batched fast path (native and pure-Python codecs) vs the same batches sent by a C
  program (benchmarks/peer_floor.c, built here: the kernel floor), best of
  $CNM_BENCH_ROUNDS interleaved rounds (3); pyroute2, one request at a time, once.
  Target: within 1.3x of the C floor.
- Join-to-programmed: from a join on host 1 until the peer's FDB entry is in host 2's
  kernel (etcd write, watch, batch), against the duration of the join call itself.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm import fastpath
from cnm.control.osl.overlay import (
    OverlayDevices,
    OverlayLinks,
    OverlaySpec,
    PeerChanges,
    PeerEntry,
)
from cnm.fastpath import messages as m
from cnm.fastpath import netns, rtnl
from cnm.fastpath.records import neigh_record
from cnm.fastpath.transport import NetlinkSocket

from .bench_common import build_c, c_report, record_ratio, settle

pytestmark = pytest.mark.privileged
PEERS = int(os.environ.get("CNM_BENCH_PEERS", "10000"))
ROUNDS = int(os.environ.get("CNM_BENCH_ROUNDS", "3")) or 1


def _peers(n: int) -> list[PeerEntry]:
    base = int(ipaddress.ip_address("10.128.0.0"))
    return [
        PeerEntry(
            ip=ipaddress.ip_address(base + 2 + i),
            mac=f"02:42:0a:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
            vtep=ipaddress.ip_address(f"198.19.{(i >> 8) & 255}.{i & 255 or 1}"),
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def peer_floor() -> Iterator[str]:
    """benchmarks/peer_floor.c built here: the C floor for peer programming."""
    with tempfile.TemporaryDirectory() as d:
        yield build_c("peer_floor", d)


def _floor_round(binary: str, dev: OverlayDevices) -> tuple[float, float]:
    """One add + delete of every peer by the C program, in the network's namespace."""
    result = c_report([binary, dev.key, str(dev.vxlan), str(PEERS), "1"])
    return float(result["add_s"]), float(result["del_s"])


def _cnm_round(
    links: OverlayLinks, dev: OverlayDevices, peers: list[PeerEntry]
) -> tuple[float, float]:
    t0 = time.perf_counter()
    links.program(dev, PeerChanges.of(add=peers))
    t1 = time.perf_counter()
    links.program(dev, PeerChanges.of(remove=peers))
    return t1 - t0, time.perf_counter() - t1


def test_program_remote_peers(benchmark, peer_floor: str, tmp_path: Path) -> None:
    """Add and delete of N peers: cnm (native and python codecs) against the C floor,
    interleaved rounds on a settled machine, best of each; pyroute2 once (adds only)."""
    peers = _peers(PEERS)
    net_id = "b" * 64
    vnis = itertools.count(4242)  # a fresh VNI each time: a deleted namespace dies late

    def spec() -> OverlaySpec:
        vtep = ipaddress.ip_address("198.19.0.1")
        return OverlaySpec(net_id, vni=next(vnis), port=4789, vtep=vtep, mtu=1450)

    variants = ["floor", "python"]
    if fastpath.native_available():
        variants.insert(1, "native")
    adds: dict[str, list[float]] = {v: [] for v in variants}
    dels: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(ROUNDS):
        for variant in variants:
            backend = "python" if variant == "floor" else variant
            links = OverlayLinks(str(tmp_path / variant), backend=backend)
            dev = links.create(spec())
            try:
                settle()
                if variant == "floor":
                    add, delete = _floor_round(peer_floor, dev)
                else:
                    add, delete = _cnm_round(links, dev, peers)
                adds[variant].append(add)
                dels[variant].append(delete)
                fdb, neigh = links.programmed(dev)
                assert not fdb and not neigh  # the deletions really removed everything
                # ... and the additions really programmed every entry.
                if variant == "floor":
                    subprocess.run(
                        [peer_floor, dev.key, str(dev.vxlan), str(PEERS), "0", "keep"],
                        check=True,
                        capture_output=True,
                    )
                else:
                    links.program(dev, PeerChanges.of(add=peers))
                fdb, neigh = links.programmed(dev)
                assert len(fdb) == PEERS and len(neigh) == PEERS, variant
                assert (peers[-1].mac, peers[-1].vtep) in fdb
                assert (peers[-1].ip, peers[-1].mac) in neigh
            finally:
                links.remove(net_id)

    settle()
    links = OverlayLinks(str(tmp_path / "pyroute2"))
    dev = links.create(spec())
    try:

        def one_at_a_time() -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:  # opened inside the network's namespace (worker thread)
                for p in peers:
                    ipr.fdb("add", ifindex=dev.vxlan, lladdr=p.mac, dst=str(p.vtep))
                    ipr.neigh(
                        "add", ifindex=dev.vxlan, dst=str(p.ip), lladdr=p.mac, state=m.NUD_PERMANENT
                    )

        t0 = time.perf_counter()
        netns.run_in(dev.key, one_at_a_time)
        pyroute2 = time.perf_counter() - t0
        fdb, neigh = links.programmed(dev)
        assert len(fdb) == PEERS and len(neigh) == PEERS
    finally:
        links.remove(net_id)

    benchmark.extra_info["peers"] = PEERS
    benchmark.extra_info["rounds"] = ROUNDS
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    floor_add, floor_del = min(adds["floor"]), min(dels["floor"])
    for variant in variants[1:]:
        record_ratio(
            benchmark, f"peers_{PEERS}_add_{variant}_vs_c_floor", min(adds[variant]), floor_add
        )
        record_ratio(
            benchmark, f"peers_{PEERS}_del_{variant}_vs_c_floor", min(dels[variant]), floor_del
        )
    record_ratio(benchmark, f"peers_{PEERS}_add_pyroute2_vs_c_floor", pyroute2, floor_add)
    for name, values in (("add", adds), ("del", dels)):
        for variant in variants:
            benchmark.extra_info[f"us_per_peer_{name}_{variant}"] = round(
                min(values[variant]) / PEERS * 1e6, 2
            )


@pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")
def test_join_to_programmed_latency(benchmark, tmp_path: Path) -> None:
    from tests.e2e.overlay_rig import Rig

    rounds = int(os.environ.get("CNM_BENCH_ROUNDS", "20")) or 1
    rig = Rig(tmp_path, hosts=2).start()
    try:
        h1, h2 = rig.host(1), rig.host(2)
        h1.call("create_network", name="lat")
        h2.call("create_endpoints", net="lat", names=["anchor"])
        h2.call("join_many", items=[["lat", "anchor", "c-anchor"]])
        ovl = h2.call("overlay_key", name="lat")
        sock = NetlinkSocket(ovl)
        names = [f"e{i}" for i in range(rounds)]
        eps = {e["name"]: e for e in h1.call("create_endpoints", net="lat", names=names)}
        joins, programmed = [], []
        for name in names:
            mac = eps[name]["mac"]
            t0 = time.perf_counter()
            h1.call("join_many", items=[["lat", name, f"c-{name}"]])
            t1 = time.perf_counter()
            while not any(
                r.lladdr == mac
                for r in map(neigh_record, sock.dump(rtnl.dump_neighbours(m.AF_BRIDGE)))
            ):
                if time.perf_counter() - t0 > 10:
                    raise AssertionError(f"{name} was never programmed on host 2")
                time.sleep(0.0005)
            programmed.append(time.perf_counter() - t0)
            joins.append(t1 - t0)
        sock.close()
    finally:
        rig.close()
    programmed.sort()
    joins.sort()
    benchmark.extra_info["rounds"] = rounds
    benchmark.extra_info["join_to_programmed_p50_s"] = round(programmed[len(programmed) // 2], 6)
    benchmark.extra_info["join_to_programmed_max_s"] = round(programmed[-1], 6)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    record_ratio(
        benchmark,
        "join_to_remote_programmed_p50_vs_join_p50",
        programmed[len(programmed) // 2],
        joins[len(joins) // 2],
    )
