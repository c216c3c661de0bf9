"""Default address pools, pool selection, pool ids and the host's routes.

Covers control/ipam/pools.py (Docker's default pool lists, `{base, size}` specs, the ULA
default, /proc/net route parsing) and the pool half of control/ipam/default.py: which
default pool a request without a subnet gets, the pool-id scheme, PoolOverlap, and the
validation of pool requests (spec/remote-protocol.md, "Default IPAM").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cnm.control import errors
from cnm.control.ipam.api import PoolRequest
from cnm.control.ipam.default import DefaultIpam
from cnm.control.ipam.pools import (
    GLOBAL_DEFAULT,
    GLOBAL_POOLS,
    LOCAL_DEFAULT,
    LOCAL_POOLS,
    PoolSpec,
    default_subnets,
    host_routes,
    ula_pool,
)
from cnm.control.store.sqlite import SQLiteStore
from cnm.control.types import IPNetwork

net = ipaddress.ip_network


def _expected_local_defaults() -> list[IPNetwork]:
    """Docker's local default list, written out by hand: 15 /16s in 172.16/12, 16 /20s."""
    out: list[IPNetwork] = [net(f"172.{b}.0.0/16") for b in range(17, 32)]
    out += [net(f"192.168.{16 * i}.0/20") for i in range(16)]
    return out


def _no_routes() -> list[IPNetwork]:
    return []


_OPEN: list[SQLiteStore] = []


@pytest.fixture(autouse=True)
def _close_stores() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _ipam(tmp_path: Path, routes: Callable[[], list[IPNetwork]] = _no_routes, **kw) -> DefaultIpam:
    """A DefaultIpam on a fresh store (closed after the test) with injected routes."""
    store = SQLiteStore(str(tmp_path / "state"))
    _OPEN.append(store)
    return DefaultIpam(store, routes=routes, **kw)


def _local(pool: str | None = None, sub: str | None = None, v6: bool = False) -> PoolRequest:
    return PoolRequest(
        address_space=LOCAL_DEFAULT,
        pool=net(pool) if pool else None,
        sub_pool=net(sub) if sub else None,
        v6=v6,
    )


# --- the default pool lists -----------------------------------------------------------


def test_local_default_pools_are_dockers_31_pools_in_order() -> None:
    pools = list(default_subnets(LOCAL_POOLS))
    assert len(pools) == 31
    assert pools == _expected_local_defaults()
    assert pools[0] == net("172.17.0.0/16")
    assert pools[14] == net("172.31.0.0/16")
    assert pools[15] == net("192.168.0.0/20")
    assert pools[-1] == net("192.168.240.0/20")
    # The /14s at .20, .24 and .28 are split into /16s, not handed out whole.
    assert all(p.prefixlen == 16 for p in pools[:15])
    assert net("172.20.0.0/14") not in pools


def test_global_default_is_10_slash_8_in_slash_24s() -> None:
    assert [(s.base, s.size) for s in GLOBAL_POOLS] == [("10.0.0.0/8", 24)]
    it = default_subnets(GLOBAL_POOLS)
    first = [next(it) for _ in range(3)]
    assert first == [net("10.0.0.0/24"), net("10.0.1.0/24"), net("10.0.2.0/24")]
    assert sum(1 for _ in it) + 3 == 2**16
    assert (LOCAL_DEFAULT, GLOBAL_DEFAULT) == ("LocalDefault", "GlobalDefault")


def test_pool_spec_splits_base_and_rejects_sizes_that_do_not_fit() -> None:
    assert list(PoolSpec("10.1.0.0/23", 24).subnets()) == [net("10.1.0.0/24"), net("10.1.1.0/24")]
    assert list(PoolSpec("10.1.0.0/24", 24).subnets()) == [net("10.1.0.0/24")]
    with pytest.raises(errors.InvalidParameter):
        PoolSpec("10.1.0.0/24", 16).subnets()
    with pytest.raises(errors.InvalidParameter):
        PoolSpec("10.1.0.0/24", 33).subnets()
    with pytest.raises(errors.InvalidParameter):
        PoolSpec("fd00::/48", 129).subnets()


def test_ula_pool_is_a_deterministic_rfc4193_slash48_split_in_slash64s() -> None:
    seed = "0123456789abcdef" * 4
    spec = ula_pool(seed)
    assert spec == ula_pool(seed)
    assert spec.base == "fd01:2345:6789::/48"
    assert spec.size == 64
    first = next(spec.subnets())
    assert first == net("fd01:2345:6789::/64")
    assert first.subnet_of(net("fd00::/8"))
    assert ula_pool("f" * 64).base == "fdff:ffff:ffff::/48"
    assert ula_pool("f" * 64) != spec


# --- host routes from /proc/net -------------------------------------------------------

_ROUTE_HEADER = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
)


def _v4_line(iface: str, dst: str, gw: str, mask: str, flags: str = "0001") -> str:
    def le(a: str) -> str:
        return ipaddress.IPv4Address(a).packed[::-1].hex().upper()

    return f"{iface}\t{le(dst)}\t{le(gw)}\t{flags}\t0\t0\t100\t{le(mask)}\t0\t0\t0\n"


def _v6_line(dst: str, plen: int, iface: str) -> str:
    hexdst = ipaddress.IPv6Address(dst).packed.hex()
    zero = "0" * 32
    return f"{hexdst} {plen:02x} {zero} 00 {zero} 00000100 00000001 00000000 00000001 {iface:>8}\n"


def _write_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc_net"
    proc.mkdir()
    (proc / "route").write_text(
        _ROUTE_HEADER
        + _v4_line("eth0", "0.0.0.0", "192.168.2.1", "0.0.0.0", "0003")  # default
        + _v4_line("eth0", "192.168.2.0", "0.0.0.0", "255.255.255.0")
        + _v4_line("docker0", "172.17.0.0", "0.0.0.0", "255.255.0.0")
        + _v4_line("wg0", "10.8.0.0", "0.0.0.0", "255.254.0.0")
        + _v4_line("eth1", "203.0.113.7", "0.0.0.0", "255.255.255.255")
        + "garbage line\n"
    )
    (proc / "ipv6_route").write_text(
        _v6_line("2001:db8:1::", 64, "eth0")
        + _v6_line("::", 0, "eth0")  # default
        + _v6_line("fe80::", 64, "eth0")  # link-local
        + _v6_line("ff00::", 8, "eth0")  # multicast
        + _v6_line("::1", 128, "lo")  # loopback
        + _v6_line("fd12:3456:789a:1::", 64, "br0")
        + "short line\n"
    )
    return proc


def test_host_routes_parses_proc_net_and_drops_default_routes(tmp_path: Path) -> None:
    proc = _write_proc(tmp_path)
    routes = host_routes(proc=str(proc))
    assert routes == [
        net("192.168.2.0/24"),
        net("172.17.0.0/16"),
        net("10.8.0.0/15"),
        net("203.0.113.7/32"),
        net("2001:db8:1::/64"),
        net("fd12:3456:789a:1::/64"),
    ]
    assert all(r.prefixlen > 0 for r in routes)


def test_host_routes_tolerates_missing_files(tmp_path: Path) -> None:
    assert host_routes(proc=str(tmp_path / "nowhere")) == []
    only_v4 = tmp_path / "only_v4"
    only_v4.mkdir()
    (only_v4 / "route").write_text(
        _ROUTE_HEADER + _v4_line("e", "10.9.0.0", "0.0.0.0", "255.255.0.0")
    )
    assert host_routes(proc=str(only_v4)) == [net("10.9.0.0/16")]


def test_default_pool_skips_routes_read_from_proc(tmp_path: Path) -> None:
    """End to end: the /proc/net parser feeds pool selection; the default route is ignored."""
    proc = _write_proc(tmp_path)
    ipam = _ipam(tmp_path, routes=lambda: host_routes(proc=str(proc)))
    # 172.17/16 is routed (docker0) -> skipped; the default route does not block everything.
    assert ipam.request_pool(_local()).pool == net("172.18.0.0/16")
    assert ipam.request_pool(PoolRequest(GLOBAL_DEFAULT)).pool == net("10.0.0.0/24")


# --- default pool selection -----------------------------------------------------------


def test_requests_without_pool_walk_the_local_defaults_in_order(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    got = [ipam.request_pool(_local()) for _ in range(31)]
    assert [r.pool for r in got] == _expected_local_defaults()
    assert [r.pool_id for r in got[:2]] == [
        "LocalDefault/172.17.0.0/16",
        "LocalDefault/172.18.0.0/16",
    ]
    assert got[-1].pool_id == "LocalDefault/192.168.240.0/20"
    with pytest.raises(errors.NoFreePool):
        ipam.request_pool(_local())
    # Releasing one makes exactly that one available again.
    ipam.release_pool("LocalDefault/172.25.0.0/16")
    assert ipam.request_pool(_local()).pool == net("172.25.0.0/16")


def test_global_address_space_uses_the_global_defaults(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    assert ipam.default_address_spaces() == ("LocalDefault", "GlobalDefault")
    a = ipam.request_pool(PoolRequest(GLOBAL_DEFAULT))
    b = ipam.request_pool(PoolRequest(GLOBAL_DEFAULT))
    assert (a.pool_id, a.pool) == ("GlobalDefault/10.0.0.0/24", net("10.0.0.0/24"))
    assert (b.pool_id, b.pool) == ("GlobalDefault/10.0.1.0/24", net("10.0.1.0/24"))
    # The local list is untouched by global allocations.
    assert ipam.request_pool(_local()).pool == net("172.17.0.0/16")


def test_default_selection_skips_pools_in_use_even_partially(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    ipam.request_pool(_local("172.17.0.0/16"))
    ipam.request_pool(_local("172.18.200.0/24"))  # overlaps 172.18/16
    ipam.request_pool(_local("172.19.0.0/16", "172.19.1.0/24"))
    assert ipam.request_pool(_local()).pool == net("172.20.0.0/16")
    # A supernet in use blocks every default inside it.
    ipam2 = _ipam(tmp_path / "second")
    ipam2.request_pool(_local("172.16.0.0/12"))
    assert ipam2.request_pool(_local()).pool == net("192.168.0.0/20")


def test_default_selection_skips_pools_overlapping_host_routes(tmp_path: Path) -> None:
    routes = [
        net("172.17.0.0/16"),  # equal
        net("172.18.3.0/24"),  # inside
        net("172.19.0.0/16"),
        net("172.20.0.0/14"),  # covers four defaults
    ]
    ipam = _ipam(tmp_path, routes=lambda: routes)
    assert ipam.request_pool(_local()).pool == net("172.24.0.0/16")
    # IPv6 routes do not affect IPv4 selection, and vice versa.
    ipam6 = _ipam(tmp_path / "v6", routes=lambda: [net("172.16.0.0/12"), net("2001:db8::/32")])
    assert ipam6.request_pool(_local()).pool == net("192.168.0.0/20")
    assert ipam6.request_pool(_local(v6=True)).pool.subnet_of(net("fd00::/8"))


def test_routes_are_consulted_on_every_request(tmp_path: Path) -> None:
    routes: list[IPNetwork] = []
    ipam = _ipam(tmp_path, routes=lambda: list(routes))
    assert ipam.request_pool(_local()).pool == net("172.17.0.0/16")
    routes.append(net("172.18.0.0/16"))
    assert ipam.request_pool(_local()).pool == net("172.19.0.0/16")


def test_no_free_pool_when_routes_cover_every_default(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path, routes=lambda: [net("172.16.0.0/12"), net("192.168.0.0/16")])
    with pytest.raises(errors.NoFreePool) as exc:
        ipam.request_pool(_local())
    assert isinstance(exc.value, errors.Unavailable)
    assert ipam.pools() == []


def test_explicit_pool_may_overlap_host_routes(tmp_path: Path) -> None:
    """Only default selection consults routes; an explicit subnet is the user's choice."""
    ipam = _ipam(tmp_path, routes=lambda: [net("10.0.0.0/8")])
    assert ipam.request_pool(_local("10.1.0.0/16")).pool_id == "LocalDefault/10.1.0.0/16"


def test_pool_lists_can_be_overridden(tmp_path: Path) -> None:
    ipam = _ipam(
        tmp_path,
        local_pools=[PoolSpec("10.10.0.0/23", 24)],
        global_pools=[PoolSpec("10.20.0.0/16", 16)],
    )
    assert ipam.request_pool(_local()).pool == net("10.10.0.0/24")
    assert ipam.request_pool(_local()).pool == net("10.10.1.0/24")
    with pytest.raises(errors.NoFreePool):
        ipam.request_pool(_local())
    assert ipam.request_pool(PoolRequest(GLOBAL_DEFAULT)).pool == net("10.20.0.0/16")


def test_ipv6_default_is_a_ula_slash64_stable_across_restarts(tmp_path: Path) -> None:
    routes: list[IPNetwork] = []
    ipam = _ipam(tmp_path, routes=lambda: list(routes))
    a = ipam.request_pool(_local(v6=True))
    assert a.pool.prefixlen == 64 and a.pool.subnet_of(net("fd00::/8"))
    assert a.pool_id == f"LocalDefault/{a.pool}"
    ula48 = a.pool.supernet(new_prefix=48)

    def nth64(i: int) -> IPNetwork:
        return net(f"{ula48.network_address + i * 2**64}/64")

    assert a.pool == nth64(0)
    b = ipam.request_pool(_local(v6=True))
    assert b.pool == nth64(1)
    # A second IPAM on the same state_dir uses the same /48 (the seed is persisted), and
    # skips /64s overlapping an IPv6 route.
    routes.append(nth64(2))
    again = _ipam(tmp_path, routes=lambda: list(routes))
    assert again.request_pool(_local(v6=True)).pool == nth64(3)


# --- pool ids, overlap, validation ----------------------------------------------------


def test_pool_ids_append_the_sub_pool(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    r = ipam.request_pool(_local("10.1.0.0/16", "10.1.2.0/24"))
    assert r.pool_id == "LocalDefault/10.1.0.0/16/10.1.2.0/24"
    assert r.pool == net("10.1.0.0/16")
    r6 = ipam.request_pool(_local("fd00:1::/64", "fd00:1::/80", v6=True))
    assert r6.pool_id == "LocalDefault/fd00:1::/64/fd00:1::/80"
    g = ipam.request_pool(PoolRequest(GLOBAL_DEFAULT, pool=net("10.9.0.0/24")))
    assert g.pool_id == "GlobalDefault/10.9.0.0/24"
    assert sorted(ipam.pools()) == sorted([r.pool_id, r6.pool_id, g.pool_id])


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("10.0.0.0/24", "10.0.0.0/24"),  # equal
        ("10.0.0.0/16", "10.0.5.0/24"),  # inside
        ("10.0.5.0/24", "10.0.0.0/16"),  # around
        ("10.0.0.0/25", "10.0.0.127/32"),  # last address of the first
        ("fd00::/64", "fd00::/48"),
    ],
)
def test_overlapping_pools_are_rejected(tmp_path: Path, first: str, second: str) -> None:
    ipam = _ipam(tmp_path)
    v6 = ":" in first
    ipam.request_pool(_local(first, v6=v6))
    with pytest.raises(errors.PoolOverlap) as exc:
        ipam.request_pool(_local(second, v6=v6))
    assert isinstance(exc.value, errors.Conflict)
    assert exc.value.other == first
    assert ipam.pools() == [f"LocalDefault/{first}"]


def test_adjacent_pools_do_not_overlap_and_overlap_spans_address_spaces(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    ipam.request_pool(_local("10.0.0.0/25"))
    ipam.request_pool(_local("10.0.0.128/25"))
    ipam.request_pool(_local("10.0.1.0/24"))
    with pytest.raises(errors.PoolOverlap):
        ipam.request_pool(PoolRequest(GLOBAL_DEFAULT, pool=net("10.0.0.0/23")))
    # Same numbers in the other family are no overlap.
    ipam.request_pool(_local("::a00:0/120", v6=True))


def test_released_pool_can_be_requested_again(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    r = ipam.request_pool(_local("10.0.0.0/24"))
    ipam.request_address(r.pool_id)
    ipam.release_pool(r.pool_id)
    assert ipam.pools() == []
    assert ipam.request_pool(_local("10.0.0.0/16")).pool_id == "LocalDefault/10.0.0.0/16"
    with pytest.raises(errors.NotFound):
        ipam.release_pool(r.pool_id)


@pytest.mark.parametrize(
    "req",
    [
        PoolRequest("NoSuchSpace"),
        PoolRequest(LOCAL_DEFAULT, pool=net("fd00::/64")),  # V6 flag not set
        PoolRequest(LOCAL_DEFAULT, pool=net("10.0.0.0/24"), v6=True),
        PoolRequest(LOCAL_DEFAULT, sub_pool=net("10.0.0.0/24")),  # sub-pool without pool
        PoolRequest(LOCAL_DEFAULT, pool=net("10.0.0.0/24"), sub_pool=net("10.0.1.0/25")),
        PoolRequest(LOCAL_DEFAULT, pool=net("10.0.0.0/24"), sub_pool=net("10.0.0.0/23")),
        PoolRequest(LOCAL_DEFAULT, pool=net("10.0.0.0/24"), sub_pool=net("10.0.0.0/32")),
        PoolRequest(LOCAL_DEFAULT, pool=net("10.0.0.0/24"), sub_pool=net("10.0.0.255/32")),
        PoolRequest(LOCAL_DEFAULT, pool=net("10.0.0.0/32")),  # nothing assignable
    ],
    ids=lambda r: f"{r.address_space}-{r.pool}-{r.sub_pool}-v6={r.v6}",
)
def test_invalid_pool_requests_change_nothing(tmp_path: Path, req: PoolRequest) -> None:
    ipam = _ipam(tmp_path)
    with pytest.raises(errors.InvalidParameter):
        ipam.request_pool(req)
    assert ipam.pools() == []
    # The whole space is still free.
    assert ipam.request_pool(_local("10.0.0.0/8")).pool == net("10.0.0.0/8")


def test_sub_pool_of_the_other_family_is_an_invalid_parameter(tmp_path: Path) -> None:
    """A mixed-family sub-pool must be InvalidParameter, not a bare TypeError."""
    ipam = _ipam(tmp_path)
    with pytest.raises(errors.InvalidParameter):
        ipam.request_pool(_local("10.0.0.0/24", "fd00::/120"))
    with pytest.raises(errors.InvalidParameter):
        ipam.request_pool(_local("fd00::/64", "10.0.0.0/24", v6=True))
    assert ipam.pools() == []
