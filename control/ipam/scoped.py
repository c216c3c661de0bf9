"""The default IPAM with a global address space in etcd.

Owns the split by scope: pools of the local address space (`LocalDefault/...`) stay in
the embedded store (DefaultIpam, inherited unchanged), pools of the global one
(`GlobalDefault/...`, the overlay networks') and their addresses live in etcd, so every
host sees the same allocations. Pools are one index record changed by compare-and-swap
(two hosts can never hold overlapping subnets); each address is its own key created only
if absent (two hosts can never hand out the same address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping

from .. import errors
from ..store.etcd import Compare, Delete, EtcdStore, Put
from ..store.sqlite import SQLiteStore
from ..types import IPAddress, IPInterface, IPNetwork
from .api import (
    AUX_ADDRESS_TYPE,
    GATEWAY_ADDRESS_TYPE,
    REQUEST_ADDRESS_TYPE,
    PoolRequest,
    PoolResult,
)
from .default import DefaultIpam
from .pools import GLOBAL_DEFAULT, host_routes

POOLS_KEY = "ipam/pools"
_RETRIES = 32


def _addr_prefix(pool_id: str) -> str:
    return f"ipam/addrs/{pool_id.replace('/', '_')}/"


def _kind(options: Mapping[str, str] | None) -> str:
    if not options:
        return "endpoint"
    return {GATEWAY_ADDRESS_TYPE: "gateway", AUX_ADDRESS_TYPE: "aux"}.get(
        options.get(REQUEST_ADDRESS_TYPE, ""), "endpoint"
    )


class ScopedIpam(DefaultIpam):
    """DefaultIpam for local pools; the global address space in etcd."""

    def __init__(
        self,
        store: SQLiteStore,
        etcd: EtcdStore,
        *,
        host: str = "",
        routes: Callable[[], list[IPNetwork]] = host_routes,
    ) -> None:
        super().__init__(store, routes=routes)
        self.etcd = etcd
        self.host = host

    @staticmethod
    def is_global(pool_id: str) -> bool:
        return pool_id.startswith(GLOBAL_DEFAULT + "/")

    # --- pools ----------------------------------------------------------------------

    def _pools(self) -> tuple[dict[str, dict[str, object]], int]:
        kv = self.etcd.get(POOLS_KEY)
        return (dict(kv.value), kv.mod_revision) if kv else ({}, 0)

    def request_pool(self, req: PoolRequest) -> PoolResult:
        if req.address_space != GLOBAL_DEFAULT:
            return super().request_pool(req)
        if req.pool is not None and req.pool.version != (6 if req.v6 else 4):
            raise errors.InvalidParameter(f"pool {req.pool} does not match V6={req.v6}")
        if req.sub_pool is not None and (
            req.pool is None
            or req.sub_pool.version != req.pool.version
            or not req.sub_pool.subnet_of(req.pool)  # type: ignore[arg-type]
        ):
            raise errors.InvalidParameter(f"sub-pool {req.sub_pool} is not inside pool {req.pool}")
        for _ in range(_RETRIES):
            pools, rev = self._pools()
            taken = [ipaddress.ip_network(str(p["subnet"])) for p in pools.values()]
            net = req.pool if req.pool is not None else self._pick_global(req, taken)
            for other in taken:
                if other.version == net.version and other.overlaps(net):  # type: ignore[arg-type]
                    raise errors.PoolOverlap(str(net), str(other))
            pool_id = f"{GLOBAL_DEFAULT}/{net}"
            if req.sub_pool is not None:
                pool_id += f"/{req.sub_pool}"
            lo, hi = _host_range(net)
            rlo, rhi = lo, hi
            if req.sub_pool is not None:
                rlo = max(lo, int(req.sub_pool.network_address))
                rhi = min(hi, int(req.sub_pool.broadcast_address))
            if rlo > rhi:
                raise errors.InvalidParameter(f"pool {net} has no assignable address")
            pools[pool_id] = {"subnet": str(net), "range": [rlo, rhi], "host": self.host}
            cmp = Compare.unchanged(POOLS_KEY, rev) if rev else Compare.absent(POOLS_KEY)
            ok, _ = self.etcd.txn([cmp], [Put(POOLS_KEY, pools)])
            if ok:
                return PoolResult(pool_id=pool_id, pool=net)
        raise errors.GlobalStoreUnavailable("etcd: too much contention on the pool index")

    def _pick_global(self, req: PoolRequest, taken: list[IPNetwork]) -> IPNetwork:
        if req.v6:
            raise errors.InvalidParameter("global IPv6 pools need an explicit subnet")
        routes = [r for r in self._routes() if r.version == 4]
        for spec in self._global_pools:
            for net in spec.subnets():
                if any(net.overlaps(t) for t in taken if t.version == 4):  # type: ignore[arg-type]
                    continue
                if any(net.overlaps(r) for r in routes):  # type: ignore[arg-type]
                    continue
                return net
        raise errors.NoFreePool("IPv4")

    def release_pool(self, pool_id: str) -> None:
        if not self.is_global(pool_id):
            return super().release_pool(pool_id)
        for _ in range(_RETRIES):
            pools, rev = self._pools()
            if pool_id not in pools:
                raise errors.NotFound(f"IPAM pool {pool_id!r} not found")
            del pools[pool_id]
            ok, _ = self.etcd.txn(
                [Compare.unchanged(POOLS_KEY, rev)],
                [Put(POOLS_KEY, pools), Delete(_addr_prefix(pool_id), prefix=True)],
            )
            if ok:
                return
        raise errors.GlobalStoreUnavailable("etcd: too much contention on the pool index")

    def global_pools(self) -> dict[str, dict[str, object]]:
        return self._pools()[0]

    # --- addresses ------------------------------------------------------------------

    def _global_pool(self, pool_id: str) -> tuple[IPNetwork, int, int]:
        pools, _ = self._pools()
        p = pools.get(pool_id)
        if p is None:
            raise errors.NotFound(f"IPAM pool {pool_id!r} not found")
        lo, hi = p["range"]  # type: ignore[misc]
        return ipaddress.ip_network(str(p["subnet"])), int(lo), int(hi)

    def request_address(
        self,
        pool_id: str,
        address: IPAddress | None = None,
        options: Mapping[str, str] | None = None,
        *,
        owner: str = "",
    ) -> IPInterface:
        if not self.is_global(pool_id):
            return super().request_address(pool_id, address, options, owner=owner)
        net, rlo, rhi = self._global_pool(pool_id)
        kind = _kind(options)
        plo, phi = _host_range(net)
        lo, hi = (plo, phi) if kind != "endpoint" else (rlo, rhi)
        iface = ipaddress.IPv4Interface if net.version == 4 else ipaddress.IPv6Interface
        record = {"kind": kind, "owner": owner, "host": self.host}
        prefix = _addr_prefix(pool_id)
        if address is not None:
            if address.version != net.version or address not in net:
                raise errors.InvalidParameter(f"address {address} is outside pool {net}")
            value = int(address)
            if value == int(net.network_address) or (
                net.version == 4 and value == int(net.broadcast_address)
            ):
                raise errors.InvalidParameter(
                    f"address {address} is the network or broadcast address of {net}"
                )
            if not self.etcd.create(prefix + str(address), record):
                raise errors.AddressInUse(str(address))
            return iface((value, net.prefixlen))
        for _ in range(_RETRIES):
            kvs, _ = self.etcd.range(prefix)
            used = {int(ipaddress.ip_address(kv.key.rsplit("/", 1)[1])) for kv in kvs}
            value = next((v for v in range(lo, hi + 1) if v not in used), None)
            if value is None:
                raise errors.PoolExhausted(str(net))
            ip = ipaddress.ip_address(value)
            if self.etcd.create(prefix + str(ip), record):
                return iface((value, net.prefixlen))
        raise errors.GlobalStoreUnavailable("etcd: too much contention on address allocation")

    def release_address(self, pool_id: str, address: IPAddress) -> None:
        if not self.is_global(pool_id):
            return super().release_address(pool_id, address)
        key = _addr_prefix(pool_id) + str(address)
        ok, _ = self.etcd.txn([Compare(key, "CREATE", 0, "NOT_EQUAL")], [Delete(key)])
        if not ok:
            raise errors.AddressNotFound(str(address), pool_id)

    def global_allocated(self, pool_id: str) -> list[tuple[IPAddress, str, str, str]]:
        """Every address of a global pool: (address, kind, owner, host)."""
        kvs, _ = self.etcd.range(_addr_prefix(pool_id))
        out = []
        for kv in kvs:
            ip = ipaddress.ip_address(kv.key.rsplit("/", 1)[1])
            v = kv.value or {}
            out.append(
                (ip, str(v.get("kind", "")), str(v.get("owner", "")), str(v.get("host", "")))
            )
        return sorted(out, key=lambda t: int(t[0]))


def _host_range(net: IPNetwork) -> tuple[int, int]:
    lo = int(net.network_address) + 1
    hi = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    return lo, hi


__all__ = ["ScopedIpam"]
