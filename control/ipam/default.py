"""The default IPAM: pools and addresses kept in the embedded store.

Owns pool selection (first free default pool that overlaps neither another pool nor a
route of the host), pool ids (`LocalDefault/<pool>[/<sub-pool>]`), and address
allocation. Each allocated address is one row, so memory and storage grow with what is
allocated, never with the size of the pool (a /64 costs nothing until used). Addresses
are handed out serially from a per-pool cursor, wrapping at the end, so a released
address is not reused at once (stale ARP caches elsewhere would otherwise bite).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping, Sequence

from .. import errors
from ..store.sqlite import SQLiteStore
from ..types import IPAddress, IPInterface, IPNetwork, new_id
from .api import PoolRequest, PoolResult
from .pools import (
    GLOBAL_DEFAULT,
    GLOBAL_POOLS,
    LOCAL_DEFAULT,
    LOCAL_POOLS,
    PoolSpec,
    address_kind,
    check_assignable,
    check_pool_request,
    endpoint_range,
    host_range,
    host_routes,
    make_pool_id,
    ula_pool,
)

_SCAN_CHUNK = 512


def _blob(value: int) -> bytes:
    return value.to_bytes(16, "big")


def _int(blob: bytes) -> int:
    return int.from_bytes(blob, "big")


@functools.lru_cache(maxsize=1024)
def _subnet(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def _make_ip(version: int, value: int) -> IPAddress:
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


class DefaultIpam:
    """libnetwork's default IPAM driver, persisted in the SQLite store."""

    name = "default"

    def __init__(
        self,
        store: SQLiteStore,
        *,
        local_pools: Sequence[PoolSpec] = LOCAL_POOLS,
        global_pools: Sequence[PoolSpec] = GLOBAL_POOLS,
        routes: Callable[[], list[IPNetwork]] = host_routes,
    ) -> None:
        self._store = store
        self._local_pools = tuple(local_pools)
        self._global_pools = tuple(global_pools)
        self._routes = routes
        with store.tx():  # one seed per store, whichever process opens it first
            seed = store.meta("ula_seed")
            if seed is None:
                seed = new_id()
                store.set_meta("ula_seed", seed)
        self._ula = ula_pool(seed)

    def default_address_spaces(self) -> tuple[str, str]:
        return LOCAL_DEFAULT, GLOBAL_DEFAULT

    def transactional(self, ref: str) -> bool:
        """Whether what is allocated under `ref` (a pool id or an address space) lives
        in the controller's store, so that a store rollback undoes it and the calls
        belong inside the store's write transaction: always, here."""
        return True

    # --- pools -------------------------------------------------------------------------

    def _overlapping_pool(self, net: IPNetwork) -> str | None:
        lo, hi = int(net.network_address), int(net.broadcast_address)
        row = self._store.fetchone(
            "SELECT subnet FROM ipam_pools WHERE version=? AND net_lo<=? AND net_hi>=? LIMIT 1",
            (net.version, _blob(hi), _blob(lo)),
        )
        return row[0] if row else None

    def _pick_default(self, req: PoolRequest) -> IPNetwork:
        if req.v6:
            specs: Sequence[PoolSpec] = (self._ula,)
        elif req.address_space == GLOBAL_DEFAULT:
            specs = self._global_pools
        else:
            specs = self._local_pools
        routes = [r for r in self._routes() if r.version == (6 if req.v6 else 4)]
        for spec in specs:
            for net in spec.subnets():
                if self._overlapping_pool(net):
                    continue
                if any(net.overlaps(r) for r in routes):  # type: ignore[arg-type]
                    continue
                return net
        raise errors.NoFreePool("IPv6" if req.v6 else "IPv4")

    def request_pool(self, req: PoolRequest) -> PoolResult:
        if req.address_space not in (LOCAL_DEFAULT, GLOBAL_DEFAULT):
            raise errors.InvalidParameter(f"unknown address space {req.address_space!r}")
        check_pool_request(req)
        with self._store.tx():
            if req.pool is None:
                net = self._pick_default(req)
            else:
                net = req.pool
                other = self._overlapping_pool(net)
                if other is not None:
                    raise errors.PoolOverlap(str(net), other)
            pid = make_pool_id(req.address_space, net, req.sub_pool)
            rlo, rhi = endpoint_range(net, req.sub_pool)
            self._store.execute(
                "INSERT INTO ipam_pools (pool_id, address_space, subnet, version, net_lo, net_hi,"
                " range_lo, range_hi, cursor, refcount) VALUES (?,?,?,?,?,?,?,?,NULL,1)",
                (
                    pid,
                    req.address_space,
                    str(net),
                    net.version,
                    _blob(int(net.network_address)),
                    _blob(int(net.broadcast_address)),
                    _blob(rlo),
                    _blob(rhi),
                ),
            )
        return PoolResult(pool_id=pid, pool=net)

    def release_pool(self, pool_id: str) -> None:
        with self._store.tx():
            self._pool(pool_id)
            self._store.execute("DELETE FROM ipam_addresses WHERE pool_id=?", (pool_id,))
            self._store.execute("DELETE FROM ipam_pools WHERE pool_id=?", (pool_id,))

    def _pool(self, pool_id: str) -> tuple[IPNetwork, int, int, int | None]:
        row = self._store.fetchone(
            "SELECT subnet, range_lo, range_hi, cursor FROM ipam_pools WHERE pool_id=?",
            (pool_id,),
        )
        if row is None:
            raise errors.NotFound(f"IPAM pool {pool_id!r} not found")
        net = _subnet(row[0])
        return net, _int(row[1]), _int(row[2]), (_int(row[3]) if row[3] is not None else None)

    def pools(self) -> list[str]:
        return [r[0] for r in self._store.fetchall("SELECT pool_id FROM ipam_pools")]

    # --- addresses ---------------------------------------------------------------------

    def _next_free(self, pool_id: str, start: int, hi: int) -> int | None:
        """The lowest unallocated address in [start, hi], walking allocated rows in order."""
        cand = start
        while cand <= hi:
            rows = self._store.fetchall(
                "SELECT addr FROM ipam_addresses WHERE pool_id=? AND addr>=? AND addr<=?"
                " ORDER BY addr LIMIT ?",
                (pool_id, _blob(cand), _blob(hi), _SCAN_CHUNK),
            )
            for (blob,) in rows:
                if _int(blob) != cand:
                    return cand
                cand += 1
            if len(rows) < _SCAN_CHUNK:
                return cand if cand <= hi else None
        return None

    def request_address(
        self,
        pool_id: str,
        address: IPAddress | None = None,
        options: Mapping[str, str] | None = None,
        *,
        owner: str = "",
    ) -> IPInterface:
        return self.request_addresses(pool_id, [address], options, owners=[owner])[0]

    def request_addresses(
        self,
        pool_id: str,
        addresses: Sequence[IPAddress | None],
        options: Mapping[str, str] | None = None,
        *,
        owners: Sequence[str] | None = None,
    ) -> list[IPInterface]:
        """Allocate many addresses in one transaction: all of them, or none."""
        kind = address_kind(options)
        owners = owners or [""] * len(addresses)
        out: list[IPInterface] = []
        with self._store.tx():
            net, rlo, rhi, cursor = self._pool(pool_id)
            plo, phi = host_range(net)
            # The gateway is taken from the whole pool; endpoints only from the range.
            lo, hi = (plo, phi) if kind != "endpoint" else (rlo, rhi)
            rows: list[tuple[str, bytes, str, str]] = []
            for want, owner in zip(addresses, owners, strict=True):
                if want is None:
                    serial = kind == "endpoint" and cursor is not None and lo <= cursor < hi
                    start = cursor + 1 if serial and cursor is not None else lo
                    value = self._next_free(pool_id, start, hi)
                    if value is None and start > lo:
                        value = self._next_free(pool_id, lo, start - 1)
                    if value is None:
                        raise errors.PoolExhausted(str(net))
                    if kind == "endpoint":
                        cursor = value
                else:
                    value = check_assignable(net, want)
                    if self._store.fetchone(
                        "SELECT 1 FROM ipam_addresses WHERE pool_id=? AND addr=?",
                        (pool_id, _blob(value)),
                    ):
                        raise errors.AddressInUse(str(want))
                blob = _blob(value)
                self._store.execute(
                    "INSERT INTO ipam_addresses (pool_id, addr, kind, owner) VALUES (?,?,?,?)",
                    (pool_id, blob, kind, owner),
                )
                rows.append((pool_id, blob, kind, owner))
                iface = ipaddress.IPv4Interface if net.version == 4 else ipaddress.IPv6Interface
                out.append(iface((value, net.prefixlen)))
            if cursor is not None:
                self._store.execute(
                    "UPDATE ipam_pools SET cursor=? WHERE pool_id=?", (_blob(cursor), pool_id)
                )
        return out

    def release_address(self, pool_id: str, address: IPAddress) -> None:
        self.release_addresses(pool_id, [address])

    def release_addresses(self, pool_id: str, addresses: Sequence[IPAddress]) -> None:
        """Release many addresses in one transaction; each must be allocated."""
        with self._store.tx():
            net = self._pool(pool_id)[0]
            for address in addresses:
                if address.version != net.version or address not in net:
                    raise errors.AddressNotFound(str(address), str(net))
                cur = self._store.execute(
                    "DELETE FROM ipam_addresses WHERE pool_id=? AND addr=?",
                    (pool_id, _blob(int(address))),
                )
                if cur.rowcount != 1:
                    raise errors.AddressNotFound(str(address), str(net))

    def allocated(self, pool_id: str) -> list[tuple[IPAddress, str, str]]:
        """Every allocated address of a pool with its kind and owner, in address order."""
        net = self._pool(pool_id)[0]
        rows = self._store.fetchall(
            "SELECT addr, kind, owner FROM ipam_addresses WHERE pool_id=? ORDER BY addr",
            (pool_id,),
        )
        return [(_make_ip(net.version, _int(a)), k, o) for a, k, o in rows]
