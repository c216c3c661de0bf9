"""Request builders: typed arguments in, rtnetlink Messages out.

Owns how each operation the drivers need is spelled in netlink: veth pairs whose peer
is created (and named, and numbered) directly inside another namespace, bridges, vxlan
devices, link changes (up/down, master, MTU, MAC, name, group, namespace), group delete,
addresses, routes, permanent neighbours and bridge FDB entries, and the dump requests.
Sequence numbers are filled in by the transport.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from . import messages as m
from .messages import Attr, Message

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CREATE = m.NLM_F_REQUEST | m.NLM_F_CREATE | m.NLM_F_EXCL
REPLACE = m.NLM_F_REQUEST | m.NLM_F_CREATE | m.NLM_F_REPLACE
REQUEST = m.NLM_F_REQUEST
DUMP = m.NLM_F_REQUEST | m.NLM_F_DUMP


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def _family(version: int) -> int:
    return m.AF_INET if version == 4 else m.AF_INET6


def _link_attrs(
    *,
    name: str | None = None,
    mtu: int | None = None,
    mac: str | None = None,
    master: int | None = None,
    group: int | None = None,
    netns_fd: int | None = None,
) -> list[Attr]:
    attrs: list[Attr] = []
    if name is not None:
        attrs.append(Attr(m.IFLA_IFNAME, m.STR, name))
    if mtu is not None:
        attrs.append(Attr(m.IFLA_MTU, m.U32, mtu))
    if mac is not None:
        attrs.append(Attr(m.IFLA_ADDRESS, m.BYTES, mac_bytes(mac)))
    if master is not None:
        attrs.append(Attr(m.IFLA_MASTER, m.U32, master))
    if group is not None:
        attrs.append(Attr(m.IFLA_GROUP, m.U32, group))
    if netns_fd is not None:
        attrs.append(Attr(m.IFLA_NET_NS_FD, m.U32, netns_fd))
    return attrs


def _ifinfo(index: int = 0, up: bool | None = None) -> tuple[int, int, int, int, int]:
    flags = m.IFF_UP if up else 0
    change = m.IFF_UP if up is not None else 0
    return (m.AF_UNSPEC, 0, index, flags, change)


# --- links ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VethSpec:
    """One veth pair: the host end here, the peer made directly inside `peer_netns_fd`.

    `ifindex` / `peer_ifindex` (0: the kernel's choice) number the two ends. The kernel
    honours a peer index only when the host end's index is given too.

    `queues`: the TX and RX queues both ends are made with (None: the kernel's default,
    one per possible CPU allocated, of which it then keeps one in use). A veth made
    with as many queues as it will use (1, what the default leaves in use) spares the
    kernel cutting them down after registration, which waits for an RCU grace period
    (synchronize_net) under the rtnl lock, once per end.
    """

    name: str
    peer_name: str
    peer_netns_fd: int
    peer_ifindex: int = 0
    ifindex: int = 0
    master: int | None = None
    mtu: int | None = None
    mac: str | None = None
    peer_mac: str | None = None
    group: int | None = None
    up: bool = True
    queues: int | None = None


def _queues(count: int | None) -> list[Attr]:
    if count is None:
        return []
    return [Attr(m.IFLA_NUM_TX_QUEUES, m.U32, count), Attr(m.IFLA_NUM_RX_QUEUES, m.U32, count)]


def veth(spec: VethSpec) -> Message:
    if spec.peer_ifindex and not spec.ifindex:
        raise ValueError("a veth peer index is only honoured with the host end's index set")
    peer_attrs = _link_attrs(
        name=spec.peer_name, mtu=spec.mtu, mac=spec.peer_mac, netns_fd=spec.peer_netns_fd
    )
    peer = (_ifinfo(spec.peer_ifindex), peer_attrs + _queues(spec.queues))
    attrs = _link_attrs(
        name=spec.name, mtu=spec.mtu, mac=spec.mac, master=spec.master, group=spec.group
    )
    attrs += _queues(spec.queues)
    attrs.append(
        Attr(
            m.IFLA_LINKINFO,
            m.NESTED,
            [
                Attr(m.IFLA_INFO_KIND, m.STR, "veth"),
                Attr(m.IFLA_INFO_DATA, m.NESTED, [Attr(m.VETH_INFO_PEER, m.IFINFO, peer)]),
            ],
        )
    )
    return Message(m.RTM_NEWLINK, CREATE, 0, 0, _ifinfo(spec.ifindex, spec.up or None), attrs)


def bridge(
    name: str,
    *,
    mtu: int | None = None,
    mac: str | None = None,
    up: bool = True,
    ageing_time: int | None = None,
    group: int | None = None,
) -> Message:
    data: list[Attr] = []
    if ageing_time is not None:
        data.append(Attr(m.IFLA_BR_AGEING_TIME, m.U32, ageing_time))
    info = [Attr(m.IFLA_INFO_KIND, m.STR, "bridge")]
    if data:
        info.append(Attr(m.IFLA_INFO_DATA, m.NESTED, data))
    attrs = _link_attrs(name=name, mtu=mtu, mac=mac, group=group)
    attrs.append(Attr(m.IFLA_LINKINFO, m.NESTED, info))
    return Message(m.RTM_NEWLINK, CREATE, 0, 0, _ifinfo(0, up or None), attrs)


@dataclass(frozen=True)
class VxlanSpec:
    name: str
    vni: int | None = None  # None with external=True: collect-metadata device
    local: IPAddress | None = None
    port: int = 4789
    learning: bool = False
    external: bool = False
    ttl: int | None = None
    ageing: int | None = None
    dev: int | None = None  # underlay link index
    mtu: int | None = None
    master: int | None = None
    up: bool = True
    proxy: bool = False  # answer ARP/ND from the device's neighbour table
    # The outer UDP checksum over IPv4: off, as RFC 7348 recommends and Docker's overlay
    # sets it (the kernel's default when the attribute is absent is on).
    udp_csum: bool = False
    netns_fd: int | None = None  # made inside this namespace; its UDP socket stays here


def vxlan(spec: VxlanSpec) -> Message:
    data: list[Attr] = []
    if spec.vni is not None:
        data.append(Attr(m.IFLA_VXLAN_ID, m.U32, spec.vni))
    if spec.local is not None:
        kind = m.IFLA_VXLAN_LOCAL if spec.local.version == 4 else m.IFLA_VXLAN_LOCAL6
        data.append(Attr(kind, m.BYTES, spec.local.packed))
    if spec.dev is not None:
        data.append(Attr(m.IFLA_VXLAN_LINK, m.U32, spec.dev))
    data.append(Attr(m.IFLA_VXLAN_PORT, m.BE16, spec.port))
    data.append(Attr(m.IFLA_VXLAN_LEARNING, m.U8, int(spec.learning)))
    data.append(Attr(m.IFLA_VXLAN_UDP_CSUM, m.U8, int(spec.udp_csum)))
    if spec.ttl is not None:
        data.append(Attr(m.IFLA_VXLAN_TTL, m.U8, spec.ttl))
    if spec.ageing is not None:
        data.append(Attr(m.IFLA_VXLAN_AGEING, m.U32, spec.ageing))
    if spec.external:
        data.append(Attr(m.IFLA_VXLAN_COLLECT_METADATA, m.U8, 1))
    if spec.proxy:
        data.append(Attr(m.IFLA_VXLAN_PROXY, m.U8, 1))
    attrs = _link_attrs(name=spec.name, mtu=spec.mtu, master=spec.master, netns_fd=spec.netns_fd)
    attrs.append(
        Attr(
            m.IFLA_LINKINFO,
            m.NESTED,
            [
                Attr(m.IFLA_INFO_KIND, m.STR, "vxlan"),
                Attr(m.IFLA_INFO_DATA, m.NESTED, data),
            ],
        )
    )
    return Message(m.RTM_NEWLINK, CREATE, 0, 0, _ifinfo(0, spec.up or None), attrs)


def link_set(
    index: int,
    *,
    up: bool | None = None,
    name: str | None = None,
    mtu: int | None = None,
    mac: str | None = None,
    master: int | None = None,
    group: int | None = None,
    netns_fd: int | None = None,
) -> Message:
    """Change a link: up/down, rename, MTU, MAC, master (0 = none), group, or namespace."""
    attrs = _link_attrs(name=name, mtu=mtu, mac=mac, master=master, group=group, netns_fd=netns_fd)
    return Message(m.RTM_NEWLINK, REQUEST, 0, 0, _ifinfo(index, up), attrs)


def bridge_port(name: str, *, hairpin: bool | None = None, isolated: bool | None = None) -> Message:
    """Settings of a bridge port, by its name: hairpin mode, isolation (no traffic to
    other isolated ports: how a bridge keeps its containers apart)."""
    data: list[Attr] = []
    if hairpin is not None:
        data.append(Attr(m.IFLA_BRPORT_MODE, m.U8, int(hairpin)))
    if isolated is not None:
        data.append(Attr(m.IFLA_BRPORT_ISOLATED, m.U8, int(isolated)))
    attrs = [
        Attr(m.IFLA_IFNAME, m.STR, name),
        Attr(m.IFLA_LINKINFO, m.NESTED, [Attr(m.IFLA_INFO_SLAVE_DATA, m.NESTED, data)]),
    ]
    return Message(m.RTM_NEWLINK, REQUEST, 0, 0, _ifinfo(), attrs)


def clsact(ifindex: int) -> Message:
    """Add the clsact qdisc (the hook for TC BPF programs) to a link; EEXIST when it has
    one already."""
    header = (m.AF_UNSPEC, ifindex, 0xFFFF0000, m.TC_H_CLSACT, 0)
    return Message(m.RTM_NEWQDISC, CREATE, 0, 0, header, [Attr(m.TCA_KIND, m.STR, "clsact")])


def bpf_filter(
    ifindex: int, prog_fd: int, name: str, *, ingress: bool = True, prio: int = 1, handle: int = 1
) -> Message:
    """Attach a loaded SCHED_CLS program (by fd) in direct-action mode to the link's
    clsact hook, replacing the filter at (prio, handle) if there is one."""
    parent = (m.TC_H_CLSACT & 0xFFFF0000) | (m.TC_H_MIN_INGRESS if ingress else m.TC_H_MIN_EGRESS)
    info = (prio << 16) | socket.htons(m.ETH_P_ALL)
    options = [
        Attr(m.TCA_BPF_FD, m.U32, prog_fd),
        Attr(m.TCA_BPF_NAME, m.STR, name),
        Attr(m.TCA_BPF_FLAGS, m.U32, m.TCA_BPF_FLAG_ACT_DIRECT),
    ]
    attrs = [Attr(m.TCA_KIND, m.STR, "bpf"), Attr(m.TCA_OPTIONS, m.NESTED, options)]
    return Message(
        m.RTM_NEWTFILTER, REPLACE, 0, 0, (m.AF_UNSPEC, ifindex, handle, parent, info), attrs
    )


def link_get(name: str) -> Message:
    """One link by name (answered with an RTM_NEWLINK, or an error)."""
    return Message(m.RTM_GETLINK, REQUEST, 0, 0, _ifinfo(), [Attr(m.IFLA_IFNAME, m.STR, name)])


def link_set_by_name(
    name: str, *, up: bool | None = None, master: int | None = None, group: int | None = None
) -> Message:
    """Change a link found by its name (no index look-up needed; renaming needs one)."""
    attrs = [Attr(m.IFLA_IFNAME, m.STR, name)]
    attrs += _link_attrs(master=master, group=group)
    return Message(m.RTM_NEWLINK, REQUEST, 0, 0, _ifinfo(0, up), attrs)


IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1  # inside IFLA_AF_SPEC / AF_INET: the device's IPv4 settings
IPV4_DEVCONF_FORWARDING = 1
IPV4_DEVCONF_PROXY_ARP = 3


def link_inet_conf(name: str, conf: dict[int, int]) -> Message:
    """Per-device IPv4 settings (net.ipv4.conf.<name>.*, by IPV4_DEVCONF_* id) of a link
    found by its name, set through netlink (no /proc write, batchable)."""
    inet = [Attr(key, m.U32, value) for key, value in sorted(conf.items())]
    attrs = [
        Attr(m.IFLA_IFNAME, m.STR, name),
        Attr(
            IFLA_AF_SPEC,
            m.NESTED,
            [Attr(m.AF_INET, m.NESTED, [Attr(IFLA_INET_CONF, m.NESTED, inet)])],
        ),
    ]
    return Message(m.RTM_NEWLINK, REQUEST, 0, 0, _ifinfo(), attrs)


def link_del(index: int = 0, *, name: str | None = None) -> Message:
    attrs = [Attr(m.IFLA_IFNAME, m.STR, name)] if name is not None else []
    return Message(m.RTM_DELLINK, REQUEST, 0, 0, _ifinfo(index), attrs)


def group_del(group: int) -> Message:
    """Delete every link of `group` in one message: one unregister, one RCU wait."""
    if group <= 0:
        raise ValueError("group 0 is every device's default group: refusing to delete it")
    return Message(m.RTM_DELLINK, REQUEST, 0, 0, _ifinfo(0), [Attr(m.IFLA_GROUP, m.U32, group)])


# --- addresses and routes ------------------------------------------------------------


def _addr(mtype: int, flags: int, index: int, iface: IPInterface, nodad: bool) -> Message:
    ip = iface.ip
    version = ip.version
    prefixlen = iface.network.prefixlen
    packed = ip.packed
    ifa_flags = m.IFA_F_NODAD if nodad and version == 6 else 0
    header = (_family(version), prefixlen, ifa_flags, m.RT_SCOPE_UNIVERSE, index)
    attrs = [Attr(m.IFA_LOCAL, m.BYTES, packed), Attr(m.IFA_ADDRESS, m.BYTES, packed)]
    if version == 4 and mtype == m.RTM_NEWADDR and prefixlen < 31:
        # The subnet's broadcast address: the host bits all set (as broadcast_address,
        # without building the network's address objects on every join).
        broadcast = int.from_bytes(packed, "big") | (0xFFFFFFFF >> prefixlen)
        attrs.append(Attr(m.IFA_BROADCAST, m.BYTES, broadcast.to_bytes(4, "big")))
    return Message(mtype, flags, 0, 0, header, attrs)


def addr_add(index: int, iface: IPInterface, *, nodad: bool = True) -> Message:
    return _addr(m.RTM_NEWADDR, CREATE, index, iface, nodad)


def addr_del(index: int, iface: IPInterface) -> Message:
    return _addr(m.RTM_DELADDR, REQUEST, index, iface, False)


def _route(
    mtype: int,
    flags: int,
    dst: IPNetwork,
    gateway: IPAddress | None,
    oif: int | None,
    table: int,
    protocol: int,
) -> Message:
    scope = m.RT_SCOPE_LINK if gateway is None and oif is not None else m.RT_SCOPE_UNIVERSE
    header = (
        _family(dst.version),
        dst.prefixlen,
        0,
        0,
        table if table < 256 else 252,
        protocol,
        scope,
        m.RTN_UNICAST,
        0,
    )
    attrs: list[Attr] = []
    if dst.prefixlen:
        attrs.append(Attr(m.RTA_DST, m.BYTES, dst.network_address.packed))
    if gateway is not None:
        attrs.append(Attr(m.RTA_GATEWAY, m.BYTES, gateway.packed))
    if oif is not None:
        attrs.append(Attr(m.RTA_OIF, m.U32, oif))
    if table >= 256:
        attrs.append(Attr(m.RTA_TABLE, m.U32, table))
    return Message(mtype, flags, 0, 0, header, attrs)


def route_add(
    dst: IPNetwork,
    *,
    gateway: IPAddress | None = None,
    oif: int | None = None,
    table: int = m.RT_TABLE_MAIN,
    protocol: int = m.RTPROT_STATIC,
) -> Message:
    """A route: default (dst /0) or static via `gateway`, or connected on `oif`."""
    return _route(m.RTM_NEWROUTE, CREATE, dst, gateway, oif, table, protocol)


def route_del(
    dst: IPNetwork,
    *,
    gateway: IPAddress | None = None,
    oif: int | None = None,
    table: int = m.RT_TABLE_MAIN,
) -> Message:
    return _route(m.RTM_DELROUTE, REQUEST, dst, gateway, oif, table, 0)


# --- neighbours and FDB --------------------------------------------------------------


def neigh_add(index: int, ip: IPAddress, mac: str, *, replace: bool = True) -> Message:
    """A permanent ARP (IPv4) or ND (IPv6) entry."""
    header = (_family(ip.version), index, m.NUD_PERMANENT, 0, 0)
    attrs = [Attr(m.NDA_DST, m.BYTES, ip.packed), Attr(m.NDA_LLADDR, m.BYTES, mac_bytes(mac))]
    return Message(m.RTM_NEWNEIGH, REPLACE if replace else CREATE, 0, 0, header, attrs)


def neigh_del(index: int, ip: IPAddress) -> Message:
    header = (_family(ip.version), index, 0, 0, 0)
    return Message(m.RTM_DELNEIGH, REQUEST, 0, 0, header, [Attr(m.NDA_DST, m.BYTES, ip.packed)])


def fdb_add(
    index: int, mac: str, dst: IPAddress, *, vni: int | None = None, replace: bool = True
) -> Message:
    """A static FDB entry on a vxlan device: frames for `mac` go to the VTEP `dst`."""
    header = (m.AF_BRIDGE, index, m.NUD_PERMANENT | m.NUD_NOARP, m.NTF_SELF, 0)
    attrs = [Attr(m.NDA_LLADDR, m.BYTES, mac_bytes(mac)), Attr(m.NDA_DST, m.BYTES, dst.packed)]
    if vni is not None:
        attrs.append(Attr(m.NDA_VNI, m.U32, vni))
    return Message(m.RTM_NEWNEIGH, REPLACE if replace else CREATE, 0, 0, header, attrs)


def fdb_del(
    index: int, mac: str, dst: IPAddress | None = None, *, vni: int | None = None
) -> Message:
    header = (m.AF_BRIDGE, index, 0, m.NTF_SELF, 0)
    attrs = [Attr(m.NDA_LLADDR, m.BYTES, mac_bytes(mac))]
    if dst is not None:
        attrs.append(Attr(m.NDA_DST, m.BYTES, dst.packed))
    if vni is not None:
        attrs.append(Attr(m.NDA_VNI, m.U32, vni))
    return Message(m.RTM_DELNEIGH, REQUEST, 0, 0, header, attrs)


@dataclass(frozen=True)
class NeighBatch:
    """Many neighbour or FDB requests of one kind on one device, for large tables (e.g.
    an overlay's remote peers): the codec lays them out in one pass (encode_neighbours)
    without a Message per request; `message(k)` is request k as the builders above make
    it (the same bytes), for error reports and tests.

    kind: "fdb_add" / "fdb_del" (entries (MAC, VTEP)), "neigh_add" / "neigh_del"
    (entries (MAC, IP); the MAC is not sent on a delete and may be None).
    """

    kind: str
    index: int
    entries: Sequence[tuple[str | None, IPAddress]]

    def __post_init__(self) -> None:
        if self.kind not in _NEIGH_TEMPLATES:
            raise ValueError(f"NeighBatch kind must be one of {sorted(_NEIGH_TEMPLATES)}")

    def __len__(self) -> int:
        return len(self.entries)

    def template(self) -> tuple[int, int, int, int, int, int, bool]:
        """(type, flags, family (0: each address's own), ifindex, state, ndm_flags,
        link-layer address first) as the codec's encode_neighbours takes it."""
        mtype, flags, family, state, ntf, lladdr_first = _NEIGH_TEMPLATES[self.kind]
        return mtype, flags, family, self.index, state, ntf, lladdr_first

    def wire_entries(self) -> Sequence[tuple[str | None, IPAddress]]:
        """The entries as the codec takes them (no MAC on a neighbour delete)."""
        if self.kind == "neigh_del":
            return [(None, ip) for _, ip in self.entries]
        return self.entries

    def message(self, k: int) -> Message:
        mac, addr = self.entries[k]
        if self.kind == "fdb_add":
            return fdb_add(self.index, str(mac), addr)
        if self.kind == "fdb_del":
            return fdb_del(self.index, str(mac), addr)
        if self.kind == "neigh_add":
            return neigh_add(self.index, addr, str(mac))
        return neigh_del(self.index, addr)


_NEIGH_TEMPLATES: dict[str, tuple[int, int, int, int, int, bool]] = {
    "fdb_add": (
        m.RTM_NEWNEIGH,
        REPLACE,
        m.AF_BRIDGE,
        m.NUD_PERMANENT | m.NUD_NOARP,
        m.NTF_SELF,
        True,
    ),
    "fdb_del": (m.RTM_DELNEIGH, REQUEST, m.AF_BRIDGE, 0, m.NTF_SELF, True),
    "neigh_add": (m.RTM_NEWNEIGH, REPLACE, 0, m.NUD_PERMANENT, 0, False),
    "neigh_del": (m.RTM_DELNEIGH, REQUEST, 0, 0, 0, False),
}


# --- dumps ---------------------------------------------------------------------------


def dump_links() -> Message:
    return Message(m.RTM_GETLINK, DUMP, 0, 0, _ifinfo(), [])


def dump_addrs(family: int = m.AF_UNSPEC) -> Message:
    return Message(m.RTM_GETADDR, DUMP, 0, 0, (family, 0, 0, 0, 0), [])


def dump_routes(family: int = m.AF_UNSPEC) -> Message:
    return Message(m.RTM_GETROUTE, DUMP, 0, 0, (family, 0, 0, 0, 0, 0, 0, 0, 0), [])


def dump_neighbours(family: int = m.AF_UNSPEC) -> Message:
    return Message(m.RTM_GETNEIGH, DUMP, 0, 0, (family, 0, 0, 0, 0), [])
