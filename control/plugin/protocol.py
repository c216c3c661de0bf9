"""The requests of the remote plugin protocol, parsed into typed values.

Owns the field names of spec/remote-protocol.md on the server side: each `parse_*`
takes a decoded JSON body and returns a frozen dataclass, or raises InvalidParameter
naming the field. Nothing here acts; a request that does not parse changes nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import errors
from ..types import IPAddress, IPInterface, IPNetwork, parse_mac, validate_name

GENERIC = "com.docker.network.generic"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
INTERNAL = "com.docker.network.internal"
PORTMAP = "com.docker.network.portmap"
MAC_ADDRESS = "com.docker.network.endpoint.macaddress"
CONTENT_TYPE = "application/vnd.docker.plugins.v1.1+json"

Body = Mapping[str, Any]


# --- field readers -------------------------------------------------------------------


def _field(body: Body, key: str, kind: type | tuple[type, ...], *, required: bool) -> Any:
    if key not in body or body[key] is None:
        if required:
            raise errors.InvalidParameter(f"field {key!r} is missing")
        return None
    value = body[key]
    # bool is an int in Python; a JSON true must not pass for a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise errors.InvalidParameter(f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _id(body: Body, key: str) -> str:
    value = _field(body, key, str, required=True)
    try:
        return validate_name(key, value)
    except errors.InvalidParameter as exc:
        raise errors.InvalidParameter(f"field {key!r}: {exc}") from None


def _text(body: Body, key: str) -> str:
    """An optional string field; absent or null reads as ""."""
    return _field(body, key, str, required=False) or ""


def _object(body: Body, key: str) -> dict[str, Any]:
    """An optional JSON object field; absent or null reads as {}."""
    return dict(_field(body, key, dict, required=False) or {})


def _string_map(body: Body, key: str) -> dict[str, str]:
    out = _object(body, key)
    for k, v in out.items():
        if not isinstance(v, str):
            raise errors.InvalidParameter(f"field {key!r}: value of {k!r} must be a string")
    return out


def _flag(options: Body, key: str) -> bool:
    value = options.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise errors.InvalidParameter(f"option {key!r} must be a boolean, not {value!r}")
    return value


def _cidr(value: object, what: str) -> IPInterface:
    """An address with its prefix, "10.0.0.1/24" (the protocol's gateway form)."""
    if not isinstance(value, str) or "/" not in value:
        raise errors.InvalidParameter(f"{what} {value!r} is not an address in CIDR form")
    try:
        return ipaddress.ip_interface(value)
    except ValueError as exc:
        raise errors.InvalidParameter(f"{what} {value!r}: {exc}") from None


def _network(value: object, what: str) -> IPNetwork:
    if not isinstance(value, str):
        raise errors.InvalidParameter(f"{what} {value!r} is not a CIDR string")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise errors.InvalidParameter(f"{what} {value!r}: {exc}") from None


def _bare_ip(value: str, what: str) -> IPAddress | None:
    """ "" -> None; a bare IP (a CIDR form is accepted, its prefix ignored)."""
    if not value:
        return None
    try:
        if "/" in value:
            return ipaddress.ip_interface(value).ip
        return ipaddress.ip_address(value)
    except ValueError as exc:
        raise errors.InvalidParameter(f"{what} {value!r}: {exc}") from None


def body_object(raw: object) -> Body:
    """The decoded body of a request: a JSON object, or nothing (null / empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise errors.InvalidParameter(f"the request body must be a JSON object, not {raw!r:.40}")
    return raw


# --- NetworkDriver -------------------------------------------------------------------


@dataclass(frozen=True)
class IPAMData:
    pool: IPNetwork
    gateway: IPInterface | None
    aux_addresses: dict[str, IPInterface] = field(default_factory=dict)
    address_space: str = ""

    @property
    def unassigned(self) -> bool:
        """The null IPAM's placeholder pool (0.0.0.0/0 or ::/0): no addresses at all."""
        return self.pool.prefixlen == 0


def _ipam_data(raw: object, key: str, version: int) -> tuple[IPAMData, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise errors.InvalidParameter(f"field {key!r} must be a list")
    out = []
    for i, item in enumerate(raw):
        what = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise errors.InvalidParameter(f"{what} must be an object")
        pool = _network(item.get("Pool"), f"{what}.Pool")
        if pool.version != version:
            raise errors.InvalidParameter(f"{what}.Pool {pool} is not IPv{version}")
        gateway = None
        if item.get("Gateway"):
            gateway = _cidr(item["Gateway"], f"{what}.Gateway")
            if gateway.ip not in pool:
                raise errors.InvalidParameter(f"{what}.Gateway {gateway} is outside {pool}")
        aux_raw = item.get("AuxAddresses") or {}
        if not isinstance(aux_raw, dict):
            raise errors.InvalidParameter(f"{what}.AuxAddresses must be an object")
        aux = {}
        for name, addr in aux_raw.items():
            aux[name] = _cidr(addr, f"{what}.AuxAddresses[{name!r}]")
            if aux[name].ip not in pool:
                raise errors.InvalidParameter(f"{what}.AuxAddresses[{name!r}] is outside {pool}")
        space = item.get("AddressSpace") or ""
        if not isinstance(space, str):
            raise errors.InvalidParameter(f"{what}.AddressSpace must be a string")
        out.append(IPAMData(pool, gateway, aux, space))
    return tuple(out)


@dataclass(frozen=True)
class CreateNetwork:
    network_id: str
    generic: dict[str, str]
    enable_ipv6: bool
    internal: bool
    ipv4: tuple[IPAMData, ...]
    ipv6: tuple[IPAMData, ...]


def parse_create_network(body: Body) -> CreateNetwork:
    network_id = _id(body, "NetworkID")
    options = _object(body, "Options")
    generic = options.get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise errors.InvalidParameter(f"option {GENERIC!r} must be an object")
    for k, v in generic.items():
        if not isinstance(v, str):
            raise errors.InvalidParameter(f"driver option {k!r} must be a string, not {v!r}")
    return CreateNetwork(
        network_id=network_id,
        generic=dict(generic),
        enable_ipv6=_flag(options, ENABLE_IPV6),
        internal=_flag(options, INTERNAL),
        ipv4=_ipam_data(body.get("IPv4Data"), "IPv4Data", 4),
        ipv6=_ipam_data(body.get("IPv6Data"), "IPv6Data", 6),
    )


@dataclass(frozen=True)
class NetworkRef:
    network_id: str


def parse_network_ref(body: Body) -> NetworkRef:
    return NetworkRef(_id(body, "NetworkID"))


@dataclass(frozen=True)
class EndpointRef:
    network_id: str
    endpoint_id: str


def parse_endpoint_ref(body: Body) -> EndpointRef:
    return EndpointRef(_id(body, "NetworkID"), _id(body, "EndpointID"))


@dataclass(frozen=True)
class CreateEndpoint:
    network_id: str
    endpoint_id: str
    address: IPInterface | None
    address_ipv6: IPInterface | None
    mac_address: str | None
    publishes_ports: bool


def parse_create_endpoint(body: Body) -> CreateEndpoint:
    ref = parse_endpoint_ref(body)
    iface = _field(body, "Interface", dict, required=True)
    address = _text(iface, "Address")
    address6 = _text(iface, "AddressIPv6")
    mac = _text(iface, "MacAddress")
    a4 = _cidr(address, "Interface.Address") if address else None
    a6 = _cidr(address6, "Interface.AddressIPv6") if address6 else None
    if a4 is not None and a4.version != 4:
        raise errors.InvalidParameter(f"Interface.Address {a4} is not IPv4")
    if a6 is not None and a6.version != 6:
        raise errors.InvalidParameter(f"Interface.AddressIPv6 {a6} is not IPv6")
    options = _object(body, "Options")
    portmap = options.get(PORTMAP)
    if portmap is not None and not isinstance(portmap, list):
        raise errors.InvalidParameter(f"option {PORTMAP!r} must be a list")
    return CreateEndpoint(
        network_id=ref.network_id,
        endpoint_id=ref.endpoint_id,
        address=a4,
        address_ipv6=a6,
        mac_address=parse_mac(mac) if mac else None,
        publishes_ports=bool(portmap),
    )


@dataclass(frozen=True)
class Join:
    network_id: str
    endpoint_id: str
    sandbox_key: str


def parse_join(body: Body) -> Join:
    ref = parse_endpoint_ref(body)
    key = _field(body, "SandboxKey", str, required=True)
    if not key:
        raise errors.InvalidParameter("field 'SandboxKey' is empty")
    _object(body, "Options")
    return Join(ref.network_id, ref.endpoint_id, key)


def parse_external_connectivity(body: Body) -> EndpointRef:
    ref = parse_endpoint_ref(body)
    _object(body, "Options")
    return ref


@dataclass(frozen=True)
class Discovery:
    discovery_type: int
    data: dict[str, Any]


def parse_discovery(body: Body) -> Discovery:
    kind = _field(body, "DiscoveryType", int, required=True)
    return Discovery(kind, _object(body, "DiscoveryData"))


# --- IpamDriver ----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPool:
    address_space: str
    pool: IPNetwork | None
    sub_pool: IPNetwork | None
    options: dict[str, str]
    v6: bool


def parse_request_pool(body: Body) -> RequestPool:
    space = _field(body, "AddressSpace", str, required=True)
    pool = _text(body, "Pool")
    sub_pool = _text(body, "SubPool")
    v6 = _field(body, "V6", bool, required=False) or False
    return RequestPool(
        address_space=space,
        pool=_network(pool, "Pool") if pool else None,
        sub_pool=_network(sub_pool, "SubPool") if sub_pool else None,
        options=_string_map(body, "Options"),
        v6=v6,
    )


def parse_pool_id(body: Body) -> str:
    pool_id = _field(body, "PoolID", str, required=True)
    if not pool_id:
        raise errors.InvalidParameter("field 'PoolID' is empty")
    return pool_id


@dataclass(frozen=True)
class RequestAddress:
    pool_id: str
    address: IPAddress | None
    options: dict[str, str]


def parse_request_address(body: Body) -> RequestAddress:
    return RequestAddress(
        pool_id=parse_pool_id(body),
        address=_bare_ip(_text(body, "Address"), "Address"),
        options=_string_map(body, "Options"),
    )


@dataclass(frozen=True)
class ReleaseAddress:
    pool_id: str
    address: IPAddress


def parse_release_address(body: Body) -> ReleaseAddress:
    pool_id = parse_pool_id(body)
    address = _bare_ip(_field(body, "Address", str, required=True), "Address")
    if address is None:
        raise errors.InvalidParameter("field 'Address' is empty")
    return ReleaseAddress(pool_id, address)
