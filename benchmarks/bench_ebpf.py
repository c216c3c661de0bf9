"""The BPF same-host redirect against the plain bridge, between two containers, same run.

Two network namespaces on one bridge; iperf3 measures, in turn, with and without
cnm_redirect attached to both host-side veths:
- TCP throughput (iperf3, one stream);
- small-packet UDP rate: 64-byte datagrams per second the receiver got, from a C sender
  (benchmarks/udp_flood.c, sendmmsg) to a C receiver (recvmmsg), built here with gcc.
Reported as ratios BPF / bridge (target: >= 1.2x on small packets), never asserted. The
variants alternate and each keeps its best of CNM_BENCH_ROUNDS rounds (default 3); with
CNM_BENCH_ROUNDS=1 each measurement lasts 1 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cnm.ebpf import probe
from cnm.ebpf.redirect import RedirectEndpoint, RedirectOwner
from cnm.fastpath import netns

from .bench_common import settle

pytestmark = pytest.mark.privileged

ROUNDS = int(os.environ.get("CNM_BENCH_ROUNDS", "3"))
SECONDS = 1 if ROUNDS <= 1 else 3
PORT = 5201


def _run(*argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["nsenter", f"--net={ns}"] if ns else []
    return subprocess.run([*prefix, *argv], check=check, capture_output=True, text=True)


class Pair:
    """Two containers on one bridge, and the redirect program (attached or not)."""

    def __init__(self, root: Path) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"bb{self.tag}"
        self.paths = [str(root / "c1"), str(root / "c2")]
        self.ports = [f"vb{self.tag}1", f"vb{self.tag}2"]
        self.addresses = ["10.88.0.2", "10.88.0.3"]
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        self.endpoints = []
        for path, port, addr in zip(self.paths, self.ports, self.addresses, strict=True):
            netns.create(path)
            _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", path)
            _run("ip", "link", "set", port, "master", self.bridge, "up")
            _run("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=path)
            _run("ip", "link", "set", "eth0", "up", ns=path)
            link = json.loads(_run("ip", "-j", "link", "show", "eth0", ns=path).stdout)[0]
            ifindex = int(Path(f"/sys/class/net/{port}/ifindex").read_text())
            self.endpoints.append(RedirectEndpoint(addr, ifindex, link["address"], 1))
        self.pin_root = f"/sys/fs/bpf/cnm-bench-{self.tag}"
        self.owner = RedirectOwner(self.pin_root)
        self.owner.load()
        self.owner.add_endpoints(self.endpoints)

    def use_bpf(self, on: bool) -> None:
        for ep in self.endpoints:
            if on:
                self.owner.attach(ep.ifindex)
            else:
                self.owner.detach(ep.ifindex)

    def iperf(self, *client_args: str) -> dict:
        server = subprocess.Popen(
            ["nsenter", f"--net={self.paths[1]}", "iperf3", "-s", "-1", "-p", str(PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(50):  # wait until the server listens
                probe_run = _run("ss", "-Htln", f"sport = :{PORT}", ns=self.paths[1], check=False)
                if probe_run.stdout.strip():
                    break
                time.sleep(0.05)
            out = _run(
                "iperf3",
                "-c",
                self.addresses[1],
                "-p",
                str(PORT),
                "-t",
                str(SECONDS),
                "-J",
                *client_args,
                ns=self.paths[0],
            ).stdout
            return json.loads(out)
        finally:
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def close(self) -> None:
        self.use_bpf(False)
        self.owner.close()
        self.owner.unpin()
        os.rmdir(self.pin_root)
        for port in self.ports:
            _run("ip", "link", "del", port, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        for path in self.paths:
            netns.delete(path)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    result = probe.probe(("cnm_redirect",))
    if result.verdict == "skip":
        pytest.skip(f"the kernel predates a BPF feature: {result.reason}")
    assert result.ok, result.reason
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _tcp_bps(report: dict) -> float:
    return float(report["end"]["sum_received"]["bits_per_second"])


@pytest.fixture(scope="module")
def flood_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler for the UDP sender")
    out = str(tmp_path_factory.mktemp("flood") / "udp_flood")
    src = Path(__file__).with_name("udp_flood.c")
    subprocess.run([gcc, "-O2", "-o", out, str(src)], check=True)
    return out


def _udp_pps(pair: Pair, binary: str) -> float:
    receiver = subprocess.Popen(
        ["nsenter", f"--net={pair.paths[1]}", binary, "recv", str(PORT), str(SECONDS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        _run(binary, "send", pair.addresses[1], str(PORT), str(SECONDS), "64", ns=pair.paths[0])
        out, _ = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    result = json.loads(out.strip().splitlines()[-1])
    return result["packets"] / result["seconds"]


def _compare(pair: Pair, measure: Callable[[], float]) -> tuple[float, float, dict[str, int]]:
    """Best of ROUNDS for the bridge and for BPF, alternating; and the redirect counter."""
    best = {"bridge": 0.0, "bpf": 0.0}
    carried = 0
    for _ in range(ROUNDS):
        for variant in ("bridge", "bpf"):
            pair.use_bpf(variant == "bpf")
            settle(5)
            before = pair.owner.counters().redirected
            best[variant] = max(best[variant], measure())
            carried += pair.owner.counters().redirected - before if variant == "bpf" else 0
    pair.use_bpf(False)
    return best["bridge"], best["bpf"], {"redirected": carried}


def _report(benchmark: object, name: str, unit: str, bridge: float, bpf: float) -> float:
    ratio = bpf / bridge if bridge > 0 else float("inf")
    extra = benchmark.extra_info  # type: ignore[attr-defined]
    extra[f"{name}_bridge_{unit}"] = round(bridge, 1)
    extra[f"{name}_bpf_{unit}"] = round(bpf, 1)
    extra[f"{name}_ratio"] = round(ratio, 3)
    print(f"\n{name}: bridge {bridge:,.0f} {unit}, BPF redirect {bpf:,.0f} {unit}, {ratio:.2f}x")
    return ratio


def test_tcp_throughput(benchmark, pair: Pair) -> None:
    bridge, bpf, seen = _compare(pair, lambda: _tcp_bps(pair.iperf()))
    assert seen["redirected"] > 0, "the BPF variant did not go through the program"
    _report(benchmark, "tcp", "bit/s", bridge, bpf)
    pair.use_bpf(True)
    benchmark.pedantic(lambda: pair.iperf(), rounds=1, iterations=1)


def test_small_udp_rate(benchmark, pair: Pair, flood_binary: str) -> None:
    def measure() -> float:
        return _udp_pps(pair, flood_binary)

    bridge, bpf, seen = _compare(pair, measure)
    assert seen["redirected"] > 0, "the BPF variant did not go through the program"
    _report(benchmark, "udp64", "pkt/s", bridge, bpf)
    pair.use_bpf(True)
    benchmark.pedantic(measure, rounds=1, iterations=1)
