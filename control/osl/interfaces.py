"""Interfaces inside sandboxes: the container side of every endpoint.

Owns what a join does inside a sandbox and what a leave undoes there: take the
driver's interface (already created inside the sandbox, or moved in from the host),
name it `<prefix><lowest free index>`, set MAC and MTU, add its addresses, bring it up,
install the gateway and static routes, and switch IPv6 off on it when it has no IPv6
address. A host interface to move in is checked first: never the loopback, nor one the
host uses (an address, a default route). Many sandboxes are configured in one
namespace-worker job, one netlink batch each; no process is spawned.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cnm.fastpath import attach, bulk, netns, records, rtnl
from cnm.fastpath.transport import NetlinkError, NetlinkSocket, socket_for

from .. import errors
from .namespace import kernel_error

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_TOMB_PREFIX = "cnmz"
_IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class InterfaceConfig:
    """What a sandbox interface must look like once joined."""

    src_name: str  # the driver's interface, by its current name
    in_sandbox: bool  # True: the driver made it inside the sandbox; False: move it in
    dst_prefix: str = "eth"
    mac: str | None = None
    mtu: int | None = None
    addresses: tuple[IPInterface, ...] = ()
    gateway: IPAddress | None = None
    gateway6: IPAddress | None = None
    routes: tuple[bulk.Route, ...] = ()
    name: str | None = None  # set when src_name is already the final name: no rename


@functools.lru_cache(maxsize=16)
def _numbered(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"(\d+)\Z")


def free_name(existing: set[str], prefix: str) -> str:
    pattern = _numbered(prefix)
    used = {int(m.group(1)) for n in existing if (m := pattern.match(n))}
    i = 0
    while i in used:
        i += 1
    return f"{prefix}{i}"


def _enable_ipv6(name: str) -> None:
    # Runs inside the sandbox (the worker thread's namespace): /proc/sys/net is per netns.
    # Sandboxes start with IPv6 off for new interfaces (osl.namespace); only an interface
    # that gets an IPv6 address turns it back on.
    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
        f.write("0")


def _configure(sock: NetlinkSocket, cfg: InterfaceConfig) -> str:
    """Inside the sandbox: name, address and route the interface; returns its name."""
    if cfg.name is not None and cfg.name == cfg.src_name:
        # Made under its final name (down): only its index is needed. The MAC goes in
        # the message that brings it up (the kernel applies it before the flags), so
        # the batch has as many messages as the floor's: addresses, up, routes. An MTU
        # comes first (an IPv6 address needs the MTU it will live with).
        link = attach.LinkConfig(
            index=sock.ifindex(cfg.name),
            mtu=cfg.mtu,
            addresses=cfg.addresses,
            mac=cfg.mac,
            routes=_routes(cfg),
        )
        attach.configure_link(sock, link).raise_first()
        return cfg.name
    # One dump gives both the interface's index and the names in use.
    dump = sock.dump(rtnl.dump_links())
    links = {rec.name: rec for rec in map(records.link_record, dump)}
    link = links.pop(cfg.src_name, None)
    if link is None:
        raise NetlinkError(errno.ENODEV, f"no interface {cfg.src_name} in the sandbox")
    name = free_name(set(links), cfg.dst_prefix)
    idx = link.index
    reqs = [rtnl.link_set(idx, up=False, name=name, mac=cfg.mac, mtu=cfg.mtu)]
    reqs += [rtnl.addr_add(idx, a) for a in cfg.addresses]
    reqs.append(rtnl.link_set(idx, up=True))
    reqs += [rtnl.route_add(dst, gateway=gw, oif=idx) for dst, gw in _routes(cfg)]
    sock.execute(reqs).raise_first()
    return name


def _routes(cfg: InterfaceConfig) -> tuple[tuple[IPNetwork, IPAddress | None], ...]:
    """The routes of an interface that is up (destination, gateway): its default routes
    through the gateways, then its static routes."""
    return attach.default_routes(cfg.gateway, cfg.gateway6) + tuple(
        (r.destination, r.gateway) for r in cfg.routes
    )


class SandboxInterfaces:
    """Adds and removes endpoint interfaces inside sandboxes."""

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend

    def add(self, items: Sequence[tuple[str, InterfaceConfig]]) -> list[str | errors.CNMError]:
        """Configure interfaces in many sandboxes (key, config), each through the
        sandbox's cached netlink socket from the caller's thread (no namespace hop but
        for an interface that needs IPv6 turned on).

        Returns, per item, the interface's name in its sandbox or the error it met (the
        caller rolls back through the driver, which owns the device). Failing to reach a
        sandbox or to move an interface in raises.
        """
        out: list[str | errors.CNMError] = []
        for key, cfg in items:
            try:
                sock = socket_for(key, backend=self.backend)
                if not cfg.in_sandbox:
                    self._move_in(key, cfg.src_name)
            except NetlinkError as exc:
                raise kernel_error(exc, "move interface into sandbox") from None
            except OSError as exc:
                raise kernel_error(exc, "open sandbox") from None
            try:
                if any(a.version == 6 for a in cfg.addresses):
                    netns.run_in(key, functools.partial(_enable_ipv6, cfg.src_name))
                out.append(_configure(sock, cfg))
            except OSError as exc:
                out.append(kernel_error(exc, f"configure interface in {key}"))
        return out

    def _move_in(self, key: str, name: str) -> None:
        host = socket_for(None, backend=self.backend)
        link = records.link_record(host.get(rtnl.link_get(name)))
        _check_movable(host, link)
        fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
        try:
            host.request(rtnl.link_set(link.index, netns_fd=fd))
        finally:
            os.close(fd)

    def set_default_route(
        self, key: str, ifname: str, gateway: IPAddress | None, gateway6: IPAddress | None
    ) -> None:
        """Make `ifname` the sandbox's default route (replacing any there is)."""

        def job() -> None:
            with NetlinkSocket(backend=self.backend) as sock:
                idx = records.link_record(sock.get(rtnl.link_get(ifname))).index
                reqs = []
                for dst, gw in ((bulk.DEFAULT_V4, gateway), (bulk.DEFAULT_V6, gateway6)):
                    if gw is not None:
                        msg = rtnl.route_add(dst, gateway=gw, oif=idx)
                        reqs.append(msg._replace(flags=rtnl.REPLACE))
                sock.execute(reqs).raise_first()

        try:
            netns.run_in(key, job)
        except OSError as exc:
            raise kernel_error(exc, f"move the default route to {ifname} in {key}") from None

    def retire(self, items: Sequence[tuple[str, str]]) -> list[errors.CNMError | None]:
        """Inside each sandbox (key, interface name): take the interface down, drop its
        addresses and rename it out of the way, so a later join may reuse the name and
        the addresses at once while the device waits for its batched deletion."""
        out: list[errors.CNMError | None] = []
        for key, name in items:
            try:
                _retire(socket_for(key, backend=self.backend), name)
                out.append(None)
            except OSError as exc:
                out.append(kernel_error(exc, f"retire {name} in {key}"))
        return out


def _check_movable(sock: NetlinkSocket, link: records.LinkRecord) -> None:
    """Refuse to move a host interface a driver named (a remote plugin's SrcName) when it
    cannot be a fresh driver interface: the loopback, one with an IP address (but the
    IPv6 link-local address the kernel gives any interface that is up), or one a host
    default route goes through. A buggy plugin naming eth0 must not take the host off
    its network."""
    if link.flags & _IFF_LOOPBACK:
        raise errors.UnsafeInterface(link.name, "it is a loopback interface")
    for msg in sock.dump(rtnl.dump_addrs()):
        addr = records.addr_record(msg)
        if addr.index != link.index:
            continue
        if addr.address.version == 6 and addr.address.ip.is_link_local:
            continue
        raise errors.UnsafeInterface(link.name, f"it has the address {addr.address}")
    for msg in sock.dump(rtnl.dump_routes()):
        route = records.route_record(msg)
        if route.oif == link.index and route.dst.prefixlen == 0:
            raise errors.UnsafeInterface(
                link.name, f"the default route {route.dst} goes through it"
            )


def _retire(sock: NetlinkSocket, name: str) -> None:
    try:
        link = records.link_record(sock.get(rtnl.link_get(name)))
    except NetlinkError as exc:
        if exc.errno == errno.ENODEV:
            return  # already gone
        raise
    addrs = [records.addr_record(m) for m in sock.dump(rtnl.dump_addrs())]
    reqs = [rtnl.link_set(link.index, up=False, name=f"{_TOMB_PREFIX}{link.index:x}"[:15])]
    reqs += [rtnl.addr_del(link.index, a.address) for a in addrs if a.index == link.index]
    sock.execute(reqs).raise_first()
