"""The owner of cnm_tunnel.bpf.c: the overlay tunnel over one collect-metadata (external)
vxlan device, and its maps (cnm_tun_local, cnm_tun_peers, cnm_tunnel_counters).

One load per host, configured with the vxlan device's ifindex. `attach_endpoint` puts
cnm_tunnel_egress on a container's host-side veth (frames to remote peers get their
tunnel key and go to the vxlan device); `attach_vxlan` puts cnm_tunnel_ingress on the
vxlan device (decapsulated frames go straight into the local container of their VNI).
Local containers are TunnelEndpoints; containers on other hosts are TunnelPeers (address,
remote VTEP, MAC, VNI). Removing a peer removes its map entry, and frames to it fall back
to the stack.

The RX accelerator (optional: without it the same frames take the vxlan device's path):
`set_uplink` names the local VTEP address and the host-namespace end of the port's uplink
veth pair, `attach_decap` puts cnm_tunnel_decap on the host device holding that address
(it decapsulates the frames cnm_tunnel_ingress would deliver and sends them through the
pair) and `attach_uplink` puts cnm_tunnel_uplink on the pair's tunnel-namespace end (it
puts them into their containers). The decap program of each port shares the device's tcx
hook with the other ports' (loader.tc_attach(shared=True)); on clsact it sits at the
priority of its port.

No ARP crosses the tunnel: cnm_tunnel_egress answers a container's ARP request for an
address of its own VNI (local endpoint or remote peer) from the maps, sending the reply
back into the container, so containers need no static neighbour entries (static ones
still work). Requests for unknown addresses or other VNIs get no answer.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cnm.ebpf import errors, loader
from cnm.ebpf.owner import ProgramOwner, ipv4, mac_bytes, mac_text, positive_int

EGRESS = "cnm_tunnel_egress"
INGRESS = "cnm_tunnel_ingress"
DECAP = "cnm_tunnel_decap"
UPLINK = "cnm_tunnel_uplink"
DECAP_CONFIG = "cnm_tun_decap"
UPLINK_MAP = "cnm_tun_uplink"
LOCAL = "cnm_tun_local"
PEERS = "cnm_tun_peers"
COUNTERS = "cnm_tunnel_counters"
VNI_MAX = 2**24 - 1
_LOCAL = struct.Struct("<II6s2x")  # struct cnm_tun_local
_PEER = struct.Struct("<4sI6s2x")  # struct cnm_tun_peer
_DECAP = struct.Struct("<4sI")  # struct cnm_tun_decap
_IFINDEX = struct.Struct("<I")  # a cnm_tun_uplink entry


@dataclass(frozen=True)
class TunnelEndpoint:
    """A container on this host, on the overlay network `vni`."""

    address: ipaddress.IPv4Address | str
    ifindex: int  # its host-side veth, in the namespace of the vxlan device
    mac: str
    vni: int
    _raw: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        addr = ipv4(self.address)
        positive_int(self.ifindex, "ifindex", 2**31 - 1)
        positive_int(self.vni, "vni", VNI_MAX)
        mac = mac_bytes(self.mac)
        object.__setattr__(self, "address", addr)
        object.__setattr__(self, "mac", mac_text(mac))
        object.__setattr__(self, "_raw", (addr.packed, _LOCAL.pack(self.ifindex, self.vni, mac)))

    @classmethod
    def from_raw(cls, key: bytes, value: bytes) -> TunnelEndpoint:
        ifindex, vni, mac = _LOCAL.unpack(value)
        return cls(ipaddress.IPv4Address(key), ifindex, mac_text(mac), vni)


@dataclass(frozen=True)
class TunnelPeer:
    """A container on another host, reached through that host's VTEP."""

    address: ipaddress.IPv4Address | str
    vtep: ipaddress.IPv4Address | str  # the remote host's underlay address
    mac: str
    vni: int
    _raw: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        addr = ipv4(self.address)
        vtep = ipv4(self.vtep, "vtep")
        positive_int(self.vni, "vni", VNI_MAX)
        mac = mac_bytes(self.mac)
        object.__setattr__(self, "address", addr)
        object.__setattr__(self, "vtep", vtep)
        object.__setattr__(self, "mac", mac_text(mac))
        object.__setattr__(self, "_raw", (addr.packed, _PEER.pack(vtep.packed, self.vni, mac)))

    @classmethod
    def from_raw(cls, key: bytes, value: bytes) -> TunnelPeer:
        vtep, vni, mac = _PEER.unpack(value)
        return cls(ipaddress.IPv4Address(key), ipaddress.IPv4Address(vtep), mac_text(mac), vni)


@dataclass(frozen=True)
class UplinkConfig:
    """The RX accelerator's configuration: frames to `vtep` arriving on host device
    `device` go through the uplink pair whose host-namespace end is `uplink` (0: the
    device map lost it, the pair is gone: the accelerator passes every frame on)."""

    vtep: ipaddress.IPv4Address
    uplink: int
    device: int


def _uplink_config(config: Any, uplink: Any) -> UplinkConfig | None:
    raw = config.lookup(bytes(4))
    if raw is None:
        return None
    vtep, device = _DECAP.unpack(raw)
    if vtep == bytes(4):
        return None
    dev = uplink.lookup(bytes(4))
    ifindex = _IFINDEX.unpack(dev)[0] if dev is not None else 0
    return UplinkConfig(ipaddress.IPv4Address(vtep), ifindex, device)


def pinned_uplink(pin_dir: str) -> tuple[loader.Program | None, UplinkConfig | None]:
    """cnm_tunnel_decap and the accelerator's configuration from an owner's pins (without
    loading); (None, None) for what is not pinned. The caller closes the program."""
    path = os.path.join(pin_dir, DECAP)
    if not os.path.exists(path):
        return None, None
    config = None
    if os.path.exists(os.path.join(pin_dir, DECAP_CONFIG)):
        with (
            loader.Map.from_pin(os.path.join(pin_dir, DECAP_CONFIG)) as c,
            loader.Map.from_pin(os.path.join(pin_dir, UPLINK_MAP)) as u,
        ):
            config = _uplink_config(c, u)
    return loader.Program.from_pin(path), config


@dataclass(frozen=True)
class TunnelCounters:
    encapsulated: int  # sent to a remote VTEP
    decapsulated: int  # delivered from the tunnel to a local container
    local: int  # same VNI, same host: delivered directly
    miss: int  # destination unknown: left to the stack
    not_ipv4: int
    unknown_source: int
    vni_mismatch: int  # dropped: source and destination on different VNIs
    failed: int
    arp_replied: int = 0  # ARP requests answered from the maps (the program's own replies)
    decap_fast: int = 0  # decapsulated at the underlay by the accelerator and delivered


class TunnelOwner(ProgramOwner):
    """Loads (or picks up) cnm_tunnel for one vxlan device; endpoints and peers."""

    object_name = "cnm_tunnel"
    program_names = (EGRESS, INGRESS, DECAP, UPLINK)
    map_layouts = {
        LOCAL: (4, _LOCAL.size),
        PEERS: (4, _PEER.size),
        COUNTERS: (4, 8),
        DECAP_CONFIG: (4, _DECAP.size),
        UPLINK_MAP: (4, _IFINDEX.size),
    }
    counter_names = (
        "encapsulated",
        "decapsulated",
        "local",
        "miss",
        "not_ipv4",
        "unknown_source",
        "vni_mismatch",
        "failed",
        "arp_replied",
        "decap_fast",
    )
    counter_map = COUNTERS
    entry_maps = (LOCAL, PEERS)

    def __init__(
        self,
        vxlan_ifindex: int,
        pin_root: str | os.PathLike[str] = loader.DEFAULT_PIN_ROOT,
        *,
        ttl: int = 64,
        verify_source: bool = True,
        port: int = 4789,
        obj_dir: str | os.PathLike[str] | None = None,
        max_entries: int | None = None,
    ) -> None:
        super().__init__(pin_root, obj_dir=obj_dir, max_entries=max_entries)
        self.vxlan_ifindex = positive_int(vxlan_ifindex, "vxlan_ifindex", 2**31 - 1)
        self.ttl = positive_int(ttl, "ttl", 255)
        self.verify_source = bool(verify_source)
        self.port = positive_int(port, "port", 65535)

    def globals(self) -> dict[str, int]:
        return {
            "cnm_vxlan_ifindex": self.vxlan_ifindex,
            "cnm_tunnel_ttl": self.ttl,
            "cnm_verify_source": int(self.verify_source),
            "cnm_vxlan_port": self.port,
        }

    def attach_endpoint(self, ifindex: int, netns: str | None = None) -> None:
        """cnm_tunnel_egress on a container's host-side veth (TC ingress)."""
        self._attach(EGRESS, ifindex, netns, "ingress")

    def attach_vxlan(self, netns: str | None = None, ifindex: int | None = None) -> None:
        """cnm_tunnel_ingress on the vxlan device (TC ingress; its tcx hook where the
        kernel has one: attached once per host, so the per-packet saving is worth the
        attach's RCU wait, see loader.tc_attach)."""
        self._attach(INGRESS, ifindex or self.vxlan_ifindex, netns, "ingress", tcx=True)

    # -- the RX accelerator --------------------------------------------------------------

    def set_uplink(
        self, vtep: ipaddress.IPv4Address | str, uplink_ifindex: int, device: int
    ) -> None:
        """Turn the accelerator on: frames to `vtep` on this port arriving on host device
        `device` go through the uplink pair whose host-namespace end is `uplink_ifindex`
        (an index of the caller's namespace: the device map holds the device itself)."""
        addr = ipv4(vtep, "vtep")
        positive_int(uplink_ifindex, "uplink_ifindex", 2**31 - 1)
        positive_int(device, "device", 2**31 - 1)
        self.map(UPLINK_MAP).update(bytes(4), _IFINDEX.pack(uplink_ifindex))
        self.map(DECAP_CONFIG).update(bytes(4), _DECAP.pack(addr.packed, device))

    def clear_uplink(self) -> None:
        """Turn the accelerator off (cnm_tunnel_decap passes every frame on)."""
        self.map(DECAP_CONFIG).update(bytes(4), bytes(_DECAP.size))
        self.map(UPLINK_MAP).delete(bytes(4))

    def uplink(self) -> UplinkConfig | None:
        """The accelerator's configuration; None when it is off."""
        return _uplink_config(self.map(DECAP_CONFIG), self.map(UPLINK_MAP))

    def attach_decap(self, ifindex: int, netns: str | None = None) -> None:
        """cnm_tunnel_decap on the host device holding the VTEP address (TC ingress; tcx
        where the kernel has it, beside the other ports' decap programs)."""
        loader.tc_attach(
            self.program(DECAP),
            ifindex,
            "ingress",
            netns,
            tcx=True,
            shared=True,
            priority=self.port,
        )

    def detach_decap(self, ifindex: int, netns: str | None = None) -> bool:
        """Take this port's cnm_tunnel_decap off the device (others' stay); False when it
        was not there."""
        return loader.tc_detach(
            ifindex, "ingress", netns, shared_with=self.program(DECAP), priority=self.port
        )

    def decap_attached(self, ifindex: int, netns: str | None = None) -> bool:
        return loader.tc_attached(
            self.program(DECAP), ifindex, "ingress", netns, priority=self.port
        )

    def attach_uplink(self, ifindex: int, netns: str | None = None) -> None:
        """cnm_tunnel_uplink on the uplink pair's tunnel-namespace end (TC ingress)."""
        self._attach(UPLINK, ifindex, netns, "ingress", tcx=True)

    def uplink_attached(self, ifindex: int, netns: str | None = None) -> bool:
        return self._attached(UPLINK, ifindex, netns, "ingress")

    def attached(self, ifindex: int, netns: str | None = None) -> bool:
        program = INGRESS if ifindex == self.vxlan_ifindex else EGRESS
        return self._attached(program, ifindex, netns, "ingress")

    def add_endpoints(self, endpoints: Iterable[TunnelEndpoint]) -> None:
        entries = list(endpoints)
        for ep in entries:
            if not isinstance(ep, TunnelEndpoint):
                raise errors.InvalidArgument(f"not a TunnelEndpoint: {ep!r}")
        self.map(LOCAL).update_batch([ep._raw for ep in entries])

    def add_endpoint(self, endpoint: TunnelEndpoint) -> None:
        self.add_endpoints([endpoint])

    def remove_endpoint(self, address: ipaddress.IPv4Address | str) -> bool:
        return self.map(LOCAL).delete(ipv4(address).packed)

    def endpoints(self) -> list[TunnelEndpoint]:
        return [TunnelEndpoint.from_raw(k, v) for k, v in self.map(LOCAL).items()]

    def add_peers(self, peers: Iterable[TunnelPeer]) -> None:
        entries = list(peers)
        for p in entries:
            if not isinstance(p, TunnelPeer):
                raise errors.InvalidArgument(f"not a TunnelPeer: {p!r}")
        self.map(PEERS).update_batch([p._raw for p in entries])

    def add_peer(self, peer: TunnelPeer) -> None:
        self.add_peers([peer])

    def remove_peer(self, address: ipaddress.IPv4Address | str) -> bool:
        """Forget a remote peer (its frames are no longer tunnelled); False when unknown."""
        return self.map(PEERS).delete(ipv4(address).packed)

    def peers(self) -> list[TunnelPeer]:
        return [TunnelPeer.from_raw(k, v) for k, v in self.map(PEERS).items()]

    def counters(self) -> TunnelCounters:
        return TunnelCounters(**self.counter_values())
