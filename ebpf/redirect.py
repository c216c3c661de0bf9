"""The owner of cnm_redirect.bpf.c: same-host redirect between containers of a bridge
network, and its maps (cnm_endpoints, cnm_redirect_counters).

One program per host, attached at TC ingress of every container's host-side veth. The
endpoint map holds every local container (address -> its host-side veth, MAC, network
tag, ICC). A frame goes straight into the destination's namespace only when both ends
are known, the source came in on its own port, both are on the same network and that
network allows inter-container traffic; anything else is left to the bridge.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cnm.ebpf import errors, loader
from cnm.ebpf.owner import ProgramOwner, ipv4, mac_bytes, mac_text, positive_int

PROGRAM = "cnm_redirect_ingress"
ENDPOINTS = "cnm_endpoints"
COUNTERS = "cnm_redirect_counters"
EP_ICC = 0x1
_VALUE = struct.Struct("<III6s6s")  # struct cnm_endpoint


def network_tag(network_id: str) -> int:
    """A 32-bit tag for a network id (equal ids, equal tags). Callers may assign their own
    tags instead; only equality matters to the program."""
    return int.from_bytes(hashlib.blake2s(network_id.encode(), digest_size=4).digest(), "big")


@dataclass(frozen=True)
class RedirectEndpoint:
    """One local container as the program sees it."""

    address: ipaddress.IPv4Address | str
    ifindex: int  # its host-side veth, in the namespace where the program is attached
    mac: str  # the container's MAC
    network: int  # the network's tag (see network_tag)
    icc: bool = True  # the network allows inter-container communication
    source_mac: str | None = None  # written as the frame's source; None keeps the sender's
    _raw: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        addr = ipv4(self.address)
        positive_int(self.ifindex, "ifindex", 2**31 - 1)
        positive_int(self.network, "network tag", low=0)
        if not isinstance(self.icc, bool):
            raise errors.InvalidArgument(f"icc must be a bool, not {self.icc!r}")
        mac = mac_bytes(self.mac)
        src = mac_bytes(self.source_mac, "source_mac")
        object.__setattr__(self, "address", addr)
        object.__setattr__(self, "mac", mac_text(mac))
        flags = EP_ICC if self.icc else 0
        value = _VALUE.pack(self.ifindex, self.network, flags, mac, src)
        object.__setattr__(self, "_raw", (addr.packed, value))

    @classmethod
    def from_raw(cls, key: bytes, value: bytes) -> RedirectEndpoint:
        ifindex, network, flags, mac, src = _VALUE.unpack(value)
        return cls(
            ipaddress.IPv4Address(key),
            ifindex,
            mac_text(mac),
            network,
            bool(flags & EP_ICC),
            None if src == bytes(6) else mac_text(src),
        )


@dataclass(frozen=True)
class RedirectCounters:
    redirected: int  # frames the program handed to the destination container
    miss: int  # destination not a local endpoint
    policy: int  # other network or ICC off: left to the bridge
    not_ipv4: int
    unknown_source: int
    redirect_failed: int

    @property
    def passed(self) -> int:
        """Frames left to the bridge."""
        return self.miss + self.policy + self.not_ipv4 + self.unknown_source


class RedirectOwner(ProgramOwner):
    """Loads (or picks up) cnm_redirect, attaches it to container ports, fills its map."""

    object_name = "cnm_redirect"
    program_names = (PROGRAM,)
    map_layouts = {ENDPOINTS: (4, _VALUE.size), COUNTERS: (4, 8)}
    counter_names = (
        "redirected",
        "miss",
        "policy",
        "not_ipv4",
        "unknown_source",
        "redirect_failed",
    )
    counter_map = COUNTERS
    entry_maps = (ENDPOINTS,)

    def __init__(
        self,
        pin_root: str | os.PathLike[str] = loader.DEFAULT_PIN_ROOT,
        *,
        verify_source: bool = True,
        obj_dir: str | os.PathLike[str] | None = None,
        max_entries: int | None = None,
    ) -> None:
        super().__init__(pin_root, obj_dir=obj_dir, max_entries=max_entries)
        self.verify_source = bool(verify_source)

    def globals(self) -> dict[str, int]:
        return {"cnm_verify_source": int(self.verify_source)}

    def attach(self, ifindex: int, netns: str | None = None) -> None:
        """Attach to a container's host-side veth (TC ingress) in the namespace at `netns`
        (None: the calling thread's)."""
        self._attach(PROGRAM, ifindex, netns, "ingress")

    def attached(self, ifindex: int, netns: str | None = None) -> bool:
        return self._attached(PROGRAM, ifindex, netns, "ingress")

    def add_endpoint(self, endpoint: RedirectEndpoint) -> None:
        self.add_endpoints([endpoint])

    def add_endpoints(self, endpoints: Iterable[RedirectEndpoint]) -> None:
        """Add or replace entries, in one batch."""
        entries = list(endpoints)
        for ep in entries:
            if not isinstance(ep, RedirectEndpoint):
                raise errors.InvalidArgument(f"not a RedirectEndpoint: {ep!r}")
        self.map(ENDPOINTS).update_batch([ep._raw for ep in entries])

    def remove_endpoint(self, address: ipaddress.IPv4Address | str) -> bool:
        """Forget one endpoint; False when it was not there."""
        return self.map(ENDPOINTS).delete(ipv4(address).packed)

    def remove_endpoints(self, addresses: Iterable[ipaddress.IPv4Address | str]) -> int:
        keys = [ipv4(a).packed for a in addresses]
        return self.map(ENDPOINTS).delete_batch(keys)

    def endpoint(self, address: ipaddress.IPv4Address | str) -> RedirectEndpoint | None:
        key = ipv4(address).packed
        value = self.map(ENDPOINTS).lookup(key)
        return None if value is None else RedirectEndpoint.from_raw(key, value)

    def endpoints(self) -> list[RedirectEndpoint]:
        return [RedirectEndpoint.from_raw(k, v) for k, v in self.map(ENDPOINTS).items()]

    def counters(self) -> RedirectCounters:
        return RedirectCounters(**self.counter_values())
