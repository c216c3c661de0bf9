"""Interfaces inside sandboxes: the container side of every endpoint.

Owns what a join does inside a sandbox and what a leave undoes there: take the
driver's interface (already created inside the sandbox, or moved in from the host),
name it `<prefix><lowest free index>`, set MAC and MTU, add its addresses, bring it up,
install the gateway and static routes, and switch IPv6 off on it when it has no IPv6
address. Many sandboxes are configured in one namespace-worker job, one netlink batch
each; no process is spawned.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cnm.fastpath import bulk, netns, records, rtnl
from cnm.fastpath.transport import NetlinkError, NetlinkSocket, socket_for

from .. import errors
from .namespace import kernel_error

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_TOMB_PREFIX = "cnmz"


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


def _free_name(existing: set[str], prefix: str) -> str:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\Z")
    used = {int(m.group(1)) for n in existing if (m := pattern.match(n))}
    i = 0
    while i in used:
        i += 1
    return f"{prefix}{i}"


def _set_ipv6_disabled(name: str) -> None:
    # Runs inside the sandbox (the worker thread's namespace): /proc/sys/net is per netns.
    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
        f.write("1")


def _configure(sock: NetlinkSocket, cfg: InterfaceConfig) -> str:
    """Inside the sandbox: name, address and route the interface; returns its name."""
    # One dump gives both the interface's index and the names in use.
    links = {rec.name: rec for rec in map(records.link_record, sock.dump(rtnl.dump_links()))}
    link = links.pop(cfg.src_name, None)
    if link is None:
        raise NetlinkError(errno.ENODEV, f"no interface {cfg.src_name} in the sandbox")
    name = _free_name(set(links), cfg.dst_prefix)
    idx = link.index
    reqs = [rtnl.link_set(idx, up=False, name=name, mac=cfg.mac, mtu=cfg.mtu)]
    reqs += [rtnl.addr_add(idx, a) for a in cfg.addresses]
    reqs.append(rtnl.link_set(idx, up=True))
    if cfg.gateway is not None:
        reqs.append(rtnl.route_add(bulk.DEFAULT_V4, gateway=cfg.gateway, oif=idx))
    if cfg.gateway6 is not None:
        reqs.append(rtnl.route_add(bulk.DEFAULT_V6, gateway=cfg.gateway6, oif=idx))
    for r in cfg.routes:
        reqs.append(rtnl.route_add(r.destination, gateway=r.gateway, oif=idx))
    sock.execute(reqs).raise_first()
    if not any(a.version == 6 for a in cfg.addresses):
        with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
            _set_ipv6_disabled(name)
    return name


class SandboxInterfaces:
    """Adds and removes endpoint interfaces inside sandboxes."""

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend

    def add(self, items: Sequence[tuple[str, InterfaceConfig]]) -> list[str | errors.CNMError]:
        """Configure interfaces in many sandboxes (key, config) in one worker job.

        Returns, per item, the interface's name in its sandbox or the error it met (the
        caller rolls back through the driver, which owns the device).
        """
        out: list[str | errors.CNMError] = []
        fds: list[int] = []
        try:
            for key, cfg in items:
                fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(fd)
                if not cfg.in_sandbox:
                    host = socket_for(None, backend=self.backend)
                    link = records.link_record(host.get(rtnl.link_get(cfg.src_name)))
                    host.request(rtnl.link_set(link.index, netns_fd=fd))

            def configure(k: int) -> str:
                with NetlinkSocket(backend=self.backend) as sock:
                    return _configure(sock, items[k][1])

            for (key, _), outcome in zip(items, netns.each(fds, configure), strict=True):
                if isinstance(outcome, OSError):
                    out.append(kernel_error(outcome, f"configure interface in {key}"))
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    out.append(outcome)
        except NetlinkError as exc:
            raise kernel_error(exc, "move interface into sandbox") from None
        except OSError as exc:
            raise kernel_error(exc, "open sandbox") from None
        finally:
            for fd in fds:
                os.close(fd)
        return out

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
        fds: list[int] = []
        try:
            for key, _ in items:
                fds.append(os.open(key, os.O_RDONLY | os.O_CLOEXEC))

            def retire(k: int) -> None:
                name = items[k][1]
                with NetlinkSocket(backend=self.backend) as sock:
                    try:
                        link = records.link_record(sock.get(rtnl.link_get(name)))
                    except NetlinkError as exc:
                        if exc.errno == errno.ENODEV:
                            return  # already gone
                        raise
                    addrs = [records.addr_record(m) for m in sock.dump(rtnl.dump_addrs())]
                    reqs = [
                        rtnl.link_set(
                            link.index, up=False, name=f"{_TOMB_PREFIX}{link.index:x}"[:15]
                        )
                    ]
                    reqs += [
                        rtnl.addr_del(link.index, a.address) for a in addrs if a.index == link.index
                    ]
                    sock.execute(reqs).raise_first()

            outcomes = netns.each(fds, retire)
        except OSError as exc:
            raise kernel_error(exc, "open sandbox") from None
        finally:
            for fd in fds:
                os.close(fd)
        return [
            kernel_error(o, f"retire {items[i][1]} in {items[i][0]}")
            if isinstance(o, OSError)
            else None
            for i, o in enumerate(outcomes)
        ]
