"""One container's attach, as two request batches each encoded in a single call.

Owns the two batches of a join that the caller waits for: the host end's (the veth pair
with its peer made inside the container's namespace, then the bridge-port settings) and
the container end's (MTU, addresses, up with its MAC, routes, for a link made under its
final name). With the native backend each batch is laid out by one call into the codec
(`encode_veth_join`, `encode_link_config`), with no Message or Attr object per request;
with the pure-Python backend the generic builders of rtnl make the same requests (the
reference: tests prove the bytes identical). Both go through the socket's batch
semantics (fastpath/transport.py): one send, failures mapped back to their request.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import bulk, rtnl
from .messages import Message
from .transport import BatchResult, NetlinkSocket

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HostEnd:
    """A veth pair's host end and where its peer goes (see rtnl.VethSpec)."""

    name: str
    peer_name: str
    master: int | None = None
    mtu: int | None = None
    group: int | None = None
    queues: int | None = None
    hairpin: bool = False
    isolated: bool = False


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """What a container end made under its final name gets: its MTU, addresses, up with
    its MAC, then routes through it (a route: destination, gateway or None)."""

    index: int
    mtu: int | None = None
    addresses: tuple[IPInterface, ...] = ()
    mac: str | None = None
    routes: tuple[tuple[IPNetwork, IPAddress | None], ...] = ()


def host_end_requests(end: HostEnd, peer_fd: int) -> list[Message]:
    """The host end's batch, built by the generic builders (the reference layout)."""
    reqs = [
        rtnl.veth(
            rtnl.VethSpec(
                name=end.name,
                peer_name=end.peer_name,
                peer_netns_fd=peer_fd,
                master=end.master,
                mtu=end.mtu,
                group=end.group,
                up=True,
                queues=end.queues,
            )
        )
    ]
    if end.hairpin or end.isolated:
        reqs.append(
            rtnl.bridge_port(end.name, hairpin=end.hairpin or None, isolated=end.isolated or None)
        )
    return reqs


def link_config_requests(cfg: LinkConfig) -> list[Message]:
    """The container end's batch, built by the generic builders (the reference layout)."""
    idx = cfg.index
    reqs = [rtnl.link_set(idx, mtu=cfg.mtu)] if cfg.mtu is not None else []
    reqs += [rtnl.addr_add(idx, a) for a in cfg.addresses]
    reqs.append(rtnl.link_set(idx, up=True, mac=cfg.mac))
    reqs += [rtnl.route_add(dst, gateway=gw, oif=idx) for dst, gw in cfg.routes]
    return reqs


def default_routes(
    gateway: IPAddress | None, gateway6: IPAddress | None
) -> tuple[tuple[IPNetwork, IPAddress | None], ...]:
    """The default routes of an interface with these gateways, as LinkConfig.routes."""
    out: list[tuple[IPNetwork, IPAddress | None]] = []
    if gateway is not None:
        out.append((bulk.DEFAULT_V4, gateway))
    if gateway6 is not None:
        out.append((bulk.DEFAULT_V6, gateway6))
    return tuple(out)


def add_host_end(sock: NetlinkSocket, end: HostEnd, peer_fd: int) -> BatchResult:
    """Send the host end's batch through `sock` (the namespace of the host end)."""
    if sock.backend != "native":
        return sock.execute(host_end_requests(end, peer_fd))
    count = 2 if end.hairpin or end.isolated else 1
    encode = sock.codec.encode_veth_join

    def layout(first: int) -> bytes:
        return encode(
            first,
            end.name,
            end.peer_name,
            peer_fd,
            end.master,
            end.mtu,
            end.group,
            end.queues,
            end.hairpin,
            end.isolated,
        )

    return sock.execute_encoded(count, layout, lambda: host_end_requests(end, peer_fd))


def configure_link(sock: NetlinkSocket, cfg: LinkConfig) -> BatchResult:
    """Send the container end's batch through `sock` (the container's namespace)."""
    if sock.backend != "native":
        return sock.execute(link_config_requests(cfg))
    count = (cfg.mtu is not None) + len(cfg.addresses) + 1 + len(cfg.routes)
    addresses = [(a.ip.packed, a.network.prefixlen) for a in cfg.addresses]
    routes = [
        (dst.network_address.packed, dst.prefixlen, None if gw is None else gw.packed)
        for dst, gw in cfg.routes
    ]
    encode = sock.codec.encode_link_config

    def layout(first: int) -> bytes:
        return encode(first, cfg.index, cfg.mtu, addresses, cfg.mac, routes)

    return sock.execute_encoded(count, layout, lambda: link_config_requests(cfg))
