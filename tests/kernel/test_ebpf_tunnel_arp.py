"""cnm_tunnel's ARP responder against the real kernel.

The overlay has no bridge and the containers get no static neighbour entries: every ARP
request a container sends for an address of its VNI is answered by cnm_tunnel_egress
from the maps (reply rewritten in place, sent back into the container). Real pings and
real ARP frames (an AF_PACKET socket inside the container) cross namespaces made here;
the container's own neighbour table and the program's counters say who answered.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from cnm.ebpf.tunnel import TunnelEndpoint, TunnelOwner, TunnelPeer
from cnm.fastpath import netns

from .test_ebpf import (  # noqa: F401 (fixtures)
    Container,
    Lab,
    _ifindex,
    _pings,
    _run,
    bpf_ready,
    lab,
    pin_root,
)

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

VNI = 4242
OTHER_VNI = 4243
ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def _neigh_mac(c: Container, address: str) -> str | None:
    """The MAC the container's neighbour table holds for `address` (None: none known)."""
    out = _run("ip", "-j", "neigh", "show", address, "dev", "eth0", ns=c.path).stdout
    for entry in json.loads(out or "[]"):
        if entry.get("lladdr") and "FAILED" not in entry.get("state", []):
            return str(entry["lladdr"])
    return None


def _arp_frame(src_mac: str, sender: str, target: str, op: int = 1) -> bytes:
    mac = bytes.fromhex(src_mac.replace(":", ""))
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
    arp += mac + socket.inet_aton(sender) + bytes(6) + socket.inet_aton(target)
    return eth + arp


def _arp_ask(c: Container, sender: str, target: str, op: int = 1) -> bytes | None:
    """Send one ARP frame out of the container's eth0 (sender address `sender`, which
    need not be its own) and return the ARP reply for `target` it gets, or None."""

    def ask() -> bytes | None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
            s.bind(("eth0", ETH_P_ARP))
            s.settimeout(0.5)
            s.send(_arp_frame(c.mac, sender, target, op))
            try:
                while True:
                    frame, where = s.recvfrom(2048)
                    if where[2] == socket.PACKET_OUTGOING:
                        continue
                    is_reply = len(frame) >= 42 and frame[20:22] == b"\x00\x02"
                    if is_reply and frame[28:32] == socket.inet_aton(target):
                        return frame
            except TimeoutError:
                return None

    return netns.run_in(str(c.path), ask)


class Hosts:
    """Two hosts on one underlay, each with an external vxlan device and its own
    TunnelOwner (no bridge: the containers' host ends sit in the host namespace)."""

    def __init__(self, where: Lab, pins: str) -> None:
        self.lab = where
        self.h = [where.namespace("h1"), where.namespace("h2")]
        self.vteps = ["10.98.0.1", "10.98.0.2"]
        h1, h2 = self.h
        _run(
            "ip", "link", "add", "u1", "type", "veth", "peer", "name", "u2", "netns", str(h2), ns=h1
        )
        for host, dev, vtep in zip(self.h, ("u1", "u2"), self.vteps, strict=True):
            _run("ip", "addr", "add", f"{vtep}/24", "dev", dev, ns=host)
            _run("ip", "link", "set", dev, "up", ns=host)
            _run(
                "ip", "link", "add", "vx0", "type", "vxlan", "external", "dstport", "4789", ns=host
            )
            _run("ip", "link", "set", "vx0", "up", ns=host)
        self.owners: list[TunnelOwner] = []
        for host in self.h:
            owner = TunnelOwner(_ifindex("vx0", host), os.path.join(pins, host.name))
            owner.load()
            owner.attach_vxlan(netns=str(host))
            self.owners.append(owner)

    def container(self, k: int, name: str, address: str, vni: int = VNI) -> Container:
        """A container on host k, known to its host's program and as a peer to the other."""
        c = self.lab.container(name, f"{address}/24", host=self.h[k])
        self.owners[k].add_endpoint(TunnelEndpoint(c.address, c.ifindex, c.mac, vni))
        self.owners[1 - k].add_peer(TunnelPeer(c.address, self.vteps[k], c.mac, vni))
        self.owners[k].attach_endpoint(c.ifindex, netns=str(self.h[k]))
        return c

    def close(self) -> None:
        for owner in self.owners:
            owner.close()
            owner.unpin()


@pytest.fixture
def hosts(lab: Lab, pin_root: str) -> Iterator[Hosts]:  # noqa: F811
    h = Hosts(lab, pin_root)
    try:
        yield h
    finally:
        h.close()


def test_arp_is_answered_and_pings_cross_the_tunnel(hosts: Hosts) -> None:
    c1 = hosts.container(0, "a1", "10.51.0.2")
    c2 = hosts.container(1, "a2", "10.51.0.3")
    assert _neigh_mac(c1, c2.address) is None

    assert _pings(c1.path, c2.address, count=3)
    # Both sides resolved the other through the program's reply.
    assert _neigh_mac(c1, c2.address) == c2.mac
    assert _neigh_mac(c2, c1.address) == c1.mac
    for owner in hosts.owners:
        counters = owner.counters()
        assert counters.arp_replied >= 1, counters
        assert counters.encapsulated >= 3, counters
        assert counters.decapsulated >= 3, counters
        assert counters.vni_mismatch == 0, counters

    # The reply itself: op 2, from c2's address and MAC, to c1's.
    reply = _arp_ask(c1, c1.address, c2.address)
    assert reply is not None
    mac = {c.address: bytes.fromhex(c.mac.replace(":", "")) for c in (c1, c2)}
    assert reply[0:6] == mac[c1.address] and reply[6:12] == mac[c2.address]
    assert reply[12:14] == b"\x08\x06"
    assert struct.unpack("!HHBBH", reply[14:22]) == (1, 0x0800, 6, 4, 2)
    assert reply[22:28] == mac[c2.address]
    assert reply[28:32] == socket.inet_aton(c2.address)
    assert reply[32:38] == mac[c1.address]
    assert reply[38:42] == socket.inet_aton(c1.address)


def test_arp_for_another_vni_unknown_or_spoofed_gets_no_reply(hosts: Hosts) -> None:
    c1 = hosts.container(0, "b1", "10.52.0.2")
    hosts.container(1, "b2", "10.52.0.3")
    other_local = hosts.container(0, "b3", "10.52.0.4", vni=OTHER_VNI)
    other_remote = hosts.container(1, "b4", "10.52.0.5", vni=OTHER_VNI)
    owner = hosts.owners[0]

    before = owner.counters()
    for target in (other_local, other_remote):
        assert _arp_ask(c1, c1.address, target.address) is None
        assert not _pings(c1.path, target.address, count=1)
        assert _neigh_mac(c1, target.address) is None
    after = owner.counters()
    assert after.arp_replied == before.arp_replied
    assert after.vni_mismatch >= before.vni_mismatch + 4

    # Nobody has the address: no reply, counted as a miss.
    assert _arp_ask(c1, c1.address, "10.52.0.99") is None
    assert owner.counters().miss >= after.miss + 1
    # A sender address that is not the port's endpoint (another container's), a
    # gratuitous ARP and a reply are never answered either.
    replied = owner.counters().arp_replied
    assert _arp_ask(c1, other_local.address, "10.52.0.3") is None
    assert _arp_ask(c1, "10.52.0.77", "10.52.0.3") is None
    assert _arp_ask(c1, c1.address, c1.address) is None
    assert _arp_ask(c1, c1.address, "10.52.0.3", op=2) is None
    assert owner.counters().arp_replied == replied
    assert owner.counters().unknown_source >= 2
    # The same VNI is still answered.
    assert _arp_ask(c1, c1.address, "10.52.0.3") is not None
    assert owner.counters().arp_replied == replied + 1


def test_same_host_containers_resolve_and_reach_each_other(hosts: Hosts) -> None:
    c1 = hosts.container(0, "l1", "10.53.0.2")
    c2 = hosts.container(0, "l2", "10.53.0.3")
    assert _pings(c1.path, c2.address, count=3)
    assert _neigh_mac(c1, c2.address) == c2.mac
    assert _neigh_mac(c2, c1.address) == c1.mac
    counters = hosts.owners[0].counters()
    assert counters.arp_replied >= 2, counters
    assert counters.local >= 6, counters  # requests and replies
    assert counters.encapsulated == 0, counters


def test_removed_peer_is_no_longer_answered(hosts: Hosts) -> None:
    c1 = hosts.container(0, "r1", "10.54.0.2")
    c2 = hosts.container(1, "r2", "10.54.0.3")
    assert _arp_ask(c1, c1.address, c2.address) is not None
    assert hosts.owners[0].remove_peer(c2.address)
    assert _arp_ask(c1, c1.address, c2.address) is None
