"""cnm.ebpf against the real kernel: probes, loader, the redirect and tunnel programs.

Everything runs in the session's throwaway namespaces: containers are network namespaces
made here (cnm.fastpath.netns) joined by veths and bridges made with `ip`; bpffs is
mounted inside the session's private mount namespace. Real pings cross them, and the
programs' own per-CPU counters say which path carried them.

Tests skip only when the probe says this kernel predates a feature the program needs; on
a kernel that should have everything, a missing feature fails them.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cnm.ebpf import build, errors, loader, probe
from cnm.ebpf.redirect import RedirectEndpoint, RedirectOwner
from cnm.ebpf.tunnel import TunnelEndpoint, TunnelOwner, TunnelPeer
from cnm.fastpath import netns
from tests.bpf_gate import require_bpf

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]


@pytest.fixture(scope="module", autouse=True)
def bpf_ready() -> probe.EbpfProbe:
    return require_bpf()


def _run(*argv: str, ns: str | os.PathLike[str] | None = None, check: bool = True):
    prefix = ["nsenter", f"--net={ns}"] if ns is not None else []
    return subprocess.run([*prefix, *argv], check=check, capture_output=True, text=True)


def _pings(ns: str | os.PathLike[str], address: str, count: int = 3) -> bool:
    """True when `count` pings from inside `ns` are answered within 5 s (ping sends again
    for a lost one until the deadline: a busy machine drops one now and then)."""
    proc = _run(
        "ping", "-n", "-q", "-c", str(count), "-i", "0.1", "-w", "5", address, ns=ns, check=False
    )
    return proc.returncode == 0


def _silent(ns: str | os.PathLike[str], address: str, count: int = 2) -> bool:
    """True when none of `count` pings from inside `ns` is answered (1 s each)."""
    proc = _run(
        "ping", "-n", "-q", "-c", str(count), "-i", "0.1", "-W", "1", address, ns=ns, check=False
    )
    return proc.returncode != 0 and ", 0 received" in proc.stdout


def _mac(ns: str | os.PathLike[str], dev: str) -> str:
    return json.loads(_run("ip", "-j", "link", "show", dev, ns=ns).stdout)[0]["address"]


def _ifindex(name: str, ns: str | os.PathLike[str] | None = None) -> int:
    if ns is None:
        return socket.if_nametoindex(name)
    return netns.run_in(os.fspath(ns), lambda: socket.if_nametoindex(name))


@dataclass
class Container:
    path: Path
    address: str
    mac: str
    host_if: str  # its host-side veth
    ifindex: int  # of host_if


class Lab:
    """Bridges, containers and hosts made for one test, all removed afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex[:5]
        self.links: list[tuple[str, Path | None]] = []
        self.namespaces: list[Path] = []

    def namespace(self, name: str) -> Path:
        path = self.root / name
        netns.create(str(path))
        self.namespaces.append(path)
        return path

    def bridge(self, name: str, address: str | None = None) -> str:
        dev = f"b{self.tag}{name}"
        _run("ip", "link", "add", dev, "type", "bridge")
        self.links.append((dev, None))
        if address:
            _run("ip", "addr", "add", address, "dev", dev)
        _run("ip", "link", "set", dev, "up")
        return dev

    def container(
        self,
        name: str,
        address: str,
        *,
        bridge: str | None = None,
        host: Path | None = None,
        gateway: str | None = None,
    ) -> Container:
        path = self.namespace(name)
        host_if = f"v{self.tag}{name}"
        _run(
            "ip",
            "link",
            "add",
            host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            str(path),
            ns=host,
        )
        self.links.append((host_if, host))
        if bridge:
            _run("ip", "link", "set", host_if, "master", bridge, ns=host)
        _run("ip", "link", "set", host_if, "up", ns=host)
        _run("ip", "addr", "add", address, "dev", "eth0", ns=path)
        _run("ip", "link", "set", "eth0", "up", ns=path)
        if gateway:
            _run("ip", "route", "add", "default", "via", gateway, ns=path)
        return Container(
            path, address.split("/")[0], _mac(path, "eth0"), host_if, _ifindex(host_if, host)
        )

    def close(self) -> None:
        for dev, ns in reversed(self.links):
            _run("ip", "link", "del", dev, ns=ns, check=False)
        for path in reversed(self.namespaces):
            netns.delete(str(path))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def pin_root() -> Iterator[str]:
    root = f"/sys/fs/bpf/cnm-test-{uuid.uuid4().hex[:8]}"
    yield root
    for parent, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.unlink(os.path.join(parent, name))
        os.rmdir(parent)


def _static_neighbours(a: Container, b: Container) -> None:
    _run("ip", "neigh", "replace", b.address, "lladdr", b.mac, "dev", "eth0", ns=a.path)
    _run("ip", "neigh", "replace", a.address, "lladdr", a.mac, "dev", "eth0", ns=b.path)


def _isolate(*ports: str) -> None:
    """Bridge port isolation: isolated ports never reach each other through the bridge."""
    for port in ports:
        _run("bridge", "link", "set", "dev", port, "isolated", "on")


def _endpoint(c: Container, network: int, icc: bool = True) -> RedirectEndpoint:
    return RedirectEndpoint(c.address, c.ifindex, c.mac, network, icc)


BAD_PROGRAM = r"""
#include "cnm_bpf.h"
struct cnm_endpoint_bytes { __u8 b[24]; };
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct cnm_endpoint_bytes);
} cnm_endpoints SEC(".maps");
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 6);
	__type(key, __u32);
	__type(value, __u64);
} cnm_redirect_counters SEC(".maps");
const volatile __u32 cnm_verify_source = 1;

SEC("tc")
int cnm_redirect_ingress(struct __sk_buff *skb)
{
	__u8 *data = (void *)(long)skb->data;
	return data[20] + cnm_verify_source; /* no bounds check against data_end */
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture
def bad_obj_dir(tmp_path: Path) -> Path:
    """An object dir whose cnm_redirect.bpf.o compiles but the verifier must reject."""
    src = tmp_path / "bad.bpf.c"
    src.write_text(BAD_PROGRAM)
    out = tmp_path / "badobj"
    build.compile_program(src, out / "cnm_redirect.bpf.o")
    return out


# --- probes and loader -------------------------------------------------------------------


def test_probe_finds_every_feature_on_this_kernel(bpf_ready: probe.EbpfProbe) -> None:
    names = {c.name for c in bpf_ready.checks}
    for wanted in (
        "libbpf",
        "privileges",
        "program type SCHED_CLS",
        "helper bpf_redirect_peer",
        "helper bpf_skb_set_tunnel_key",
        "helper bpf_skb_get_tunnel_key",
        "object cnm_redirect",
        "object cnm_tunnel",
    ):
        assert wanted in names, names
    assert bpf_ready.ok and bpf_ready.reason is None and bpf_ready.verdict == "ok"
    assert bpf_ready.kernel_version >= probe.MIN_KERNEL
    report = bpf_ready.to_dict()
    assert report["ok"] is True and report["libbpf"].startswith("1.")
    probe.require()


def test_probe_tells_old_kernels_from_broken_ones() -> None:
    missing = probe.Check("helper bpf_redirect_peer", False, "not supported", (5, 10))
    old = probe.EbpfProbe("5.4.0", (5, 4), "1.1", True, True, (missing,))
    new = probe.EbpfProbe("6.18.0", (6, 18), "1.1", True, True, (missing,))
    assert (old.verdict, new.verdict) == ("skip", "fail")
    assert "bpf_redirect_peer" in (new.reason or "")


def test_object_spec_globals_and_maps() -> None:
    with loader.BpfObject(loader.object_path("cnm_tunnel")) as obj:
        assert set(obj.programs) == {
            "cnm_tunnel_egress",
            "cnm_tunnel_ingress",
            "cnm_tunnel_decap",
            "cnm_tunnel_uplink",
        }
        maps = {"cnm_tun_local", "cnm_tun_peers", "cnm_tunnel_counters", "cnm_tun_uplink"}
        assert maps <= set(obj.maps)
        assert {"cnm_vxlan_ifindex", "cnm_tunnel_ttl", "cnm_verify_source"} <= set(obj.globals)
        assert "cnm_vxlan_port" in obj.globals
        obj.set_global("cnm_vxlan_ifindex", 4242)
        assert int.from_bytes(obj.get_global("cnm_vxlan_ifindex"), "little") == 4242
        with pytest.raises(errors.InvalidArgument):
            obj.set_global("cnm_tunnel_ttl", 300)  # one byte
        with pytest.raises(errors.NotFound):
            obj.set_global("no_such_global", 1)
        obj.load()
        with obj.rodata_map() as config:
            frozen = config.lookup(bytes(4))
        assert frozen is not None and frozen[:4] == (4242).to_bytes(4, "little")
        with obj.map("cnm_tun_peers") as peers:
            with pytest.raises(errors.InvalidArgument):
                peers.update(b"\x01\x02", bytes(16))  # a 2-byte key for a 4-byte map
            assert list(peers.keys()) == []


def test_verifier_rejection_is_typed_and_carries_the_log(bad_obj_dir: Path) -> None:
    obj = loader.BpfObject(bad_obj_dir / "cnm_redirect.bpf.o")
    with pytest.raises(errors.VerifierError) as info, obj:
        obj.load()
    err = info.value
    assert err.program == "cnm_redirect_ingress"
    assert err.errno in (errno.EACCES, errno.EINVAL)
    assert "invalid access to packet" in err.log, err.log
    assert "verifier rejected program 'cnm_redirect_ingress'" in str(err)


def test_missing_object_says_objects_not_built(tmp_path: Path) -> None:
    with pytest.raises(errors.ObjectsNotBuilt, match="objects not built"):
        RedirectOwner(str(tmp_path / "pins"), obj_dir=tmp_path).load()


def test_bad_entries_are_rejected_before_anything_changes(pin_root: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="MAC"):
        RedirectEndpoint("10.9.0.2", 5, "not-a-mac", 1)
    with pytest.raises(errors.InvalidArgument, match="IPv4"):
        RedirectEndpoint("fe80::1", 5, "02:00:00:00:00:01", 1)
    with pytest.raises(errors.InvalidArgument, match="vni"):
        TunnelPeer("10.9.0.2", "10.99.0.2", "02:00:00:00:00:01", 2**24)
    with RedirectOwner(pin_root) as owner:
        good = RedirectEndpoint("10.9.0.2", 5, "02:00:00:00:00:01", 1)
        with pytest.raises(errors.InvalidArgument):
            owner.add_endpoints([good, "10.9.0.3"])  # type: ignore[list-item]
        assert owner.endpoints() == []
        owner.unpin()


# --- same-host redirect ------------------------------------------------------------------


def test_redirect_carries_pings_the_bridge_would_block(lab: Lab, pin_root: str) -> None:
    br = lab.bridge("a", "10.81.0.1/24")
    c1 = lab.container("c1", "10.81.0.2/24", bridge=br)
    c2 = lab.container("c2", "10.81.0.3/24", bridge=br)
    assert _pings(c1.path, c2.address), "the plain bridge does not carry the pings"

    with RedirectOwner(pin_root) as owner:
        assert not owner.picked_up
        owner.add_endpoints([_endpoint(c1, 7), _endpoint(c2, 7)])
        owner.attach(c1.ifindex)
        owner.attach(c2.ifindex)
        assert owner.attached(c1.ifindex) and owner.attached(c2.ifindex)
        before = owner.counters().redirected
        assert _pings(c1.path, c2.address, count=5)
        after = owner.counters()
        # Each echo request (on c1's port) and each reply (on c2's port) skipped the bridge.
        assert after.redirected - before >= 10, after
        assert after.redirect_failed == 0

        # With the bridge forbidding the two ports to talk (and no ARP crossing it), only
        # the fast path can carry them.
        _isolate(c1.host_if, c2.host_if)
        _static_neighbours(c1, c2)
        assert _pings(c1.path, c2.address, count=3)
        assert owner.counters().redirected - after.redirected >= 6
        for c in (c1, c2):
            owner.detach(c.ifindex)
        assert _silent(c1.path, c2.address, count=2), "isolation without the program"
        owner.unpin()


def test_policy_icc_off_and_cross_network_are_not_redirected(lab: Lab, pin_root: str) -> None:
    # An enable_icc=false network: its bridge blocks the ports from each other.
    br = lab.bridge("q", "10.83.0.1/24")
    c1 = lab.container("q1", "10.83.0.2/24", bridge=br, gateway="10.83.0.1")
    c2 = lab.container("q2", "10.83.0.3/24", bridge=br, gateway="10.83.0.1")
    _isolate(c1.host_if, c2.host_if)
    _static_neighbours(c1, c2)
    # A second network on another bridge; the host does not forward between them.
    br2 = lab.bridge("r", "10.84.0.1/24")
    c3 = lab.container("r1", "10.84.0.2/24", bridge=br2, gateway="10.84.0.1")
    _run("sysctl", "-qw", "net.ipv4.ip_forward=0")

    with RedirectOwner(pin_root) as owner:
        owner.add_endpoints(
            [_endpoint(c1, 11, icc=False), _endpoint(c2, 11, icc=False), _endpoint(c3, 12)]
        )
        for c in (c1, c2, c3):
            owner.attach(c.ifindex)
        assert _silent(c1.path, c2.address, count=2)
        assert _silent(c1.path, c3.address, count=2)
        assert _silent(c3.path, c2.address, count=2)
        counters = owner.counters()
        assert counters.redirected == 0, counters
        assert counters.policy >= 6, counters
        # The same pair, on a network with ICC on, is carried: the policy is the tag.
        owner.add_endpoints([_endpoint(c1, 11, icc=True), _endpoint(c2, 11, icc=True)])
        assert _pings(c1.path, c2.address, count=2)
        assert owner.counters().redirected >= 4
        owner.unpin()


def test_detach_and_a_failed_load_keep_connectivity(
    lab: Lab, pin_root: str, bad_obj_dir: Path
) -> None:
    br = lab.bridge("d", "10.85.0.1/24")
    c1 = lab.container("d1", "10.85.0.2/24", bridge=br)
    c2 = lab.container("d2", "10.85.0.3/24", bridge=br)
    owner = RedirectOwner(pin_root)
    owner.load()
    owner.add_endpoints([_endpoint(c1, 3), _endpoint(c2, 3)])
    owner.attach(c1.ifindex)
    owner.attach(c2.ifindex)
    assert _pings(c1.path, c2.address)
    carried = owner.counters().redirected
    assert carried >= 6

    # A second owner whose object the verifier rejects: typed error, nothing changes.
    broken = RedirectOwner(os.path.join(pin_root, "other"), obj_dir=bad_obj_dir)
    with pytest.raises(errors.VerifierError):
        broken.load()
    assert not broken.loaded
    assert owner.attached(c1.ifindex) and owner.attached(c2.ifindex)
    assert _pings(c1.path, c2.address)
    assert owner.counters().redirected >= carried + 6

    assert owner.detach(c1.ifindex) and owner.detach(c2.ifindex)
    assert not owner.detach(c1.ifindex), "detaching twice finds nothing"
    assert loader.tc_query(c1.ifindex) is None
    stopped = owner.counters().redirected
    assert _pings(c1.path, c2.address), "the bridge carries the pings again"
    assert owner.counters().redirected == stopped
    owner.close()
    owner.unpin()


def test_pins_are_picked_up_by_a_new_owner(lab: Lab, pin_root: str) -> None:
    br = lab.bridge("p", "10.86.0.1/24")
    c1 = lab.container("p1", "10.86.0.2/24", bridge=br)
    c2 = lab.container("p2", "10.86.0.3/24", bridge=br)
    first = RedirectOwner(pin_root)
    first.load()
    first.add_endpoints([_endpoint(c1, 5), _endpoint(c2, 5)])
    first.attach(c1.ifindex)
    first.attach(c2.ifindex)
    prog_id = first.program("cnm_redirect_ingress").id
    first.close()  # a restart: the handles go, pins and attachments stay

    pin_dir = Path(pin_root) / "cnm_redirect"
    for name in ("cnm_endpoints", "cnm_redirect_counters", "cnm_redirect_ingress", "config"):
        assert (pin_dir / name).exists(), name
        assert (pin_dir / name).stat().st_mode & 0o777 == 0o600
    assert loader.fs_type(pin_root) == "bpf"

    second = RedirectOwner(pin_root)
    second.load()
    assert second.picked_up
    assert second.program("cnm_redirect_ingress").id == prog_id
    assert {str(e.address) for e in second.endpoints()} == {c1.address, c2.address}
    assert second.attached(c1.ifindex)
    assert _pings(c1.path, c2.address)
    carried = second.counters().redirected
    assert carried >= 6

    # Another configuration loads the program again and keeps the pinned maps' entries.
    second.close()
    third = RedirectOwner(pin_root, verify_source=False)
    third.load()
    assert not third.picked_up
    assert third.program("cnm_redirect_ingress").id != prog_id
    assert len(third.endpoints()) == 2
    assert third.counters().redirected == carried
    third.attach(c1.ifindex)
    third.attach(c2.ifindex)
    assert _pings(c1.path, c2.address)
    assert third.counters().redirected >= carried + 6
    third.remove_endpoint(c2.address)
    assert third.endpoint(c2.address) is None
    assert not third.remove_endpoint(c2.address)
    third.close()
    third.unpin()
    assert not pin_dir.exists()


def test_a_shorter_counter_map_of_an_older_build_is_replaced(pin_root: str) -> None:
    """Pins of a build with fewer counters: the new owner loads anew with a counter map of
    its own size (the endpoint map's entries are kept), instead of reusing a map whose
    last counters would never count."""
    from cnm.ebpf.loader import BpfObject, object_path
    from cnm.ebpf.tunnel import COUNTERS, LOCAL

    old = TunnelOwner(1, pin_root)
    old.load()
    old.add_endpoint(TunnelEndpoint("10.9.9.9", 7, "02:00:00:00:09:09", 4242))
    old.close()
    with BpfObject(object_path("cnm_tunnel")) as obj:  # the older build: 3 counters
        obj.set_global("cnm_vxlan_ifindex", 1)
        obj.set_max_entries(COUNTERS, 3)
        obj.load()
        obj.map(COUNTERS).pin(os.path.join(old.pin_dir, COUNTERS))
    new = TunnelOwner(1, pin_root)
    new.load()
    assert not new.picked_up
    assert new.map(COUNTERS).max_entries == len(TunnelOwner.counter_names)
    assert new.counters().arp_replied == 0
    assert [str(e.address) for e in new.endpoints()] == ["10.9.9.9"]
    assert new.map(LOCAL).max_entries > 3
    new.close()
    new.unpin()


# --- overlay tunnel ----------------------------------------------------------------------


def test_overlay_tunnel_between_two_hosts(lab: Lab, pin_root: str) -> None:
    h1, h2 = lab.namespace("h1"), lab.namespace("h2")
    # The underlay: one veth between the two hosts.
    _run("ip", "link", "add", "u1", "type", "veth", "peer", "name", "u2", "netns", str(h2), ns=h1)
    for host, dev, addr in ((h1, "u1", "10.99.0.1/24"), (h2, "u2", "10.99.0.2/24")):
        _run("ip", "addr", "add", addr, "dev", dev, ns=host)
        _run("ip", "link", "set", dev, "up", ns=host)
        _run("ip", "link", "add", "vx0", "type", "vxlan", "external", "dstport", "4789", ns=host)
        _run("ip", "link", "set", "vx0", "up", ns=host)
    assert _pings(h1, "10.99.0.2", count=1)
    c1 = lab.container("t1", "10.50.0.2/24", host=h1)
    c2 = lab.container("t2", "10.50.0.3/24", host=h2)
    _static_neighbours(c1, c2)
    assert _silent(c1.path, c2.address, count=1), "nothing carries the overlay yet"

    vni = 4242
    owners = []
    for host, here, there, vtep in ((h1, c1, c2, "10.99.0.2"), (h2, c2, c1, "10.99.0.1")):
        owner = TunnelOwner(_ifindex("vx0", host), os.path.join(pin_root, host.name))
        owner.load()
        owner.add_endpoint(TunnelEndpoint(here.address, here.ifindex, here.mac, vni))
        owner.add_peer(TunnelPeer(there.address, vtep, there.mac, vni))
        owner.attach_endpoint(here.ifindex, netns=str(host))
        owner.attach_vxlan(netns=str(host))
        assert owner.attached(here.ifindex, netns=str(host))
        assert owner.attached(owner.vxlan_ifindex, netns=str(host))
        owners.append(owner)

    assert _pings(c1.path, c2.address, count=3)
    for owner in owners:
        counters = owner.counters()
        assert counters.encapsulated >= 3, counters
        assert counters.decapsulated >= 3, counters
        assert counters.vni_mismatch == 0
    assert [str(p.address) for p in owners[0].peers()] == [c2.address]

    # A peer on another VNI is never reached, even with the right VTEP.
    owners[0].add_peer(TunnelPeer(c2.address, "10.99.0.2", c2.mac, vni + 1))
    assert _silent(c1.path, c2.address, count=2)
    assert owners[0].counters().vni_mismatch >= 2

    # Removing the peer removes its entry: the frames are no longer tunnelled.
    owners[0].add_peer(TunnelPeer(c2.address, "10.99.0.2", c2.mac, vni))
    assert _pings(c1.path, c2.address, count=1)
    assert owners[0].remove_peer(c2.address)
    assert owners[0].peers() == []
    miss = owners[0].counters().miss
    assert _silent(c1.path, c2.address, count=2)
    assert owners[0].counters().miss >= miss + 2
    for owner in owners:
        owner.close()
        owner.unpin()


# --- several processes on one pin root --------------------------------------------------


def _race_load(root: str, verify_source: bool, start, done, out) -> None:  # type: ignore[no-untyped-def]
    """In a child process: load on the start signal, then report the map it holds and the
    map the pin holds once every racer is done."""
    try:
        owner = RedirectOwner(root, verify_source=verify_source)
        start.wait(10)
        owner.load()
        done.wait(10)
        with loader.Map.from_pin(os.path.join(root, "cnm_redirect", "cnm_endpoints")) as pinned:
            out.put((owner.map("cnm_endpoints").id, pinned.id, owner.picked_up))
        owner.close()
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put(repr(exc))


@pytest.mark.parametrize("reload_config", [False, True])
def test_processes_racing_to_load_share_one_pinned_map(reload_config: bool) -> None:
    """Two processes (a CLI and an agent on one state directory) load the same pin root at
    the same moment: both must end up on the map the pin holds, never on a lost copy.
    With reload_config the second one wants another configuration (a reload that keeps
    the maps)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for _ in range(4):
        root = f"/sys/fs/bpf/cnm-race-{uuid.uuid4().hex[:8]}"
        start, done, out = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_race_load, args=(root, not (reload_config and k), start, done, out))
            for k in range(2)
        ]
        for p in procs:
            p.start()
        try:
            results = [out.get(timeout=60) for _ in procs]
        finally:
            for p in procs:
                p.join(30)
            loader.unpin_dir(os.path.join(root, "cnm_redirect"))
            os.rmdir(root)
        assert all(isinstance(r, tuple) for r in results), results
        pinned = {r[1] for r in results}
        assert len(pinned) == 1
        assert [r[0] for r in results] == [*pinned, *pinned], results
        if not reload_config:
            assert sorted(r[2] for r in results) == [False, True]  # one loaded, one picked up
