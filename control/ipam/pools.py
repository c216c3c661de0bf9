"""Default address pools and the host's routes they must not overlap.

Owns Docker's default pool lists (spec/remote-protocol.md, "Default IPAM"): the local
default (172.17-31.x.x/16 and 192.168.0.0/16 split into /20s, 31 pools), the global
default (10.0.0.0/8 split into /24s), the `{base, size}` override form, and reading the
host's IPv4/IPv6 routes from /proc (the calling process's network namespace), and the
pool arithmetic every allocator shares (the SQLite one in default.py, the etcd one in
scoped.py): request checks, pool ids, host and sub-pool ranges, which addresses may be
assigned, and the kind of an address request. Each raises InvalidParameter on bad input.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from .. import errors
from ..types import IPAddress, IPNetwork
from .api import AUX_ADDRESS_TYPE, GATEWAY_ADDRESS_TYPE, REQUEST_ADDRESS_TYPE, PoolRequest

LOCAL_DEFAULT = "LocalDefault"
GLOBAL_DEFAULT = "GlobalDefault"


@dataclass(frozen=True)
class PoolSpec:
    """A base network split into subnets of `size` bits: Docker's `{base, size}`."""

    base: str
    size: int

    def subnets(self) -> Iterator[IPNetwork]:
        try:
            net = ipaddress.ip_network(self.base)
        except ValueError as exc:
            raise errors.InvalidParameter(f"invalid pool base {self.base!r}: {exc}") from None
        if self.size < net.prefixlen or self.size > net.max_prefixlen:
            raise errors.InvalidParameter(f"pool size /{self.size} does not fit base {self.base}")
        return net.subnets(new_prefix=self.size)


LOCAL_POOLS: tuple[PoolSpec, ...] = (
    PoolSpec("172.17.0.0/16", 16),
    PoolSpec("172.18.0.0/16", 16),
    PoolSpec("172.19.0.0/16", 16),
    PoolSpec("172.20.0.0/14", 16),
    PoolSpec("172.24.0.0/14", 16),
    PoolSpec("172.28.0.0/14", 16),
    PoolSpec("192.168.0.0/16", 20),
)
GLOBAL_POOLS: tuple[PoolSpec, ...] = (PoolSpec("10.0.0.0/8", 24),)


def default_subnets(specs: Sequence[PoolSpec]) -> Iterator[IPNetwork]:
    for spec in specs:
        yield from spec.subnets()


def ula_pool(seed: str) -> PoolSpec:
    """This host's IPv6 default: an RFC 4193 /48 (global id from `seed`) split into /64s."""
    gid = int(seed[:10], 16)
    prefix = (0xFD << 120) | (gid << 80)
    return PoolSpec(f"{ipaddress.IPv6Address(prefix)}/48", 64)


def _hex_le_ipv4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(text), "little"))


def host_routes(proc: str = "/proc/net") -> list[IPNetwork]:
    """Destinations of the routes in this namespace's main table, default routes excluded."""
    routes: list[IPNetwork] = []
    try:
        with open(f"{proc}/route") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) < 8:
                    continue
                dst, mask = _hex_le_ipv4(fields[1]), _hex_le_ipv4(fields[7])
                net = ipaddress.IPv4Network(f"{dst}/{mask}", strict=False)
                if net.prefixlen:
                    routes.append(net)
    except OSError:
        pass
    try:
        with open(f"{proc}/ipv6_route") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 10 or fields[9] == "lo":
                    continue
                plen = int(fields[1], 16)
                if plen == 0:
                    continue
                net6 = ipaddress.IPv6Network((int(fields[0], 16), plen), strict=False)
                if not net6.is_link_local and not net6.is_multicast:
                    routes.append(net6)
    except OSError:
        pass
    return routes


# --- pool arithmetic --------------------------------------------------------------------


def check_pool_request(req: PoolRequest) -> None:
    """The pool matches the request's IP version and the sub-pool lies inside the pool."""
    if req.pool is not None and req.pool.version != (6 if req.v6 else 4):
        raise errors.InvalidParameter(f"pool {req.pool} does not match V6={req.v6}")
    if req.sub_pool is not None and (
        req.pool is None
        or req.sub_pool.version != req.pool.version
        or not req.sub_pool.subnet_of(req.pool)  # type: ignore[arg-type]
    ):
        raise errors.InvalidParameter(f"sub-pool {req.sub_pool} is not inside pool {req.pool}")


def make_pool_id(address_space: str, net: IPNetwork, sub_pool: IPNetwork | None = None) -> str:
    """libnetwork's pool id: `<address space>/<pool>[/<sub-pool>]`."""
    return f"{address_space}/{net}" + (f"/{sub_pool}" if sub_pool is not None else "")


def host_range(net: IPNetwork) -> tuple[int, int]:
    """First and last assignable address: never the network address or IPv4 broadcast."""
    lo = int(net.network_address) + 1
    hi = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    return lo, hi


def endpoint_range(net: IPNetwork, sub_pool: IPNetwork | None = None) -> tuple[int, int]:
    """The range endpoint addresses come from: the host range, narrowed to `sub_pool`
    (gateway and aux addresses may lie anywhere in the host range)."""
    lo, hi = host_range(net)
    if sub_pool is not None:
        lo = max(lo, int(sub_pool.network_address))
        hi = min(hi, int(sub_pool.broadcast_address))
    if lo > hi:
        raise errors.InvalidParameter(f"pool {net} has no assignable address")
    return lo, hi


def check_assignable(net: IPNetwork, address: IPAddress) -> int:
    """`address` as an integer when it may be assigned in `net`: inside it, neither its
    network address nor its IPv4 broadcast."""
    if address.version != net.version or address not in net:
        raise errors.InvalidParameter(f"address {address} is outside pool {net}")
    value = int(address)
    if value == int(net.network_address) or (
        net.version == 4 and value == int(net.broadcast_address)
    ):
        raise errors.InvalidParameter(
            f"address {address} is the network or broadcast address of {net}"
        )
    return value


def address_kind(options: Mapping[str, str] | None) -> str:
    """What an address request is for: "gateway", "aux" or "endpoint"."""
    if not options:
        return "endpoint"
    return {GATEWAY_ADDRESS_TYPE: "gateway", AUX_ADDRESS_TYPE: "aux"}.get(
        options.get(REQUEST_ADDRESS_TYPE, ""), "endpoint"
    )
