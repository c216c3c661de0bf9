"""Typed records for what dumps return: links, addresses, routes, neighbours.

Owns the mapping from decoded Messages to small frozen dataclasses that say what the
kernel holds in the domain's own terms (names, MACs as text, ipaddress objects).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from . import messages as m
from .messages import Attr, Message


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _ip(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(raw)


def _attrs(attrs: list[Attr]) -> dict[int, Any]:
    return {a.type: a.value for a in attrs}


@dataclass(frozen=True)
class LinkRecord:
    index: int
    name: str
    flags: int
    kind: str | None = None
    mac: str | None = None
    mtu: int | None = None
    master: int | None = None
    group: int = 0
    link_netnsid: int | None = None
    info_data: dict[int, Any] = field(default_factory=dict, compare=False)

    @property
    def up(self) -> bool:
        return bool(self.flags & m.IFF_UP)


@dataclass(frozen=True)
class AddrRecord:
    index: int
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    flags: int
    scope: int


@dataclass(frozen=True)
class RouteRecord:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    oif: int | None
    table: int
    protocol: int
    scope: int
    type: int


@dataclass(frozen=True)
class NeighRecord:
    family: int
    index: int
    state: int
    flags: int
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    lladdr: str | None
    vni: int | None = None


def link_record(msg: Message) -> LinkRecord:
    _, _, index, flags, _ = msg.header
    a = _attrs(msg.attrs)
    kind = None
    info: dict[int, Any] = {}
    linkinfo = a.get(m.IFLA_LINKINFO)
    if linkinfo:
        li = _attrs(linkinfo)
        kind = li.get(m.IFLA_INFO_KIND)
        data = li.get(m.IFLA_INFO_DATA)
        if isinstance(data, list):
            info = _attrs(data)
    mac = a.get(m.IFLA_ADDRESS)
    return LinkRecord(
        index=index,
        name=a.get(m.IFLA_IFNAME, ""),
        flags=flags,
        kind=kind,
        mac=mac_text(mac) if isinstance(mac, bytes) and len(mac) == 6 else None,
        mtu=a.get(m.IFLA_MTU),
        master=a.get(m.IFLA_MASTER),
        group=a.get(m.IFLA_GROUP, 0),
        link_netnsid=a.get(m.IFLA_LINK_NETNSID),
        info_data=info,
    )


def addr_record(msg: Message) -> AddrRecord:
    _, prefixlen, flags, scope, index = msg.header
    a = _attrs(msg.attrs)
    raw = a.get(m.IFA_LOCAL) or a.get(m.IFA_ADDRESS) or b""
    if m.IFA_FLAGS in a:
        flags = a[m.IFA_FLAGS]
    return AddrRecord(index, ipaddress.ip_interface((_ip(raw), prefixlen)), flags, scope)


def route_record(msg: Message) -> RouteRecord:
    family, dst_len, _, _, table, protocol, scope, rtype, _ = msg.header
    a = _attrs(msg.attrs)
    if m.RTA_TABLE in a:
        table = a[m.RTA_TABLE]
    raw_dst = a.get(m.RTA_DST)
    if raw_dst is None:
        raw_dst = bytes(4 if family == m.AF_INET else 16)
    gw = a.get(m.RTA_GATEWAY)
    return RouteRecord(
        dst=ipaddress.ip_network((_ip(raw_dst), dst_len), strict=False),
        gateway=_ip(gw) if gw else None,
        oif=a.get(m.RTA_OIF),
        table=table,
        protocol=protocol,
        scope=scope,
        type=rtype,
    )


def neigh_record(msg: Message) -> NeighRecord:
    family, index, state, flags, _ = msg.header
    a = _attrs(msg.attrs)
    dst = a.get(m.NDA_DST)
    ll = a.get(m.NDA_LLADDR)
    return NeighRecord(
        family=family,
        index=index,
        state=state,
        flags=flags,
        dst=_ip(dst) if isinstance(dst, bytes) and len(dst) in (4, 16) else None,
        lladdr=mac_text(ll) if isinstance(ll, bytes) and ll else None,
        vni=a.get(m.NDA_VNI),
    )
