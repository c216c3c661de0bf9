"""rtnetlink message layouts, declared once as data for both codecs.

Owns the constants (kernel names kept), the fixed header layout of each message family,
and the attribute policies: for every attribute type its name, its kind (how the value
is laid out) and, for nested attributes, the policy of what is inside. The Cython codec
(_codec.pyx) and the pure-Python codec (_pycodec.py) are both driven by these tables, so
they cannot drift apart.

A message is `Message(type, flags, seq, pid, header, attrs)`: `header` is the tuple of
the family's fixed header fields, `attrs` a list of `Attr(type, kind, value)`. A nested
attribute's value is a list of Attr; a VETH_INFO_PEER's value is `(ifinfomsg tuple,
[Attr, ...])`. Both are plain tuples, so the native codec reads them at C speed.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

# --- netlink ---------------------------------------------------------------------------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ECHO = 0x8
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: only the request's header is echoed
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended-ack attributes follow

NLMSGERR_ATTR_MSG = 1
NLMSGERR_ATTR_OFFS = 2

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RTM_NEWQDISC = 36
RTM_DELQDISC = 37
RTM_GETQDISC = 38
RTM_NEWTFILTER = 44
RTM_DELTFILTER = 45
RTM_GETTFILTER = 46

AF_UNSPEC = 0
AF_INET = 2
AF_BRIDGE = 7
AF_INET6 = 10

IFF_UP = 0x1

# ifinfomsg attributes
IFLA_ADDRESS = 1
IFLA_BROADCAST = 2
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_QDISC = 6
IFLA_MASTER = 10
IFLA_TXQLEN = 13
IFLA_OPERSTATE = 16
IFLA_LINKMODE = 17
IFLA_LINKINFO = 18
IFLA_NET_NS_PID = 19
IFLA_IFALIAS = 20
IFLA_GROUP = 27
IFLA_NET_NS_FD = 28
IFLA_EXT_MASK = 29
IFLA_PROMISCUITY = 30
IFLA_NUM_TX_QUEUES = 31
IFLA_NUM_RX_QUEUES = 32
IFLA_CARRIER = 33
IFLA_LINK_NETNSID = 37
IFLA_NEW_NETNSID = 45
IFLA_IF_NETNSID = 46
IFLA_MIN_MTU = 50
IFLA_MAX_MTU = 51
IFLA_PERM_ADDRESS = 54

IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5

IFLA_BRPORT_MODE = 4  # hairpin
IFLA_BRPORT_LEARNING = 8
IFLA_BRPORT_ISOLATED = 33

VETH_INFO_PEER = 1

IFLA_BR_FORWARD_DELAY = 1
IFLA_BR_HELLO_TIME = 2
IFLA_BR_MAX_AGE = 3
IFLA_BR_AGEING_TIME = 4
IFLA_BR_STP_STATE = 5
IFLA_BR_PRIORITY = 6
IFLA_BR_VLAN_FILTERING = 7
IFLA_BR_MCAST_SNOOPING = 23

IFLA_VXLAN_ID = 1
IFLA_VXLAN_GROUP = 2
IFLA_VXLAN_LINK = 3
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_TTL = 5
IFLA_VXLAN_TOS = 6
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_AGEING = 8
IFLA_VXLAN_LIMIT = 9
IFLA_VXLAN_PORT_RANGE = 10
IFLA_VXLAN_PROXY = 11
IFLA_VXLAN_RSC = 12
IFLA_VXLAN_L2MISS = 13
IFLA_VXLAN_L3MISS = 14
IFLA_VXLAN_PORT = 15
IFLA_VXLAN_GROUP6 = 16
IFLA_VXLAN_LOCAL6 = 17
IFLA_VXLAN_UDP_CSUM = 18
IFLA_VXLAN_COLLECT_METADATA = 25

# ifaddrmsg attributes
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_BROADCAST = 4
IFA_ANYCAST = 5
IFA_CACHEINFO = 6
IFA_FLAGS = 8
IFA_F_NODAD = 0x02
IFA_F_PERMANENT = 0x80

# rtmsg attributes
RTA_DST = 1
RTA_SRC = 2
RTA_IIF = 3
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_METRICS = 8
RTA_CACHEINFO = 12
RTA_TABLE = 15
RTA_PREF = 20

RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
RTPROT_BOOT = 3
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RTN_UNICAST = 1
RTN_LOCAL = 2

# ndmsg attributes
NDA_DST = 1
NDA_LLADDR = 2
NDA_CACHEINFO = 3
NDA_PROBES = 4
NDA_VLAN = 5
NDA_PORT = 6
NDA_VNI = 7
NDA_IFINDEX = 8
NDA_MASTER = 9

# tcmsg (traffic control: the clsact qdisc and BPF filters on it)
TCA_KIND = 1
TCA_OPTIONS = 2
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1  # also TC_H_INGRESS: the clsact qdisc's parent
TC_H_MIN_INGRESS = 0xFFF2
TC_H_MIN_EGRESS = 0xFFF3
ETH_P_ALL = 0x0003

NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
NTF_MASTER = 0x04

# --- how values are laid out -----------------------------------------------------------

U8 = 1
U16 = 2
U32 = 3
S32 = 4
U64 = 5
BE16 = 6  # network byte order (e.g. IFLA_VXLAN_PORT)
STR = 7  # NUL-terminated string
BYTES = 8  # raw bytes: MACs, IP addresses (4 or 16 bytes), anything undeclared
FLAG = 9  # no payload
NESTED = 10  # value: list[Attr]
IFINFO = 11  # value: (ifinfomsg header tuple, list[Attr]) (VETH_INFO_PEER)

KIND_NAMES = {
    U8: "u8",
    U16: "u16",
    U32: "u32",
    S32: "s32",
    U64: "u64",
    BE16: "be16",
    STR: "str",
    BYTES: "bytes",
    FLAG: "flag",
    NESTED: "nested",
    IFINFO: "ifinfo",
}

NLA_HDRLEN = 4
MAX_NESTING = 16  # deeper attribute nesting is refused by both codecs (rtnetlink needs 4)
NLMSG_HDRLEN = 16


def align4(n: int) -> int:
    return (n + 3) & ~3


class Attr(NamedTuple):
    type: int
    kind: int
    value: Any


class Message(NamedTuple):
    type: int
    flags: int
    seq: int
    pid: int
    header: tuple[int, ...]
    attrs: list[Attr]


# --- fixed headers ---------------------------------------------------------------------

NLMSGHDR = "IHHII"
IFINFOMSG = "BxHiII"  # family, type, index, flags, change
IFADDRMSG = "BBBBI"  # family, prefixlen, flags, scope, index
RTMSG = "BBBBBBBBI"  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
NDMSG = "BxxxiHBB"  # family, ifindex, state, flags, type
TCMSG = "BxxxiIII"  # family, ifindex, handle, parent, info
NLMSGERR = "iIHHII"  # error, then the request's nlmsghdr
DONE = "i"

HEADER_OF_TYPE: dict[int, str] = {
    RTM_NEWLINK: IFINFOMSG,
    RTM_DELLINK: IFINFOMSG,
    RTM_GETLINK: IFINFOMSG,
    RTM_SETLINK: IFINFOMSG,
    RTM_NEWADDR: IFADDRMSG,
    RTM_DELADDR: IFADDRMSG,
    RTM_GETADDR: IFADDRMSG,
    RTM_NEWROUTE: RTMSG,
    RTM_DELROUTE: RTMSG,
    RTM_GETROUTE: RTMSG,
    RTM_NEWNEIGH: NDMSG,
    RTM_DELNEIGH: NDMSG,
    RTM_GETNEIGH: NDMSG,
    RTM_NEWQDISC: TCMSG,
    RTM_DELQDISC: TCMSG,
    RTM_GETQDISC: TCMSG,
    RTM_NEWTFILTER: TCMSG,
    RTM_DELTFILTER: TCMSG,
    RTM_GETTFILTER: TCMSG,
    NLMSG_ERROR: NLMSGERR,
    NLMSG_DONE: DONE,
}

HEADER_SIZE: dict[str, int] = {
    fmt: struct.calcsize("=" + fmt) for fmt in {*HEADER_OF_TYPE.values(), NLMSGHDR}
}

# --- attribute policies ----------------------------------------------------------------
# policy name -> {attribute type: (attribute name, kind, nested policy name or "")}
Policy = dict[int, tuple[str, int, str]]

POLICIES: dict[str, Policy] = {
    "link": {
        IFLA_ADDRESS: ("IFLA_ADDRESS", BYTES, ""),
        IFLA_BROADCAST: ("IFLA_BROADCAST", BYTES, ""),
        IFLA_IFNAME: ("IFLA_IFNAME", STR, ""),
        IFLA_MTU: ("IFLA_MTU", U32, ""),
        IFLA_LINK: ("IFLA_LINK", U32, ""),
        IFLA_QDISC: ("IFLA_QDISC", STR, ""),
        IFLA_MASTER: ("IFLA_MASTER", U32, ""),
        IFLA_TXQLEN: ("IFLA_TXQLEN", U32, ""),
        IFLA_OPERSTATE: ("IFLA_OPERSTATE", U8, ""),
        IFLA_LINKMODE: ("IFLA_LINKMODE", U8, ""),
        IFLA_LINKINFO: ("IFLA_LINKINFO", NESTED, "linkinfo"),
        IFLA_NET_NS_PID: ("IFLA_NET_NS_PID", U32, ""),
        IFLA_IFALIAS: ("IFLA_IFALIAS", STR, ""),
        IFLA_GROUP: ("IFLA_GROUP", U32, ""),
        IFLA_NET_NS_FD: ("IFLA_NET_NS_FD", U32, ""),
        IFLA_EXT_MASK: ("IFLA_EXT_MASK", U32, ""),
        IFLA_PROMISCUITY: ("IFLA_PROMISCUITY", U32, ""),
        IFLA_NUM_TX_QUEUES: ("IFLA_NUM_TX_QUEUES", U32, ""),
        IFLA_NUM_RX_QUEUES: ("IFLA_NUM_RX_QUEUES", U32, ""),
        IFLA_CARRIER: ("IFLA_CARRIER", U8, ""),
        IFLA_LINK_NETNSID: ("IFLA_LINK_NETNSID", S32, ""),
        IFLA_NEW_NETNSID: ("IFLA_NEW_NETNSID", S32, ""),
        IFLA_IF_NETNSID: ("IFLA_IF_NETNSID", S32, ""),
        IFLA_MIN_MTU: ("IFLA_MIN_MTU", U32, ""),
        IFLA_MAX_MTU: ("IFLA_MAX_MTU", U32, ""),
        IFLA_PERM_ADDRESS: ("IFLA_PERM_ADDRESS", BYTES, ""),
    },
    # IFLA_INFO_DATA's layout depends on IFLA_INFO_KIND: "linkinfo:<kind>" policies.
    "linkinfo": {
        IFLA_INFO_KIND: ("IFLA_INFO_KIND", STR, ""),
        IFLA_INFO_DATA: ("IFLA_INFO_DATA", NESTED, "linkinfo:"),
        IFLA_INFO_SLAVE_KIND: ("IFLA_INFO_SLAVE_KIND", STR, ""),
        IFLA_INFO_SLAVE_DATA: ("IFLA_INFO_SLAVE_DATA", NESTED, "brport"),
    },
    # A bridge port's settings (the only enslaving kind cnm programs).
    "brport": {
        IFLA_BRPORT_MODE: ("IFLA_BRPORT_MODE", U8, ""),
        IFLA_BRPORT_LEARNING: ("IFLA_BRPORT_LEARNING", U8, ""),
        IFLA_BRPORT_ISOLATED: ("IFLA_BRPORT_ISOLATED", U8, ""),
    },
    "linkinfo:veth": {
        VETH_INFO_PEER: ("VETH_INFO_PEER", IFINFO, "link"),
    },
    "linkinfo:bridge": {
        IFLA_BR_FORWARD_DELAY: ("IFLA_BR_FORWARD_DELAY", U32, ""),
        IFLA_BR_HELLO_TIME: ("IFLA_BR_HELLO_TIME", U32, ""),
        IFLA_BR_MAX_AGE: ("IFLA_BR_MAX_AGE", U32, ""),
        IFLA_BR_AGEING_TIME: ("IFLA_BR_AGEING_TIME", U32, ""),
        IFLA_BR_STP_STATE: ("IFLA_BR_STP_STATE", U32, ""),
        IFLA_BR_PRIORITY: ("IFLA_BR_PRIORITY", U16, ""),
        IFLA_BR_VLAN_FILTERING: ("IFLA_BR_VLAN_FILTERING", U8, ""),
        IFLA_BR_MCAST_SNOOPING: ("IFLA_BR_MCAST_SNOOPING", U8, ""),
    },
    "linkinfo:vxlan": {
        IFLA_VXLAN_ID: ("IFLA_VXLAN_ID", U32, ""),
        IFLA_VXLAN_GROUP: ("IFLA_VXLAN_GROUP", BYTES, ""),
        IFLA_VXLAN_LINK: ("IFLA_VXLAN_LINK", U32, ""),
        IFLA_VXLAN_LOCAL: ("IFLA_VXLAN_LOCAL", BYTES, ""),
        IFLA_VXLAN_TTL: ("IFLA_VXLAN_TTL", U8, ""),
        IFLA_VXLAN_TOS: ("IFLA_VXLAN_TOS", U8, ""),
        IFLA_VXLAN_LEARNING: ("IFLA_VXLAN_LEARNING", U8, ""),
        IFLA_VXLAN_AGEING: ("IFLA_VXLAN_AGEING", U32, ""),
        IFLA_VXLAN_LIMIT: ("IFLA_VXLAN_LIMIT", U32, ""),
        IFLA_VXLAN_PROXY: ("IFLA_VXLAN_PROXY", U8, ""),
        IFLA_VXLAN_L2MISS: ("IFLA_VXLAN_L2MISS", U8, ""),
        IFLA_VXLAN_L3MISS: ("IFLA_VXLAN_L3MISS", U8, ""),
        IFLA_VXLAN_PORT: ("IFLA_VXLAN_PORT", BE16, ""),
        IFLA_VXLAN_GROUP6: ("IFLA_VXLAN_GROUP6", BYTES, ""),
        IFLA_VXLAN_LOCAL6: ("IFLA_VXLAN_LOCAL6", BYTES, ""),
        IFLA_VXLAN_UDP_CSUM: ("IFLA_VXLAN_UDP_CSUM", U8, ""),
        IFLA_VXLAN_COLLECT_METADATA: ("IFLA_VXLAN_COLLECT_METADATA", U8, ""),
    },
    "addr": {
        IFA_ADDRESS: ("IFA_ADDRESS", BYTES, ""),
        IFA_LOCAL: ("IFA_LOCAL", BYTES, ""),
        IFA_LABEL: ("IFA_LABEL", STR, ""),
        IFA_BROADCAST: ("IFA_BROADCAST", BYTES, ""),
        IFA_ANYCAST: ("IFA_ANYCAST", BYTES, ""),
        IFA_CACHEINFO: ("IFA_CACHEINFO", BYTES, ""),
        IFA_FLAGS: ("IFA_FLAGS", U32, ""),
    },
    "route": {
        RTA_DST: ("RTA_DST", BYTES, ""),
        RTA_SRC: ("RTA_SRC", BYTES, ""),
        RTA_IIF: ("RTA_IIF", U32, ""),
        RTA_OIF: ("RTA_OIF", U32, ""),
        RTA_GATEWAY: ("RTA_GATEWAY", BYTES, ""),
        RTA_PRIORITY: ("RTA_PRIORITY", U32, ""),
        RTA_PREFSRC: ("RTA_PREFSRC", BYTES, ""),
        RTA_TABLE: ("RTA_TABLE", U32, ""),
        RTA_PREF: ("RTA_PREF", U8, ""),
    },
    "neigh": {
        NDA_DST: ("NDA_DST", BYTES, ""),
        NDA_LLADDR: ("NDA_LLADDR", BYTES, ""),
        NDA_PROBES: ("NDA_PROBES", U32, ""),
        NDA_VLAN: ("NDA_VLAN", U16, ""),
        NDA_PORT: ("NDA_PORT", BE16, ""),
        NDA_VNI: ("NDA_VNI", U32, ""),
        NDA_IFINDEX: ("NDA_IFINDEX", U32, ""),
        NDA_MASTER: ("NDA_MASTER", U32, ""),
    },
    "tc": {
        TCA_KIND: ("TCA_KIND", STR, ""),
        TCA_OPTIONS: ("TCA_OPTIONS", NESTED, "tc_bpf"),
    },
    "tc_bpf": {
        TCA_BPF_FD: ("TCA_BPF_FD", U32, ""),
        TCA_BPF_NAME: ("TCA_BPF_NAME", STR, ""),
        TCA_BPF_FLAGS: ("TCA_BPF_FLAGS", U32, ""),
    },
    "nlmsgerr": {
        NLMSGERR_ATTR_MSG: ("NLMSGERR_ATTR_MSG", STR, ""),
        NLMSGERR_ATTR_OFFS: ("NLMSGERR_ATTR_OFFS", U32, ""),
    },
    "": {},
}

POLICY_OF_TYPE: dict[int, str] = {
    RTM_NEWLINK: "link",
    RTM_DELLINK: "link",
    RTM_GETLINK: "link",
    RTM_SETLINK: "link",
    RTM_NEWADDR: "addr",
    RTM_DELADDR: "addr",
    RTM_GETADDR: "addr",
    RTM_NEWROUTE: "route",
    RTM_DELROUTE: "route",
    RTM_GETROUTE: "route",
    RTM_NEWNEIGH: "neigh",
    RTM_DELNEIGH: "neigh",
    RTM_GETNEIGH: "neigh",
    RTM_NEWQDISC: "tc",
    RTM_DELQDISC: "tc",
    RTM_GETQDISC: "tc",
    RTM_NEWTFILTER: "tc",
    RTM_DELTFILTER: "tc",
    RTM_GETTFILTER: "tc",
    NLMSG_ERROR: "nlmsgerr",
    # A dump that fails part-way ends with NLMSG_DONE carrying -errno and ext-ack attrs.
    NLMSG_DONE: "nlmsgerr",
}

ATTR_NAMES: dict[str, dict[str, int]] = {
    pname: {name: atype for atype, (name, _, _) in pol.items()} for pname, pol in POLICIES.items()
}


def policy_for(name: str, info_kind: str | None = None) -> Policy:
    """The policy called `name`; "linkinfo:" resolves with the link kind (unknown: raw)."""
    if name == "linkinfo:":
        return POLICIES.get(f"linkinfo:{info_kind}", {})
    return POLICIES.get(name, {})


class DecodeError(ValueError):
    """Bytes that are not a well-formed netlink stream: the offset and what was wrong."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"malformed netlink data at byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class EncodeError(ValueError):
    """A message that cannot be laid out (value of the wrong type or out of range)."""
