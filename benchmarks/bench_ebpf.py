"""The BPF data path against the kernel's, same run.

Same host: two network namespaces on one bridge; measured in turn with and without
cnm_redirect attached to both host-side veths:
- TCP throughput (iperf3, one stream);
- small-packet UDP rate: 64-byte datagrams per second the receiver got, from a C sender
  (benchmarks/udp_flood.c, sendmmsg) to a C receiver (recvmmsg), built here with gcc.

Overlay: two "hosts" (network namespaces on one underlay veth) with both overlay data
paths side by side, laid out as cnm's osl lays them out (see `Overlay`): the kernel's
(a namespace with a bridge and a VXLAN device whose UDP socket stays on the underlay) and
cnm_tunnel's (a tunnel namespace with an external VXLAN device and the host ends, no
bridge); the small-packet UDP rate between two identical containers of each, in turn.
The sender and the receiver are pinned to different CPUs, and the receiver drains its
socket without sleeping on it: the whole data path runs in softirq on the sender's CPU,
and a wakeup of the receiver per datagram (a cross-CPU IPI, expensive in a VM) would
otherwise be a large cost common to both variants, hiding the data paths' difference.
Besides the rate, the datagrams per CPU-second of the sender's CPU (the data path's cost,
which the other processes of a busy machine barely disturb). Whether the kernel path's
bridge goes through netfilter (br_netfilter, on by default where it is loaded, as on
Docker hosts) is printed with the result: much of what BPF saves on that path is it.

Reported as ratios BPF / kernel (target: >= 1.2x on small packets), never asserted. The
variants alternate and each keeps its best of CNM_BENCH_ROUNDS rounds (default 3); with
CNM_BENCH_ROUNDS=1 each measurement lasts 1 s.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cnm.ebpf.redirect import RedirectEndpoint, RedirectOwner
from cnm.ebpf.tunnel import TunnelEndpoint, TunnelOwner, TunnelPeer
from cnm.fastpath import netns
from tests.bpf_gate import require_bpf

from .bench_common import build_c, settle

pytestmark = pytest.mark.privileged

ROUNDS = int(os.environ.get("CNM_BENCH_ROUNDS", "3"))
SECONDS = 1 if ROUNDS <= 1 else 3
PORT = 5201
# The overlay flood's receiver naps this long when its socket is empty instead of
# sleeping on it (udp_flood.c): the CPU carrying the data path pays no wakeup per datagram.
NAP_US = 200


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

    def carried(self) -> int:
        return self.owner.counters().redirected

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


class Overlay:
    """Two hosts on one underlay and, on each, both overlay data paths side by side, laid
    out as cnm lays them out, each with its own container (identical: one veth, same
    address and MTU; no static neighbours):

    - the kernel's (osl.overlay): a namespace for the network holding the bridge br0,
      the VXLAN device (learning off, proxy ARP from its neighbour table, a static FDB
      entry and a permanent neighbour per peer) made from the underlay namespace so its
      UDP socket stays there, and the container's host end on br0;
    - cnm_tunnel's (osl.tunnel): a tunnel namespace holding one external VXLAN device
      (made the same way) and the container's host end, with cnm_tunnel_egress on the
      host end and cnm_tunnel_ingress on the VXLAN device; the program answers ARP. And
      its RX accelerator (on unless CNM_BENCH_TUNNEL_DECAP=0; osl.tunnel makes it when a
      host device holds the VTEP address): the uplink pair (vxu in the host namespace,
      vxi in the tunnel namespace) with cnm_tunnel_uplink on vxi, and cnm_tunnel_decap
      on the host's underlay device u0, attached only while the BPF variant runs, so the
      kernel variant's frames never meet it.

    Both VXLAN devices send the outer UDP checksum the same way (zero, RFC 7348), so the
    wire format is the same and only the data path differs. `use_bpf` selects which pair
    of containers `paths` names (and attaches or detaches the programs).

    headroom_bridge (on unless CNM_BENCH_TUNNEL_HEADROOM=0; osl.tunnel always makes it):
    the tunnel namespace also holds a bridge that stays down, with a VXLAN device that is
    never up and the host end as ports. It never forwards a frame (the ports of a bridge
    that is down are disabled); it only makes the kernel give the containers' eth0 the
    VXLAN headroom (the bridge propagates it to its ports, and a veth to its peer), as br0
    does on the kernel path. Without it each datagram from a container is reallocated
    (pskb_expand_head) to fit the outer headers."""

    VNI = 4242

    def __init__(
        self, root: Path, *, headroom_bridge: bool = True, accelerator: bool = True
    ) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.hosts = [str(root / "h1"), str(root / "h2")]  # the underlay
        self.kernel_ns = [str(root / "k1"), str(root / "k2")]  # osl.overlay's namespace
        self.tunnel_ns = [str(root / "t1"), str(root / "t2")]  # osl.tunnel's namespace
        self.kernel_paths = [str(root / "ck1"), str(root / "ck2")]
        self.bpf_paths = [str(root / "cb1"), str(root / "cb2")]
        self.paths = self.kernel_paths
        self.addresses = ["10.77.1.2", "10.77.1.3"]
        underlay = ["10.77.0.1", "10.77.0.2"]
        every = [*self.hosts, *self.kernel_ns, *self.tunnel_ns, *self.kernel_paths]
        for path in [*every, *self.bpf_paths]:
            netns.create(path)
        h1, h2 = self.hosts
        _run("ip", "link", "add", "u0", "type", "veth", "peer", "name", "u0", "netns", h2, ns=h1)
        kernel_macs, bpf_macs = [], []
        self.ports: list[int] = []  # the BPF containers' host ends, in the tunnel namespaces
        for k, (host, vtep) in enumerate(zip(self.hosts, underlay, strict=True)):
            kns, tns = self.kernel_ns[k], self.tunnel_ns[k]
            _run("ip", "addr", "add", f"{vtep}/24", "dev", "u0", ns=host)
            _run("ip", "link", "set", "u0", "up", ns=host)
            # The kernel's overlay: vxlan (its own UDP port) on a bridge with the host end.
            _run("ip", "link", "add", "br0", "type", "bridge", ns=kns)
            vxlan = (
                f"ip link add vxk netns {kns} type vxlan id {self.VNI} local {vtep}"
                " dstport 4790 nolearning proxy noudpcsum"
            )
            _run(*vxlan.split(), ns=host)
            _run("ip", "link", "set", "vxk", "master", "br0", "up", ns=kns)
            _run("ip", "link", "set", "br0", "up", ns=kns)
            kernel_macs.append(self._container(kns, self.kernel_paths[k], k, "br0"))
            # cnm's: one external (collect-metadata) vxlan device and the host end.
            external = (
                f"ip link add vx0 netns {tns} type vxlan external local {vtep}"
                " dstport 4789 nolearning noudpcsum"
            )
            _run(*external.split(), ns=host)
            _run("ip", "link", "set", "vx0", "up", ns=tns)
            if headroom_bridge:
                _run("ip", "link", "add", "hr0", "type", "bridge", ns=tns)
                source = "ip link add hrv0 type vxlan id 1 dstport 4789 nolearning"
                _run(*source.split(), ns=tns)
                _run("ip", "link", "set", "hrv0", "master", "hr0", ns=tns)
            bpf_macs.append(
                self._container(tns, self.bpf_paths[k], k, "hr0" if headroom_bridge else None)
            )
            self.ports.append(netns.run_in(tns, lambda: _ifindex_here("vh")))
            if accelerator:  # the uplink pair: host end vxu, tunnel end vxi
                _run(*f"ip link add vxu type veth peer name vxi netns {tns}".split(), ns=host)
                _run("sysctl", "-qw", "net.ipv6.conf.vxu.disable_ipv6=1", ns=host)
                _run("ip", "link", "set", "vxu", "up", ns=host)
                _run("ip", "link", "set", "vxi", "up", ns=tns)
        self.accelerator = accelerator
        self.underlay = [netns.run_in(h, lambda: _ifindex_here("u0")) for h in self.hosts]
        self.uplinks, self.uplink_ends = [0, 0], [0, 0]
        if accelerator:  # the uplink pairs: host namespace end vxu, tunnel namespace end vxi
            self.uplinks = [netns.run_in(h, lambda: _ifindex_here("vxu")) for h in self.hosts]
            self.uplink_ends = [
                netns.run_in(t, lambda: _ifindex_here("vxi")) for t in self.tunnel_ns
            ]
        self.owners: list[TunnelOwner] = []
        for k, tns in enumerate(self.tunnel_ns):
            there = 1 - k
            # The kernel path's peer: a permanent neighbour (answered by the proxy) and FDB.
            kns, addr = self.kernel_ns[k], self.addresses[there]
            neigh = f"ip neigh replace {addr} lladdr {kernel_macs[there]} dev vxk nud permanent"
            _run(*neigh.split(), ns=kns)
            fdb = f"bridge fdb append {kernel_macs[there]} dev vxk dst {underlay[there]} self"
            _run(*fdb.split(), "permanent", ns=kns)
            owner = TunnelOwner(
                netns.run_in(tns, lambda: _ifindex_here("vx0")),
                f"/sys/fs/bpf/cnm-bench-{self.tag}-{k}",
            )
            owner.load()
            owner.add_endpoint(
                TunnelEndpoint(self.addresses[k], self.ports[k], bpf_macs[k], self.VNI)
            )
            owner.add_peer(TunnelPeer(addr, underlay[there], bpf_macs[there], self.VNI))
            if accelerator:  # (the device map takes the index in the host's namespace)
                uplink = (underlay[k], self.uplinks[k], self.underlay[k])
                netns.run_in(self.hosts[k], lambda u=uplink, o=owner: o.set_uplink(*u))
            self.owners.append(owner)
        self._warm(self.kernel_paths)

    def _container(self, ns: str, path: str, k: int, bridge: str | None) -> str:
        """The container at `path` (host k's address) with its host end `vh` in `ns` (a
        port of `bridge` when given); its MAC."""
        _run(*f"ip link add vh type veth peer name eth0 netns {path}".split(), ns=ns)
        if bridge:
            _run("ip", "link", "set", "vh", "master", bridge, ns=ns)
        _run("ip", "link", "set", "vh", "up", ns=ns)
        _run("ip", "addr", "add", f"{self.addresses[k]}/24", "dev", "eth0", ns=path)
        _run("ip", "link", "set", "eth0", "mtu", "1400", "up", ns=path)
        return json.loads(_run("ip", "-j", "link", "show", "eth0", ns=path).stdout)[0]["address"]

    def _warm(self, paths: list[str]) -> None:
        """Resolve the neighbours both ways (and prove the path carries) before a flood."""
        for k in (0, 1):
            ping = f"ping -n -q -c 2 -i 0.2 -W 2 {self.addresses[1 - k]}"
            _run(*ping.split(), ns=paths[k])

    def use_bpf(self, on: bool) -> None:
        for k, (owner, tns, port) in enumerate(
            zip(self.owners, self.tunnel_ns, self.ports, strict=True)
        ):
            host = self.hosts[k]
            if on:
                owner.attach_vxlan(netns=tns)
                owner.attach_endpoint(port, netns=tns)
                if self.accelerator:
                    owner.attach_uplink(self.uplink_ends[k], netns=tns)
                    owner.attach_decap(self.underlay[k], netns=host)
            else:
                owner.detach(port, netns=tns)
                owner.detach(owner.vxlan_ifindex, netns=tns)
                if self.accelerator:
                    owner.detach_decap(self.underlay[k], netns=host)
                    owner.detach(self.uplink_ends[k], netns=tns)
        self.paths = self.bpf_paths if on else self.kernel_paths
        if on:
            self._warm(self.bpf_paths)

    def carried(self) -> int:
        return sum(o.counters().encapsulated for o in self.owners)

    def accelerated(self) -> int:
        """Frames the RX accelerator (cnm_tunnel_decap) carried so far."""
        return sum(o.counters().decap_fast for o in self.owners)

    def bridge_netfilter(self) -> bool:
        """Whether the kernel path's bridge hands IPv4 frames to netfilter (br_netfilter
        loaded, bridge-nf-call-iptables on in its namespace, as on a Docker host): a large
        part of what that path costs per frame, and of what the BPF path skips."""
        read = ["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"]
        proc = _run(*read, ns=self.kernel_ns[0], check=False)
        return proc.returncode == 0 and proc.stdout.strip() == "1"

    def close(self) -> None:
        for owner in self.owners:
            owner.close()
            owner.unpin()
            os.rmdir(owner.pin_root)
        every = [*self.bpf_paths, *self.kernel_paths, *self.tunnel_ns, *self.kernel_ns]
        for path in [*every, *self.hosts]:
            netns.delete(path)


def _ifindex_here(name: str) -> int:
    return socket.if_nametoindex(name)  # in the calling thread's namespace


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    require_bpf(("cnm_redirect",))
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _tcp_bps(report: dict) -> float:
    return float(report["end"]["sum_received"]["bits_per_second"])


@pytest.fixture(scope="module")
def flood_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_c("udp_flood", str(tmp_path_factory.mktemp("flood")))


def _pinned(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def _ksoftirqd_seconds(cpu: int) -> float:
    """CPU time so far of ksoftirqd/<cpu> (softirq work the kernel deferred from the
    tasks on that CPU); 0 when it cannot be read."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if f"(ksoftirqd/{cpu})" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return 0.0


def _udp_pps(
    pair: Pair | Overlay,
    binary: str,
    *,
    nap_us: int = 0,
    pin: bool = False,
    per_cpu: list[float] | None = None,
) -> float:
    """Datagrams per second the receiver got. nap_us > 0: the receiver drains without
    sleeping on the socket (see udp_flood.c); pin: sender and receiver on two different
    CPUs (when there are two), so neither variant depends on where the scheduler puts them.
    per_cpu (with pin): gets the datagrams sent per CPU-second of the sender's CPU (the
    sender's own time, which holds the softirq work run in its context, plus what that
    CPU's ksoftirqd did meanwhile): the data path's cost, which time the other processes
    of a busy machine take from the sender does not change."""
    cpus = sorted(os.sched_getaffinity(0))
    send_cpu, recv_cpu = (cpus[0], cpus[-1]) if pin and len(cpus) >= 2 else (None, None)
    deferred = _ksoftirqd_seconds(send_cpu) if send_cpu is not None else 0.0
    recv = [binary, "recv", str(PORT), str(SECONDS), *([str(nap_us)] if nap_us else [])]
    receiver = subprocess.Popen(
        [*_pinned(recv_cpu), "nsenter", f"--net={pair.paths[1]}", *recv],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        send = [binary, "send", pair.addresses[1], str(PORT), str(SECONDS), "64"]
        sent = _run(*_pinned(send_cpu), "nsenter", f"--net={pair.paths[0]}", *send).stdout
        if per_cpu is not None and send_cpu is not None:
            report = json.loads(sent.strip().splitlines()[-1])
            cpu = report["cpu"] + _ksoftirqd_seconds(send_cpu) - deferred
            per_cpu.append(report["sent"] / cpu if cpu > 0 else 0.0)
        out, _ = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    result = json.loads(out.strip().splitlines()[-1])
    return result["packets"] / result["seconds"]


def _compare(
    pair: Pair | Overlay, measure: Callable[[], float]
) -> tuple[float, float, dict[str, int]]:
    """Best of ROUNDS for the kernel path and for BPF, alternating; and how many frames
    the BPF variant's program carried."""
    best = {"bridge": 0.0, "bpf": 0.0}
    carried = 0
    for _ in range(ROUNDS):
        for variant in ("bridge", "bpf"):
            pair.use_bpf(variant == "bpf")
            settle(5)
            before = pair.carried()
            best[variant] = max(best[variant], measure())
            carried += pair.carried() - before if variant == "bpf" else 0
    pair.use_bpf(False)
    return best["bridge"], best["bpf"], {"redirected": carried}


def _report(benchmark: object, name: str, unit: str, bridge: float, bpf: float) -> float:
    ratio = bpf / bridge if bridge > 0 else float("inf")
    extra = benchmark.extra_info  # type: ignore[attr-defined]
    extra[f"{name}_bridge_{unit}"] = round(bridge, 1)
    extra[f"{name}_bpf_{unit}"] = round(bpf, 1)
    extra[f"{name}_ratio"] = round(ratio, 3)
    print(f"\n{name}: kernel path {bridge:,.0f} {unit}, BPF {bpf:,.0f} {unit}, {ratio:.2f}x")
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


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Overlay]:
    require_bpf(("cnm_tunnel",))
    o = Overlay(
        tmp_path,
        headroom_bridge=os.environ.get("CNM_BENCH_TUNNEL_HEADROOM") != "0",
        accelerator=os.environ.get("CNM_BENCH_TUNNEL_DECAP") != "0",
    )
    try:
        yield o
    finally:
        o.close()


def test_overlay_small_udp_rate(benchmark, overlay: Overlay, flood_binary: str) -> None:
    per_cpu: dict[str, list[float]] = {"kernel": [], "bpf": []}

    def measure() -> float:
        variant = "bpf" if overlay.paths is overlay.bpf_paths else "kernel"
        return _udp_pps(overlay, flood_binary, nap_us=NAP_US, pin=True, per_cpu=per_cpu[variant])

    accelerated = overlay.accelerated()
    kernel, bpf, seen = _compare(overlay, measure)
    assert seen["redirected"] > 0, "the BPF variant did not go through the tunnel program"
    if overlay.accelerator:
        moved = overlay.accelerated() - accelerated
        assert moved > 0, "the RX accelerator (cnm_tunnel_decap) carried nothing"
        benchmark.extra_info["overlay_decap_fast"] = moved
    assert kernel > 0, "the kernel's overlay carried nothing"
    _report(benchmark, "overlay_udp64", "pkt/s", kernel, bpf)
    if per_cpu["kernel"] and per_cpu["bpf"]:
        kernel_cpu, bpf_cpu = max(per_cpu["kernel"]), max(per_cpu["bpf"])
        _report(benchmark, "overlay_udp64_per_cpu", "pkt/cpu-s", kernel_cpu, bpf_cpu)
    netfilter = overlay.bridge_netfilter()
    benchmark.extra_info["overlay_kernel_bridge_netfilter"] = netfilter
    print(f"kernel path's bridge through netfilter (br_netfilter): {'yes' if netfilter else 'no'}")
    overlay.use_bpf(True)
    benchmark.pedantic(measure, rounds=1, iterations=1)
