"""cnm_tunnel's RX accelerator (cnm_tunnel_decap + cnm_tunnel_uplink) against the kernel.

Two hosts (namespaces) on one underlay veth; host 2 laid out as osl.tunnel lays it out:
a tunnel namespace holding the external VXLAN device (its socket on the underlay) and the
container's host end, the uplink veth pair between the host and the tunnel namespace,
cnm_tunnel_decap on the underlay device. Host 1 sends hand-made VXLAN frames from a plain
UDP socket (outer checksum zero or not, ECN marks, VNIs, inner addresses as each case
needs); the container's own socket says what arrived, the counters say which path
carried it: decap_fast (the accelerator) or decapsulated (the VXLAN device's path).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from cnm.ebpf import loader
from cnm.ebpf.tunnel import TunnelCounters, TunnelEndpoint, TunnelOwner, TunnelPeer
from cnm.fastpath import netns

from .test_ebpf import (  # noqa: F401 (fixtures)
    Lab,
    _ifindex,
    _run,
    bpf_ready,
    lab,
    pin_root,
)

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

VNI = 4242
PORT = 4789
SO_NO_CHECK = 11
APP_PORT = 9999
VTEP1, VTEP2 = "10.98.0.1", "10.98.0.2"
PEER_IP, PEER_MAC = "10.51.0.2", "02:00:00:00:51:02"


def _csum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _inner(src: str, dst: str, dst_mac: str, payload: bytes, tos: int = 0) -> bytes:
    """An Ethernet frame carrying IPv4/UDP (checksum 0) to APP_PORT."""
    udp = struct.pack("!HHHH", 40000, APP_PORT, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        tos,
        20 + len(udp),
        0,
        0x4000,
        64,
        17,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(PEER_MAC.replace(":", ""))
    return eth + b"\x08\x00" + ip + udp


def _vxlan(vni: int, inner: bytes) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8) + inner


class Rig:
    """Host 1 (the sender), host 2 (the receiver) with its tunnel namespace, container
    and RX accelerator."""

    def __init__(self, rig_lab: Lab, root: str) -> None:
        self.h1, self.h2 = rig_lab.namespace("h1"), rig_lab.namespace("h2")
        self.tns = rig_lab.namespace("t2")
        h1, h2, tns = str(self.h1), str(self.h2), str(self.tns)
        _run("ip", "link", "add", "u1", "type", "veth", "peer", "name", "u2", "netns", h2, ns=h1)
        for host, dev, addr in ((h1, "u1", VTEP1), (h2, "u2", VTEP2)):
            _run("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=host)
            _run("ip", "link", "set", dev, "up", ns=host)
        vxlan = f"ip link add vxt netns {tns} type vxlan external local {VTEP2} dstport {PORT}"
        _run(*vxlan.split(), ns=h2)
        _run("ip", "link", "set", "vxt", "up", ns=tns)
        self.c = rig_lab.container("c2", "10.51.0.3/24", host=self.tns)
        _run(*f"ip link add vxu type veth peer name vxi netns {tns}".split(), ns=h2)
        _run("ip", "link", "set", "vxu", "up", ns=h2)
        _run("ip", "link", "set", "vxi", "up", ns=tns)
        self.underlay = _ifindex("u2", self.h2)
        self.uplink_end = _ifindex("vxi", self.tns)
        self.owner = TunnelOwner(_ifindex("vxt", self.tns), os.path.join(root, "h2"))
        self.owner.load()
        self.owner.add_endpoint(TunnelEndpoint(self.c.address, self.c.ifindex, self.c.mac, VNI))
        self.owner.add_peer(TunnelPeer(PEER_IP, VTEP1, PEER_MAC, VNI))
        self.owner.attach_endpoint(self.c.ifindex, netns=tns)
        self.owner.attach_vxlan(netns=tns)
        self.owner.attach_uplink(self.uplink_end, netns=tns)
        uplink = _ifindex("vxu", self.h2)
        # The device map resolves the uplink's index in the namespace of the caller.
        netns.run_in(h2, lambda: self.owner.set_uplink(VTEP2, uplink, self.underlay))
        self.owner.attach_decap(self.underlay, netns=h2)
        self.rx = netns.run_in(str(self.c.path), self._listen)

    @staticmethod
    def _listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", APP_PORT))
        s.settimeout(0.5)
        return s

    def send(self, frame: bytes, *, zero_csum: bool = True, tos: int = 0) -> None:
        def sender() -> socket.socket:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        s = netns.run_in(str(self.h1), sender)
        try:
            if zero_csum:
                s.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            if tos:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            s.sendto(frame, (VTEP2, PORT))
        finally:
            s.close()

    def received(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.rx.recv(2048))
            except TimeoutError:
                return got

    def counters(self) -> TunnelCounters:
        return self.owner.counters()

    def close(self) -> None:
        self.rx.close()
        self.owner.close()
        self.owner.unpin()


@pytest.fixture
def rig(lab: Lab, pin_root: str) -> Iterator[Rig]:  # noqa: F811
    r = Rig(lab, pin_root)
    try:
        yield r
    finally:
        r.close()


def _good(rig: Rig, payload: bytes, **kw: object) -> bytes:
    return _vxlan(VNI, _inner(PEER_IP, rig.c.address, "02:00:00:00:00:01", payload, **kw))


def _delta(before: TunnelCounters, after: TunnelCounters) -> dict[str, int]:
    return {k: getattr(after, k) - getattr(before, k) for k in before.__dataclass_fields__}


def test_the_accelerator_takes_what_the_vxlan_path_would_deliver(rig: Rig) -> None:
    before = rig.counters()
    for i in range(3):
        rig.send(_good(rig, b"fast%d" % i))
    assert rig.received() == [b"fast0", b"fast1", b"fast2"]
    moved = _delta(before, rig.counters())
    assert moved["decap_fast"] == 3 and moved["decapsulated"] == 0, moved
    # The device map holds the uplink: the accelerator's configuration reads back.
    config = rig.owner.uplink()
    assert config is not None and str(config.vtep) == VTEP2
    assert config.device == rig.underlay and config.uplink == _ifindex("vxu", rig.h2)


def test_what_it_does_not_take_the_vxlan_path_decides(rig: Rig) -> None:
    cases = {
        # (frame, send options) -> what the VXLAN device's path then does with it
        "outer checksum set": (_good(rig, b"csum"), {"zero_csum": False}, b"csum"),
        "unknown source": (
            _vxlan(VNI, _inner("10.51.0.77", rig.c.address, "02:00:00:00:00:01", b"src")),
            {},
            b"src",
        ),
        "ECN CE outside, ECT inside": (_good(rig, b"ecn", tos=2), {"tos": 3}, b"ecn"),
        "unknown endpoint": (
            _vxlan(VNI, _inner(PEER_IP, "10.51.0.99", "02:00:00:00:00:01", b"x")),
            {},
            None,
        ),
        "another VNI": (
            _vxlan(VNI + 1, _inner(PEER_IP, rig.c.address, "02:00:00:00:00:01", b"y")),
            {},
            None,
        ),
    }
    for name, (frame, options, delivered) in cases.items():
        before = rig.counters()
        rig.send(frame, **options)  # type: ignore[arg-type]
        got = rig.received()
        moved = _delta(before, rig.counters())
        assert moved["decap_fast"] == 0, (name, moved)
        if delivered is not None:
            assert got == [delivered], name
            assert moved["decapsulated"] == 1, (name, moved)
        else:
            assert got == [], name
            assert moved["miss"] + moved["vni_mismatch"] == 1, (name, moved)
    # And the accelerator still takes a good one.
    rig.send(_good(rig, b"again"))
    assert rig.received() == [b"again"]


def test_without_its_program_or_its_uplink_only_speed_changes(rig: Rig) -> None:
    h2 = str(rig.h2)
    # Detached: the frames go through the VXLAN device.
    assert rig.owner.decap_attached(rig.underlay, netns=h2)
    assert rig.owner.detach_decap(rig.underlay, netns=h2)
    assert not rig.owner.decap_attached(rig.underlay, netns=h2)
    assert loader.tc_query(rig.underlay, "ingress", h2) is None
    before = rig.counters()
    rig.send(_good(rig, b"slow"))
    assert rig.received() == [b"slow"]
    moved = _delta(before, rig.counters())
    assert (moved["decap_fast"], moved["decapsulated"]) == (0, 1), moved

    # Attached again but its uplink pair gone: the device map lost the entry.
    rig.owner.attach_decap(rig.underlay, netns=h2)
    _run("ip", "link", "del", "vxu", ns=rig.h2)
    config = rig.owner.uplink()
    assert config is not None and config.uplink == 0
    before = rig.counters()
    rig.send(_good(rig, b"nopair"))
    assert rig.received() == [b"nopair"]
    moved = _delta(before, rig.counters())
    assert (moved["decap_fast"], moved["decapsulated"]) == (0, 1), moved


def test_two_ports_share_the_underlay_hook(rig: Rig, pin_root: str) -> None:  # noqa: F811
    """A second owner (another UDP port) attaches its decap program beside the first:
    neither replaces the other, and each detaches only its own."""
    h2 = str(rig.h2)
    other = TunnelOwner(rig.owner.vxlan_ifindex, os.path.join(pin_root, "other"), port=4790)
    other.load()
    try:
        other.attach_decap(rig.underlay, netns=h2)
        assert other.decap_attached(rig.underlay, netns=h2)
        assert rig.owner.decap_attached(rig.underlay, netns=h2)
        rig.send(_good(rig, b"both"))
        assert rig.received() == [b"both"]
        assert rig.counters().decap_fast >= 1
        assert other.detach_decap(rig.underlay, netns=h2)
        assert not other.decap_attached(rig.underlay, netns=h2)
        assert rig.owner.decap_attached(rig.underlay, netns=h2)
    finally:
        other.close()
        other.unpin()
