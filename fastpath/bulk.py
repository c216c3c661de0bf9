"""Bulk primitives for the drivers: many containers attached or detached per call.

Owns the batched shapes of the hot path:
- `attach`: N veth pairs, each peer created directly inside its sandbox namespace (named,
  numbered, MAC and MTU set) with the host end's master and up, all in ONE host batch;
  then, in one namespace-worker job, one configuration batch per sandbox (addresses,
  link up, routes). No process, no per-message round trip.
- `delete_group`: every device of an interface group gone in one message (one
  unregister, so the kernel's RCU wait is paid once for the whole group).
- `neighbours` / `fdb`: permanent neighbour and FDB entries added or removed in batches.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import netns, rtnl
from .messages import Message
from .transport import BatchResult, NetlinkError, NetlinkSocket, socket_for

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_V4 = ipaddress.ip_network("0.0.0.0/0")
DEFAULT_V6 = ipaddress.ip_network("::/0")


@dataclass(frozen=True)
class Route:
    destination: IPNetwork
    gateway: IPAddress | None = None  # None: a connected route on the interface


@dataclass(frozen=True)
class Attachment:
    """One container attach: a veth pair into a sandbox, configured inside it."""

    netns_path: str
    host_name: str
    peer_name: str = "eth0"  # must not exist in the sandbox yet
    master: int | None = None
    group: int | None = None
    mtu: int | None = None
    host_mac: str | None = None
    peer_mac: str | None = None
    addresses: tuple[IPInterface, ...] = ()
    gateway: IPAddress | None = None
    gateway6: IPAddress | None = None
    routes: tuple[Route, ...] = ()

    def sandbox_requests(self, idx: int) -> list[Message]:
        """The sandbox-side batch, for the peer's index `idx` there."""
        reqs = [rtnl.addr_add(idx, a) for a in self.addresses]
        reqs.append(rtnl.link_set(idx, up=True))
        if self.gateway is not None:
            reqs.append(rtnl.route_add(DEFAULT_V4, gateway=self.gateway, oif=idx))
        if self.gateway6 is not None:
            reqs.append(rtnl.route_add(DEFAULT_V6, gateway=self.gateway6, oif=idx))
        for r in self.routes:
            reqs.append(rtnl.route_add(r.destination, gateway=r.gateway, oif=idx))
        return reqs


@dataclass
class AttachResult:
    """Per attachment: None (attached and configured) or the first error it met.

    An attachment whose host batch failed has no device; one whose sandbox batch failed
    has its veth pair (delete it by host name or group to roll back).
    """

    errors: dict[int, NetlinkError] = field(default_factory=dict)
    host_batch: BatchResult | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def attach(
    items: Sequence[Attachment], *, backend: str | None = None, host: NetlinkSocket | None = None
) -> AttachResult:
    """Attach many containers: one host batch, then one batch inside each sandbox."""
    result = AttachResult()
    if not items:
        return result
    host = host or socket_for(None, backend=backend)
    fds: list[int] = []
    try:
        for item in items:
            fds.append(os.open(item.netns_path, os.O_RDONLY | os.O_CLOEXEC))
        veths = [
            rtnl.veth(
                rtnl.VethSpec(
                    name=it.host_name,
                    peer_name=it.peer_name,
                    peer_netns_fd=fd,
                    master=it.master,
                    mtu=it.mtu,
                    mac=it.host_mac,
                    peer_mac=it.peer_mac,
                    group=it.group,
                    up=True,
                )
            )
            for it, fd in zip(items, fds, strict=True)
        ]
        result.host_batch = host.execute(veths)
        result.errors.update(result.host_batch.errors)
        todo = [i for i in range(len(items)) if i not in result.errors]

        def configure(k: int) -> BatchResult:
            # Runs in the namespace worker, already inside the k-th sandbox: a socket
            # opened here belongs to that namespace. The peer's index there is looked up
            # by name (the kernel numbers it; a requested peer index needs a host one).
            item = items[todo[k]]
            with NetlinkSocket(backend=host.backend) as sock:
                peer = sock.get(rtnl.link_get(item.peer_name))
                return sock.execute(item.sandbox_requests(peer.header[2]))

        outcomes = netns.each([fds[i] for i in todo], configure)
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, BatchResult):
                if outcome.errors:
                    result.errors[i] = outcome.errors[min(outcome.errors)]
            elif isinstance(outcome, OSError):
                result.errors[i] = NetlinkError(outcome.errno or 0, str(outcome), index=i)
            else:
                raise outcome  # type: ignore[misc]
    finally:
        for fd in fds:
            os.close(fd)
    return result


def delete_group(
    group: int, *, backend: str | None = None, host: NetlinkSocket | None = None
) -> None:
    """Delete every device of `group` in the host namespace with one message."""
    (host or socket_for(None, backend=backend)).request(rtnl.group_del(group))


@dataclass(frozen=True)
class Neighbour:
    ifindex: int
    ip: IPAddress
    mac: str


def neighbours(
    add: Sequence[Neighbour] = (), remove: Sequence[Neighbour] = (), *, sock: NetlinkSocket
) -> BatchResult:
    """Permanent ARP/ND entries added and removed in one batch (removals first)."""
    reqs = [rtnl.neigh_del(n.ifindex, n.ip) for n in remove]
    reqs += [rtnl.neigh_add(n.ifindex, n.ip, n.mac) for n in add]
    return sock.execute(reqs)


@dataclass(frozen=True)
class FdbEntry:
    ifindex: int  # the vxlan device
    mac: str
    vtep: IPAddress
    vni: int | None = None


def fdb(
    add: Sequence[FdbEntry] = (), remove: Sequence[FdbEntry] = (), *, sock: NetlinkSocket
) -> BatchResult:
    """Static FDB entries (AF_BRIDGE, NTF_SELF) added and removed in one batch."""
    reqs = [rtnl.fdb_del(e.ifindex, e.mac, e.vtep, vni=e.vni) for e in remove]
    reqs += [rtnl.fdb_add(e.ifindex, e.mac, e.vtep, vni=e.vni) for e in add]
    return sock.execute(reqs)
