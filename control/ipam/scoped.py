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
from .api import PoolRequest, PoolResult
from .default import DefaultIpam
from .pools import (
    GLOBAL_DEFAULT,
    address_kind,
    check_assignable,
    check_pool_request,
    endpoint_range,
    host_range,
    host_routes,
    make_pool_id,
)

POOLS_KEY = "ipam/pools"
_RETRIES = 32


def _addr_prefix(pool_id: str) -> str:
    return f"ipam/addrs/{pool_id.replace('/', '_')}/"


class ScopedIpam(DefaultIpam):
    """DefaultIpam for local pools; the global address space in etcd.

    Global calls are etcd round trips (retried under contention): `transactional()` is
    False for them, so the controller makes them outside its SQLite transaction and gives
    back what they took when a later step fails. Errors: PoolOverlap, AddressInUse,
    PoolExhausted, NotFound / AddressNotFound as DefaultIpam; GlobalStoreUnavailable when
    etcd does not answer or contention outlasts the retries.
    """

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
        self._used: dict[str, set[int]] = {}  # pool id -> addresses known to be taken

    @staticmethod
    def is_global(pool_id: str) -> bool:
        return pool_id.startswith(GLOBAL_DEFAULT + "/")

    def transactional(self, ref: str) -> bool:
        """False for the global address space and its pools (they live in etcd)."""
        return ref != GLOBAL_DEFAULT and not self.is_global(ref)

    # --- pools ----------------------------------------------------------------------

    def _pools(self) -> tuple[dict[str, dict[str, object]], int]:
        kv = self.etcd.get(POOLS_KEY)
        return (dict(kv.value), kv.mod_revision) if kv else ({}, 0)

    def request_pool(self, req: PoolRequest) -> PoolResult:
        if req.address_space != GLOBAL_DEFAULT:
            return super().request_pool(req)
        check_pool_request(req)
        for _ in range(_RETRIES):
            pools, rev = self._pools()
            taken = [ipaddress.ip_network(str(p["subnet"])) for p in pools.values()]
            net = req.pool if req.pool is not None else self._pick_global(req, taken)
            for other in taken:
                if other.version == net.version and other.overlaps(net):  # type: ignore[arg-type]
                    raise errors.PoolOverlap(str(net), str(other))
            pool_id = make_pool_id(GLOBAL_DEFAULT, net, req.sub_pool)
            rlo, rhi = endpoint_range(net, req.sub_pool)
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
        self._used.pop(pool_id, None)
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
        kind = address_kind(options)
        plo, phi = host_range(net)
        lo, hi = (plo, phi) if kind != "endpoint" else (rlo, rhi)
        iface = ipaddress.IPv4Interface if net.version == 4 else ipaddress.IPv6Interface
        record = {"kind": kind, "owner": owner, "host": self.host}
        prefix = _addr_prefix(pool_id)
        if address is not None:
            value = check_assignable(net, address)
            if not self.etcd.create(prefix + str(address), record):
                raise errors.AddressInUse(str(address))
            return iface((value, net.prefixlen))
        # What this process knows is taken (read from etcd on first use and whenever a
        # claim fails): a stale view costs a failed compare-and-swap, never a duplicate.
        used = self._used.get(pool_id)
        fresh = False
        for _ in range(_RETRIES):
            if used is None:
                kvs, _ = self.etcd.range(prefix)
                used = {int(ipaddress.ip_address(kv.key.rsplit("/", 1)[1])) for kv in kvs}
                self._used[pool_id] = used
                fresh = True
            value = next((v for v in range(lo, hi + 1) if v not in used), None)
            if value is None:
                if fresh:
                    raise errors.PoolExhausted(str(net))
                used = None  # others may have given some back
                continue
            ip = ipaddress.ip_address(value)
            if self.etcd.create(prefix + str(ip), record):
                used.add(value)
                return iface((value, net.prefixlen))
            used = None
        raise errors.GlobalStoreUnavailable("etcd: too much contention on address allocation")

    def release_address(self, pool_id: str, address: IPAddress) -> None:
        if not self.is_global(pool_id):
            return super().release_address(pool_id, address)
        key = _addr_prefix(pool_id) + str(address)
        ok, _ = self.etcd.txn([Compare(key, "CREATE", 0, "NOT_EQUAL")], [Delete(key)])
        self._used.pop(pool_id, None)  # read again on the next request
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


__all__ = ["ScopedIpam"]
