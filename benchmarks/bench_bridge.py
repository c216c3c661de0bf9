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
The bulk test runs K rounds of both variants (the floors, then cnm, in even rounds; the
other way round in odd ones), on fresh namespaces and a fresh network each round, waiting
for an idle machine between variants; its ratios are of the medians, each round's times are
kept in extra_info.
N = CNM_BENCH_CONTAINERS (default 500); the sequential test uses N // 5.
K = CNM_BENCH_BULK_ROUNDS (default 3, at least 1).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cnm.control import Endpoint, IPAMConfig, NetworkController
from cnm.control.bench import Progress, bench_cni
from cnm.fastpath import bulk, netns, records, rtnl
from cnm.fastpath.transport import socket_for

from .bench_common import c_report, record_ratio, settle, timed

pytestmark = pytest.mark.privileged

N = int(os.environ.get("CNM_BENCH_CONTAINERS", "500"))
SEQ = max(5, N // 5)
CHUNKS = 5  # the sequential floor and cnm take turns, SEQ // CHUNKS joins each
BULK_ROUNDS = max(1, int(os.environ.get("CNM_BENCH_BULK_ROUNDS", "3")))


def _bridge(name: str) -> int:
    host = socket_for(None)
    host.request(rtnl.bridge(name))
    links = map(records.link_record, host.dump(rtnl.dump_links()))
    return next(link.index for link in links if link.name == name)


def _floor_create(binary: str, paths: list[str], tag: str, group: int) -> float:
    """The C floor's batched attach with namespace creation (`create` mode) on `paths`,
    then its teardown (the group deleted, the namespaces unmounted): the attach time."""
    bridge = _bridge(f"brf{tag}")
    try:
        return _run_floor(binary, "create", bridge, group, paths)["attach_s"]
    finally:
        bulk.delete_group(group)
        socket_for(None).request(rtnl.link_del(bridge))
        for p in paths:
            netns.delete(p)


def _floor_group_delete(binary: str, paths: list[str], tag: str, group: int) -> float:
    """The group-delete floor: a batched attach on new namespaces `paths` (untimed), then
    one message for the group and the namespaces unmounted (the kernel's own batching of
    device teardown): the time of that teardown."""
    bridge = _bridge(f"brf{tag}")
    attached = False
    try:
        assert not any(netns.create_many(paths))
        _run_floor(binary, "batch", bridge, group, paths, octet=47)
        attached = True
        settle()
        t0 = time.perf_counter()
        bulk.delete_group(group)
        for p in paths:
            netns.delete(p)
        return time.perf_counter() - t0
    finally:
        if not attached:
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


def _cnm_bulk(
    ctl: NetworkController, r: int, join: Callable[[list[tuple[Endpoint, str]]], object]
) -> float:
    """One round of cnm's bulk path: N endpoints on a new network (untimed), `join` runs
    join_many of them to N new containers (and times itself), then leave_many + delete
    of the endpoints, timed, and the network deleted: the leave + delete time."""
    net = ctl.create_network(f"bulk{r}", ipv4=[IPAMConfig(subnet=f"10.{211 + r % 16}.0.0/16")])
    eps = net.create_endpoints([f"e{i}" for i in range(N)])
    pairs = [(ep, f"c{r}-{i}") for i, ep in enumerate(eps)]
    join(pairs)
    settle()
    t0 = time.perf_counter()
    ctl.leave_many(pairs)
    ctl.delete_endpoints(eps)
    left = time.perf_counter() - t0
    net.delete()
    return left


def test_join_many_and_leave_many(
    benchmark, floor_binary: str, tmp_path: Path, run_root: Path
) -> None:
    floor_attach: list[float] = []
    floor_detach: list[float] = []
    joined: list[float] = []
    left: list[float] = []

    def floor(r: int) -> None:
        paths = [str(run_root / f"b{r}-{i}") for i in range(N)]
        floor_attach.append(_floor_create(floor_binary, paths, f"b{r}", 3500 + r))
        settle()
        paths = [str(run_root / f"d{r}-{i}") for i in range(N)]
        floor_detach.append(_floor_group_delete(floor_binary, paths, f"d{r}", 4001 + r))

    def cnm(r: int) -> None:
        with _controller(tmp_path, run_root, f"bulk{r}") as ctl:
            run = timed(ctl.join_many, joined)
            if joined:
                left.append(_cnm_bulk(ctl, r, run))
            else:  # pytest-benchmark wants one pedantic call: the first join_many
                left.append(
                    _cnm_bulk(
                        ctl,
                        r,
                        lambda pairs: benchmark.pedantic(
                            run, args=(pairs,), rounds=1, iterations=1
                        ),
                    )
                )

    for r in range(BULK_ROUNDS):
        # Floor first in even rounds, cnm first in odd ones: drift lands on both.
        for variant in (floor, cnm) if r % 2 == 0 else (cnm, floor):
            settle()
            variant(r)
    settle()
    extra = benchmark.extra_info
    extra["containers"] = N
    extra["bulk_rounds"] = BULK_ROUNDS
    rounds = {
        f"join_many_{N}_each_s": joined,
        f"c_floor_with_netns_{N}_each_s": floor_attach,
        f"leave_many_delete_{N}_each_s": left,
        f"group_delete_floor_{N}_each_s": floor_detach,
    }
    for key, times in rounds.items():
        extra[key] = [round(t, 6) for t in times]
        print(f"\n{key}: " + ", ".join(f"{t * 1000:.1f}" for t in times) + " ms")
    record_ratio(
        benchmark,
        f"join_many_{N}_vs_c_floor_with_netns",
        statistics.median(joined),
        statistics.median(floor_attach),
    )
    record_ratio(
        benchmark,
        f"leave_many_delete_{N}_vs_group_delete_floor",
        statistics.median(left),
        statistics.median(floor_detach),
    )
