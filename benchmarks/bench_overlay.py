"""Overlay benchmarks (issue 6), each a ratio to a reference measured in the same run.

- Programming N remote peers (static FDB entry + permanent neighbour each, N = 10,000 by
  default, $CNM_BENCH_PEERS) on one host's VXLAN device: cnm's batched fast path
  (native and pure-Python codecs) vs pyroute2, one request at a time.
- Join-to-programmed: from a join on host 1 until the peer's FDB entry is in host 2's
  kernel (etcd write, watch, batch), against the duration of the join call itself.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import time
from pathlib import Path

import pytest

from cnm.control.osl.overlay import OverlayLinks, OverlaySpec, PeerChanges, PeerEntry
from cnm.fastpath import messages as m
from cnm.fastpath import netns, rtnl
from cnm.fastpath.records import neigh_record
from cnm.fastpath.transport import NetlinkSocket

from .bench_common import best_of, record_ratio, settle

pytestmark = pytest.mark.privileged
PEERS = int(os.environ.get("CNM_BENCH_PEERS", "10000"))


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


def test_program_remote_peers(benchmark, tmp_path: Path) -> None:
    peers = _peers(PEERS)
    net_id = "b" * 64
    spec = OverlaySpec(
        net_id, vni=4242, port=4789, vtep=ipaddress.ip_address("198.19.0.1"), mtu=1450
    )
    results: dict[str, float] = {}
    for backend in ("native", "python"):
        links = OverlayLinks(str(tmp_path / backend), backend=backend)
        dev = links.create(spec)
        try:

            def add(links: OverlayLinks = links, dev=dev) -> None:
                links.program(dev, PeerChanges.of(add=peers))

            def clear(links: OverlayLinks = links, dev=dev) -> None:
                links.program(dev, PeerChanges.of(remove=peers))

            results[backend] = best_of(add, rounds=3, setup=clear)
            fdb, neigh = links.programmed(dev)
            assert len(fdb) == PEERS and len(neigh) == PEERS  # really programmed
        finally:
            links.remove(net_id)
        settle()

    links = OverlayLinks(str(tmp_path / "pyroute2"))
    dev = links.create(spec)
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
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    record_ratio(benchmark, f"peers_{PEERS}_native_vs_pyroute2", results["native"], pyroute2)
    record_ratio(benchmark, f"peers_{PEERS}_python_vs_pyroute2", results["python"], pyroute2)
    record_ratio(benchmark, f"peers_{PEERS}_python_vs_native", results["python"], results["native"])


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
