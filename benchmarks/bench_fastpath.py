"""The netlink fast path: codec speed and bulk attach, against same-run references.

- Codec: encode + decode of a 10,000-message batch (the messages of 2,500 container
  attaches), native vs pure Python. Target: native at least 5x faster.
- Bulk attach of N containers (default 500, CNM_BENCH_CONTAINERS overrides) into
  pre-made namespaces on one bridge: cnm's fast path (native and python codecs) vs a C
  program doing the same batched raw-rtnetlink attach (benchmarks/attach_floor.c, built
  here: the kernel floor) vs pyroute2 one message at a time. Target: within 1.3x of the
  C floor. Each variant gets fresh namespaces and a fresh bridge, since attach cost grows
  with the bridge's size.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cnm import fastpath
from cnm.fastpath import _pycodec, bulk, netns, records, rtnl
from cnm.fastpath.transport import socket_for

from .bench_common import c_report, record_ratio, settle, timed

pytestmark = pytest.mark.privileged

N = int(os.environ.get("CNM_BENCH_CONTAINERS", "500"))
ROUNDS = int(os.environ.get("CNM_BENCH_ROUNDS", "3"))
REQUIRE_NATIVE = os.environ.get("CNM_REQUIRE_NATIVE") == "1"


def _native_or_skip() -> None:
    if not fastpath.native_available():
        if REQUIRE_NATIVE:
            pytest.fail("CNM_REQUIRE_NATIVE=1 but the native codec is not built")
        pytest.skip("the native codec is not built")


def attach_messages(containers: int) -> list:
    """The messages of `containers` attaches: veth, address, link up, default route."""
    msgs = []
    gw = ipaddress.ip_address("10.9.0.1")
    for i in range(containers):
        msgs.append(
            rtnl.veth(
                rtnl.VethSpec(
                    f"veth{i:05d}",
                    "eth0",
                    10 + i % 100,
                    master=3,
                    group=7,
                    mac="02:42:0a:09:00:02",
                )
            )
        )
        msgs.append(rtnl.addr_add(2, ipaddress.ip_interface(f"10.9.{i >> 8}.{i & 255}/16")))
        msgs.append(rtnl.link_set(2, up=True))
        msgs.append(rtnl.route_add(bulk.DEFAULT_V4, gateway=gw, oif=2))
    return [msg._replace(seq=k + 1) for k, msg in enumerate(msgs)]


def _codec_round(codec, rounds: int = 9) -> float:  # type: ignore[no-untyped-def]
    batch = attach_messages(2500)
    best = float("inf")
    for _ in range(rounds):
        gc.collect()  # no collector debt carried from one round into the next
        t0 = time.perf_counter()
        codec.decode(codec.encode(batch))
        best = min(best, time.perf_counter() - t0)
    return best


def test_codec_10000_messages(benchmark) -> None:
    _native_or_skip()
    from cnm.fastpath import _codec

    batch = attach_messages(2500)
    assert _codec.encode(batch) == _pycodec.encode(batch)
    settle()
    times: list[float] = []
    benchmark.pedantic(
        timed(lambda: _codec.decode(_codec.encode(batch)), times), rounds=5, iterations=1
    )
    settle()
    python = _codec_round(_pycodec)
    native = min(min(times), _codec_round(_codec))
    # The ratio is reported (python / native), not asserted: speed is never a test verdict.
    record_ratio(benchmark, "codec_native_vs_python", python, native)


# --- bulk attach --------------------------------------------------------------------------


class Rig:
    """Fresh namespaces and a fresh bridge for one variant; all removed afterwards."""

    def __init__(self, root: str, tag: str, count: int) -> None:
        self.paths = [os.path.join(root, f"{tag}{i}") for i in range(count)]
        errs = [e for e in netns.create_many(self.paths) if e is not None]
        assert not errs, errs[:3]
        self.host = socket_for(None)
        self.bridge_name = f"br{tag}"
        self.host.request(rtnl.bridge(self.bridge_name))
        links = map(records.link_record, self.host.dump(rtnl.dump_links()))
        self.bridge = next(link.index for link in links if link.name == self.bridge_name)
        self.group = 100 + sum(map(ord, tag))

    def check(self, sample: int = 3) -> None:
        """Independent oracle: the sandboxes have eth0 up with an address and a default route."""
        for path in self.paths[:: max(1, len(self.paths) // sample)]:
            out = subprocess.run(
                ["nsenter", f"--net={path}", "ip", "-j", "route"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert any(
                r.get("dst") == "default" and r.get("dev") == "eth0" for r in json.loads(out)
            ), out

    def close(self) -> None:
        links = map(records.link_record, self.host.dump(rtnl.dump_links()))
        if any(link.master == self.bridge for link in links):
            bulk.delete_group(self.group, host=self.host)
        self.host.request(rtnl.link_del(self.bridge))
        for p in self.paths:
            netns.delete(p)


def run_cnm(root: str, backend: str, count: int) -> float:
    rig = Rig(root, backend[:2], count)
    try:
        net = ipaddress.ip_network("10.44.0.0/16")
        hosts = net.hosts()
        gw = next(hosts)
        items = [
            bulk.Attachment(
                p,
                f"vc{backend[:2]}{i}",
                master=rig.bridge,
                group=rig.group,
                addresses=(ipaddress.ip_interface(f"{next(hosts)}/16"),),
                gateway=gw,
            )
            for i, p in enumerate(rig.paths)
        ]
        t0 = time.perf_counter()
        result = bulk.attach(items, backend=backend)
        elapsed = time.perf_counter() - t0
        assert result.ok, list(result.errors.items())[:3]
        rig.check()
        return elapsed
    finally:
        rig.close()


def run_floor(root: str, binary: str, count: int) -> float:
    rig = Rig(root, "fl", count)
    try:
        result = c_report([binary, "batch", str(rig.bridge), str(rig.group), "45", *rig.paths])
        rig.check()
        return float(result["attach_s"])
    finally:
        rig.close()


def run_pyroute2(root: str, count: int) -> float:
    from pyroute2 import IPRoute, NetNS

    rig = Rig(root, "pr", count)
    ipr = IPRoute()
    try:
        t0 = time.perf_counter()
        for i, path in enumerate(rig.paths):
            fd = os.open(path, os.O_RDONLY)
            try:
                ipr.link(
                    "add",
                    ifname=f"vp{i}",
                    kind="veth",
                    group=rig.group,
                    peer={"ifname": "eth0", "net_ns_fd": fd},
                )
            finally:
                os.close(fd)
            idx = ipr.link_lookup(ifname=f"vp{i}")[0]
            ipr.link("set", index=idx, master=rig.bridge)
            ipr.link("set", index=idx, state="up")
            with NetNS(path) as ns:
                eth0 = ns.link_lookup(ifname="eth0")[0]
                ns.addr(
                    "add", index=eth0, address=f"10.46.{(i + 2) >> 8}.{(i + 2) & 255}", prefixlen=16
                )
                ns.link("set", index=eth0, state="up")
                ns.route("add", dst="default", gateway="10.46.0.1")
        elapsed = time.perf_counter() - t0
        rig.check()
        return elapsed
    finally:
        ipr.close()
        rig.close()


def test_bulk_attach(benchmark, floor_binary: str, tmp_path: Path) -> None:
    """Interleaved rounds (floor, cnm native, cnm python), each on a settled machine;
    the best of each is compared. pyroute2, 10x slower, runs once."""
    root = str(tmp_path)
    backend = "native" if fastpath.native_available() else "python"
    if REQUIRE_NATIVE:
        _native_or_skip()
    floor: list[float] = []
    ours: list[float] = []
    python: list[float] = []
    for rnd in range(ROUNDS):
        settle()
        floor.append(run_floor(root, floor_binary, N))
        settle()
        if rnd == 0:
            benchmark.pedantic(
                lambda: ours.append(run_cnm(root, backend, N)), rounds=1, iterations=1
            )
        else:
            ours.append(run_cnm(root, backend, N))
        settle()
        python.append(run_cnm(root, "python", N))
    settle()
    pyroute2 = run_pyroute2(root, N)
    reference = min(floor)
    benchmark.extra_info["containers"] = N
    record_ratio(benchmark, f"attach_{N}_{backend}_vs_c_floor", min(ours), reference)
    record_ratio(benchmark, f"attach_{N}_python_vs_c_floor", min(python), reference)
    record_ratio(benchmark, f"attach_{N}_pyroute2_vs_c_floor", pyroute2, reference)
