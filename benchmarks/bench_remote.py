"""The cost of the remote plugin protocol: a join through cnm's own plugin server.

Measured (sequential joins of pre-made sandboxes, one container per call, p50):
- remote: controller -> RemoteDriver -> HTTP over a unix socket -> `cnm plugin serve`
  (a child process: its bridge driver makes the veth pair and leaves the container end
  on the host) -> back to the controller, which moves the interface into the sandbox,
  names, addresses and routes it;
- reference, same run: the same join on an in-process bridge network (the bridge driver
  makes the container end directly inside the sandbox under its final name).
The ratio is recorded (never asserted) and the overhead printed in ms, split into the
time spent in plugin calls during a join (Join, ProgramExternalConnectivity: the
protocol hop plus the plugin's own work) and the rest (mostly the kernel moving the
container end from the host into the sandbox, which the protocol requires: `SrcName`
is a host interface; the in-process bridge creates it in the sandbox instead). The floor
of one plugin call is printed too: the p50 of EndpointOperInfo, which reaches the
plugin's controller and does no kernel work.

N = CNM_BENCH_CONTAINERS (default 500); each variant joins N // 5 containers per round,
CNM_BENCH_ROUNDS rounds (default 3), alternating the variants. Sandbox keys and runtime
files are on tmpfs (`run_root`), the stores on disk, as on a real host.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cnm.control import IPAMConfig, NetworkController
from tests.plugin_process import CnmPlugin

from .bench_common import record_ratio, settle

pytestmark = pytest.mark.privileged

N = int(os.environ.get("CNM_BENCH_CONTAINERS", "500"))
ROUNDS = max(1, int(os.environ.get("CNM_BENCH_ROUNDS", "3")))
SEQ = max(5, N // 5)


def _round(ctl: NetworkController, eps: list, tag: str, sink: list[float]) -> None:
    """One round: SEQ sandboxes made (untimed), each endpoint joined to one (timed),
    then everything left and deleted (untimed)."""
    sbs = [ctl.create_sandbox(f"{tag}{i}") for i in range(len(eps))]
    for ep, sb in zip(eps, sbs, strict=True):
        t0 = time.perf_counter()
        ep.join(sb)
        sink.append(time.perf_counter() - t0)
    ctl.leave_many(list(zip(eps, sbs, strict=True)))
    for sb in sbs:
        sb.delete()


def test_sequential_join_through_the_plugin(benchmark, tmp_path: Path, run_root: Path) -> None:
    pdir = run_root / "plugins"
    pdir.mkdir()
    base = tmp_path / "plugin"
    base.mkdir()
    plugin = CnmPlugin(base, pdir)
    plugin.run = run_root / "plugin-run"  # the plugin's runtime files on tmpfs too
    plugin.start()
    remote_times: list[float] = []
    bridge_times: list[float] = []
    call_times: list[float] = []
    in_calls: list[float] = []  # time inside plugin calls, per remote join
    try:
        with (
            NetworkController(
                state_dir=str(tmp_path / "state-remote"),
                run_dir=str(run_root / "run-remote"),
                plugin_dirs=[str(pdir)],
            ) as rctl,
            NetworkController(
                state_dir=str(tmp_path / "state-bridge"), run_dir=str(run_root / "run-bridge")
            ) as bctl,
        ):
            rnet = rctl.create_network(
                "rem", driver="cnm", ipam_driver="cnm", ipv4=[IPAMConfig(subnet="10.212.0.0/16")]
            )
            bnet = bctl.create_network("loc", ipv4=[IPAMConfig(subnet="10.213.0.0/16")])
            reps = rnet.create_endpoints([f"e{i}" for i in range(SEQ)])
            beps = bnet.create_endpoints([f"e{i}" for i in range(SEQ)])

            # The floor of one protocol hop: a call that does no kernel work.
            driver = rctl.registry.get("cnm")
            for ep in reps:
                t0 = time.perf_counter()
                driver.endpoint_oper_info(rnet.id, ep.id)
                call_times.append(time.perf_counter() - t0)

            # Time spent inside plugin calls during the remote joins (the client's own
            # method, wrapped: one perf_counter pair per call).
            client, per_join = driver.client, [0.0]
            real_call = client.call

            def timed_call(*args: object, **kwargs: object) -> object:
                t0 = time.perf_counter()
                try:
                    return real_call(*args, **kwargs)
                finally:
                    per_join[0] += time.perf_counter() - t0

            def remote_round(r: int) -> None:
                client.call = timed_call  # type: ignore[method-assign]
                try:
                    mark = len(remote_times)
                    sbs = [rctl.create_sandbox(f"r{r}-{i}") for i in range(len(reps))]
                    for ep, sb in zip(reps, sbs, strict=True):
                        per_join[0] = 0.0
                        t0 = time.perf_counter()
                        ep.join(sb)
                        remote_times.append(time.perf_counter() - t0)
                        in_calls.append(per_join[0])
                    assert len(remote_times) - mark == len(reps)
                finally:
                    client.call = real_call  # type: ignore[method-assign]
                rctl.leave_many(list(zip(reps, sbs, strict=True)))
                for sb in sbs:
                    sb.delete()

            rounds: list[tuple[str, Callable[[], None]]] = []
            for r in range(ROUNDS):
                rounds.append(("bridge", lambda r=r: _round(bctl, beps, f"b{r}-", bridge_times)))
                rounds.append(("remote", lambda r=r: remote_round(r)))
            first_remote = next(fn for kind, fn in rounds if kind == "remote")
            for _kind, fn in rounds:
                settle()
                if fn is first_remote:
                    benchmark.pedantic(fn, rounds=1, iterations=1)
                else:
                    fn()

            rctl.delete_endpoints(reps)
            bctl.delete_endpoints(beps)
            rnet.delete()
            bnet.delete()
    finally:
        plugin.stop()
    remote = statistics.median(remote_times)
    bridge = statistics.median(bridge_times)
    call = statistics.median(call_times)
    calls = statistics.median(in_calls)
    benchmark.extra_info["containers"] = SEQ
    benchmark.extra_info["rounds"] = ROUNDS
    benchmark.extra_info["plugin_call_p50_s"] = round(call, 6)
    record_ratio(benchmark, "remote_join_p50_vs_in_process_bridge", remote, bridge)
    overhead = remote - bridge
    benchmark.extra_info["remote_overhead_ms"] = round(overhead * 1000, 3)
    benchmark.extra_info["in_plugin_calls_per_join_p50_ms"] = round(calls * 1000, 3)
    print(
        f"remote join: {overhead * 1000:.2f} ms more than in process (p50 {remote * 1000:.2f} "
        f"vs {bridge * 1000:.2f} ms, {SEQ} joins x {ROUNDS} rounds); of a remote join, "
        f"{calls * 1000:.2f} ms (p50) is spent in plugin calls (Join + "
        f"ProgramExternalConnectivity), the rest is the controller's part, mostly the "
        f"kernel moving the interface into the sandbox; one bare plugin call "
        f"(EndpointOperInfo) p50 {call * 1000:.2f} ms"
    )
