"""Value types shared by the control plane, and the validation of user input.

Owns: object ids, name rules, IPAMConfig, MAC parsing, and the record dataclasses that
the store persists and the public objects wrap. Every check raises InvalidParameter that
names what was wrong, before anything is changed.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import errors

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

ID_LEN = 64
MAX_NAME_LEN = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_HEX_RE = re.compile(r"[0-9a-f]+\Z")
_MAC_RE = re.compile(r"([0-9A-Fa-f]{2})([:-][0-9A-Fa-f]{2}){5}\Z")
# What the kernel takes as a network interface name (dev_valid_name): 1-15 bytes, no
# whitespace, '/' or ':', and not "." or "..".
_IFNAME_RE = re.compile(r"[^\s/:\x00]{1,15}\Z")

State = Literal["creating", "ready", "deleting"]


def new_id() -> str:
    """A random 64-hex-character object id, as Docker uses."""
    return secrets.token_hex(ID_LEN // 2)


def is_id_prefix(ref: str) -> bool:
    return 0 < len(ref) <= ID_LEN and bool(_HEX_RE.match(ref))


def validate_name(kind: str, name: object) -> str:
    """A name usable as a file name and in kernel object names: [A-Za-z0-9][A-Za-z0-9_.-]*."""
    if not isinstance(name, str) or not name:
        raise errors.InvalidParameter(f"{kind} name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LEN:
        raise errors.InvalidParameter(f"{kind} name {name[:20]!r}... is longer than {MAX_NAME_LEN}")
    if not _NAME_RE.match(name):
        raise errors.InvalidParameter(
            f"invalid {kind} name {name!r}: only [A-Za-z0-9][A-Za-z0-9_.-]* is allowed"
        )
    return name


def is_interface_name(value: object) -> bool:
    """Whether `value` is a name the kernel accepts for a network interface."""
    return (
        isinstance(value, str)
        and _IFNAME_RE.match(value) is not None
        and len(value.encode()) <= 15
        and value not in (".", "..")
    )


def validate_interface_name(value: object, what: str = "interface name") -> str:
    """An interface name (1-15 bytes, no whitespace, '/' or ':', not "." or "..")."""
    if not is_interface_name(value):
        raise errors.InvalidParameter(
            f"{what} {value!r} is not a usable interface name "
            "(1-15 characters, no spaces, '/' or ':')"
        )
    assert isinstance(value, str)
    return value


def parse_mac(value: object) -> str:
    """A unicast MAC address in lower-case colon form."""
    if not isinstance(value, str) or not _MAC_RE.match(value):
        raise errors.InvalidParameter(f"invalid MAC address {value!r}")
    mac = value.lower().replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise errors.InvalidParameter(f"MAC address {value!r} is multicast")
    if mac == "00:00:00:00:00:00":
        raise errors.InvalidParameter("MAC address 00:00:00:00:00:00 is not usable")
    return mac


def generate_mac(ip: ipaddress.IPv4Address | None = None) -> str:
    """Docker's scheme: 02:42 + the IPv4 address, else locally administered random bytes."""
    if ip is not None:
        return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def parse_network(value: object, what: str = "subnet", version: int | None = None) -> IPNetwork:
    """A CIDR with no host bits set, e.g. 10.20.0.0/24."""
    if not isinstance(value, str):
        raise errors.InvalidParameter(f"invalid {what} {value!r}: expected a CIDR string")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise errors.InvalidParameter(f"invalid {what} {value!r}: {exc}") from None
    if version is not None and net.version != version:
        raise errors.InvalidParameter(f"{what} {value} is not an IPv{version} network")
    return net


def parse_address(value: object, what: str = "address", version: int | None = None) -> IPAddress:
    """A bare IP address; a CIDR form ("10.0.0.2/24") is accepted and its prefix ignored."""
    if not isinstance(value, str):
        raise errors.InvalidParameter(f"invalid {what} {value!r}: expected an IP address string")
    try:
        addr = ipaddress.ip_interface(value).ip if "/" in value else ipaddress.ip_address(value)
    except ValueError as exc:
        raise errors.InvalidParameter(f"invalid {what} {value!r}: {exc}") from None
    if version is not None and addr.version != version:
        raise errors.InvalidParameter(f"{what} {value} is not an IPv{version} address")
    return addr


def parse_string_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errors.InvalidParameter(
            f"{what} must be a mapping of strings, got {type(value).__name__}"
        )
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise errors.InvalidParameter(f"{what}: keys must be non-empty strings, got {k!r}")
        if not isinstance(v, str):
            raise errors.InvalidParameter(f"{what}: value of {k!r} must be a string, got {v!r}")
        out[k] = v
    return out


@dataclass(frozen=True)
class IPAMConfig:
    """One address pool request of a network: subnet, gateway, allocation range, aux addresses.

    Any field may be left None; an empty subnet means "take a free default pool".
    """

    subnet: str | None = None
    gateway: str | None = None
    ip_range: str | None = None
    aux_addresses: Mapping[str, str] = field(default_factory=dict)

    def validated(self, version: int) -> ValidIPAMConfig:
        """Parse and cross-check every field; InvalidParameter names the offending one."""
        subnet = parse_network(self.subnet, "subnet", version) if self.subnet else None
        if subnet is None and (self.gateway or self.ip_range or self.aux_addresses):
            raise errors.InvalidParameter(
                "gateway, ip_range and aux_addresses need an explicit subnet"
            )
        gateway = parse_address(self.gateway, "gateway", version) if self.gateway else None
        ip_range = parse_network(self.ip_range, "ip_range", version) if self.ip_range else None
        aux = {
            name: parse_address(addr, f"aux address {name!r}", version)
            for name, addr in parse_string_map(self.aux_addresses, "aux_addresses").items()
        }
        if subnet is not None:
            if subnet.prefixlen > subnet.max_prefixlen - 2 and version == 4:
                raise errors.InvalidParameter(f"subnet {subnet} is too small for any host")
            if gateway is not None and gateway not in subnet:
                raise errors.InvalidParameter(f"gateway {gateway} is outside subnet {subnet}")
            if gateway is not None and gateway == subnet.network_address:
                raise errors.InvalidParameter(f"gateway {gateway} is the network address")
            if version == 4 and gateway is not None and gateway == subnet.broadcast_address:
                raise errors.InvalidParameter(f"gateway {gateway} is the broadcast address")
            if ip_range is not None and not ip_range.subnet_of(subnet):  # type: ignore[arg-type]
                raise errors.InvalidParameter(f"ip_range {ip_range} is outside subnet {subnet}")
            for name, addr in aux.items():
                if addr not in subnet:
                    raise errors.InvalidParameter(
                        f"aux address {name!r} ({addr}) is outside subnet {subnet}"
                    )
        return ValidIPAMConfig(subnet, gateway, ip_range, aux)


@dataclass(frozen=True)
class ValidIPAMConfig:
    subnet: IPNetwork | None
    gateway: IPAddress | None
    ip_range: IPNetwork | None
    aux_addresses: dict[str, IPAddress]


# --- records: what the store persists -------------------------------------------------


@dataclass(frozen=True)
class PoolData:
    """An address pool a network holds: the IPAM pool id, its subnet and reserved addresses."""

    pool_id: str
    subnet: str
    gateway: str | None  # CIDR form, e.g. "10.20.0.1/24"
    ip_range: str | None
    aux_addresses: dict[str, str]  # name -> CIDR
    # The IPAM address space the pool was requested in (an IPAM plugin's own name, e.g.
    # "LocalDefault"); "" in records written before it was kept.
    address_space: str = ""


@dataclass(frozen=True)
class NetworkRecord:
    id: str
    name: str
    driver: str
    scope: str
    ipam_driver: str
    enable_ipv6: bool
    internal: bool
    options: dict[str, str]
    labels: dict[str, str]
    ipam_options: dict[str, str]
    ipv4: tuple[PoolData, ...]
    ipv6: tuple[PoolData, ...]
    state: State
    created: float
    # The store instance that last wrote it (see SQLiteStore.owner_alive): bookkeeping,
    # not part of the object's value.
    owner: str = field(default="", compare=False)


@dataclass(frozen=True)
class EndpointRecord:
    id: str
    name: str
    network_id: str
    ipv4_address: str | None  # CIDR
    ipv6_address: str | None  # CIDR
    mac_address: str
    options: dict[str, str]
    sandbox_id: str | None
    state: State
    join_state: Literal["", "joining", "joined", "leaving"]
    driver_data: dict[str, object]
    owner: str = field(default="", compare=False)


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    container_id: str
    key: str
    explicit: bool
    hostname: str | None
    dns: tuple[str, ...]
    dns_search: tuple[str, ...]
    extra_hosts: tuple[str, ...]
    state: State
    owner: str = field(default="", compare=False)


@dataclass(frozen=True)
class Repair:
    """One thing reconcile found out of step and put right."""

    kind: str  # e.g. "orphan_namespace_removed"
    object: str  # the id, name or path it is about
    detail: str = ""


def as_list(value: object, what: str) -> list[Any]:
    """A list from a batch argument: any iterable but a string, bytes or mapping."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise errors.InvalidParameter(f"{what} must be a list, not {type(value).__name__}")
    return list(value)


def as_pairs(value: object, what: str) -> list[tuple[Any, Any]]:
    """A list of 2-tuples, e.g. (endpoint, container) pairs for join_many/leave_many."""
    items = as_list(value, what)
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise errors.InvalidParameter(
                f"{what} must hold (endpoint, container) pairs, not {item!r}"
            )
    return [tuple(i) for i in items]  # type: ignore[misc]
