"""The bridge driver's joins and leaves against the kernel floor and the CNI plugin.

Targets from ../shared/spec/performance.md, reported as ratios to references measured in
the same run (never asserted):
- sequential join of a pre-made sandbox: cnm's p50 vs the C floor's (one container per
  round trip, benchmarks/attach_floor.c `sequential`), the two alternating in chunks so a
  slow spell of the shared machine lands on both, and the CNI bridge plugin's p50;
- join_many of N containers, sandboxes included, vs the C batched floor with namespace
  creation (`create` mode);
- leave_many + delete of N vs the group-delete floor (one RTM_DELLINK for the group, then
  the namespaces unmounted).
N = CNM_BENCH_CONTAINERS (default 500); the sequential test uses N // 5.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest

from cnm.control import IPAMConfig, NetworkController
from cnm.control.bench import Progress, bench_cni
from cnm.fastpath import bulk, netns, records, rtnl
from cnm.fastpath.transport import socket_for

from .bench_common import c_report, record_ratio, settle

pytestmark = pytest.mark.privileged

N = int(os.environ.get("CNM_BENCH_CONTAINERS", "500"))
SEQ = max(5, N // 5)
CHUNKS = 5  # the sequential floor and cnm take turns, SEQ // CHUNKS joins each


def _bridge(name: str) -> int:
    host = socket_for(None)
    host.request(rtnl.bridge(name))
    links = map(records.link_record, host.dump(rtnl.dump_links()))
    return next(link.index for link in links if link.name == name)


def _floor(binary: str, mode: str, paths: list[str], tag: str) -> dict:
    bridge = _bridge(f"brf{tag}")
    group = 3000 + len(tag) + sum(map(ord, tag))
    try:
        if mode != "create":
            assert not any(netns.create_many(paths))
        return {**_run_floor(binary, mode, bridge, group, paths), "group": group}
    finally:
        bulk.delete_group(group)
        socket_for(None).request(rtnl.link_del(bridge))
        for p in paths:
            netns.delete(p)


def _controller(state: Path, run: Path, tag: str) -> NetworkController:
    # Like for like: the C floor and the CNI plugin attach no BPF program, so neither does
    # cnm here (what the BPF data path adds to a join is measured in bench_ebpf.py).
    return NetworkController(
        state_dir=str(state / f"state-{tag}"), run_dir=str(run / f"run-{tag}"), ebpf="off"
    )


def _run_floor(
    binary: str, mode: str, bridge: int, group: int, paths: list[str], octet: int = 46
) -> dict:
    """attach_floor.c in `mode` on `paths`, host ends on `bridge` in `group`, addresses in
    10.<octet>/16: its report."""
    return c_report([binary, mode, str(bridge), str(group), str(octet), *paths])


def _floor_times(binary: str, bridge: int, group: int, paths: list[str]) -> list[float]:
    """The C floor's sequential attach of the (existing) namespaces `paths`, on `bridge`
    with its host ends in `group`: each container's time, in seconds."""
    return [t / 1000 for t in _run_floor(binary, "sequential", bridge, group, paths)["each_ms"]]


def test_sequential_join(benchmark, floor_binary: str, tmp_path: Path, run_root: Path) -> None:
    settle()
    paths = [str(run_root / f"s{i}") for i in range(SEQ)]
    groups = [3100 + k for k in range(CHUNKS)]
    bridge = _bridge("brfseq")
    floor: list[float] = []
    times: list[float] = []
    try:
        assert not any(netns.create_many(paths))
        with _controller(tmp_path, run_root, "seq") as ctl:
            net = ctl.create_network("seq", ipv4=[IPAMConfig(subnet="10.210.0.0/16")])
            eps = net.create_endpoints([f"e{i}" for i in range(SEQ)])
            sbs = [ctl.create_sandbox(f"c{i}") for i in range(SEQ)]
            settle()

            def joins() -> None:
                size = -(-SEQ // CHUNKS)
                for k, group in enumerate(groups):
                    part = slice(k * size, (k + 1) * size)
                    if not paths[part]:
                        break
                    floor.extend(_floor_times(floor_binary, bridge, group, paths[part]))
                    for ep, sb in zip(eps[part], sbs[part], strict=True):
                        t0 = time.perf_counter()
                        ep.join(sb)
                        times.append(time.perf_counter() - t0)

            benchmark.pedantic(joins, rounds=1, iterations=1)
            ctl.leave_many(list(zip(eps, sbs, strict=True)))
            for sb in sbs:
                sb.delete()
            ctl.delete_endpoints(eps)
            net.delete()
    finally:
        for group in groups:
            bulk.delete_group(group)
        socket_for(None).request(rtnl.link_del(bridge))
        for p in paths:
            netns.delete(p)
    settle()
    cni = bench_cni(str(run_root), SEQ, Progress(False))
    ours = statistics.median(times)
    benchmark.extra_info["containers"] = SEQ
    record_ratio(benchmark, "join_p50_vs_c_floor", ours, statistics.median(floor))
    if cni.join_p50_ms is not None:
        record_ratio(benchmark, "cni_join_p50_vs_cnm", cni.join_p50_ms / 1000, ours)


def test_join_many_and_leave_many(
    benchmark, floor_binary: str, tmp_path: Path, run_root: Path
) -> None:
    settle()
    floor_attach = _floor(
        floor_binary, "create", [str(run_root / f"b{i}") for i in range(N)], "bulk"
    )["attach_s"]
    # The group-delete floor: a batched attach, then one message for the group and the
    # namespaces unmounted (the kernel's own batching of device teardown).
    settle()
    paths = [str(run_root / f"d{i}") for i in range(N)]
    bridge = _bridge("brfdel")
    assert not any(netns.create_many(paths))
    _run_floor(floor_binary, "batch", bridge, 4001, paths, octet=47)
    settle()
    t0 = time.perf_counter()
    bulk.delete_group(4001)
    for p in paths:
        netns.delete(p)
    floor_detach = time.perf_counter() - t0
    socket_for(None).request(rtnl.link_del(bridge))
    settle()

    with _controller(tmp_path, run_root, "bulk") as ctl:
        net = ctl.create_network("bulk", ipv4=[IPAMConfig(subnet="10.211.0.0/16")])
        eps = net.create_endpoints([f"e{i}" for i in range(N)])
        pairs = [(ep, f"c{i}") for i, ep in enumerate(eps)]
        joined: list[float] = []

        def join_all() -> None:
            t0 = time.perf_counter()
            ctl.join_many(pairs)
            joined.append(time.perf_counter() - t0)

        benchmark.pedantic(join_all, rounds=1, iterations=1)
        settle()
        t0 = time.perf_counter()
        ctl.leave_many(pairs)
        ctl.delete_endpoints(eps)
        left = time.perf_counter() - t0
        net.delete()
    benchmark.extra_info["containers"] = N
    record_ratio(benchmark, f"join_many_{N}_vs_c_floor_with_netns", joined[0], floor_attach)
    record_ratio(benchmark, f"leave_many_delete_{N}_vs_group_delete_floor", left, floor_detach)
