"""Address allocation in the default IPAM (control/ipam/default.py).

What is proved here: the network address, the IPv4 broadcast, the gateway and aux
addresses are never handed out; static requests fail with AddressInUse / InvalidParameter;
allocation is serial from a persisted cursor that wraps, so a released address is not
reused at once; exhaustion is PoolExhausted; batches are all-or-nothing; IPv4 and IPv6
alike; a /64 costs what is allocated, never its size. Hypothesis state machines drive
random request/release sequences on small pools against an exact model.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cnm.control import errors
from cnm.control.ipam.api import (
    AUX_ADDRESS_TYPE,
    GATEWAY_ADDRESS_TYPE,
    REQUEST_ADDRESS_TYPE,
    PoolRequest,
)
from cnm.control.ipam.default import DefaultIpam
from cnm.control.ipam.pools import LOCAL_DEFAULT
from cnm.control.store.sqlite import SQLiteStore
from cnm.control.types import IPAddress, IPNetwork

ip = ipaddress.ip_address
net = ipaddress.ip_network
GW = {REQUEST_ADDRESS_TYPE: GATEWAY_ADDRESS_TYPE}
AUX = {REQUEST_ADDRESS_TYPE: AUX_ADDRESS_TYPE}


def _no_routes() -> list[IPNetwork]:
    return []


def _open(state_dir: str) -> tuple[SQLiteStore, DefaultIpam]:
    store = SQLiteStore(state_dir)
    return store, DefaultIpam(store, routes=_no_routes)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[SQLiteStore, DefaultIpam]]:
    store, ipam = _open(str(tmp_path / "state"))
    yield store, ipam
    store.close()


def _pool(ipam: DefaultIpam, subnet: str, ip_range: str | None = None) -> str:
    pool = net(subnet)
    return ipam.request_pool(
        PoolRequest(
            LOCAL_DEFAULT,
            pool=pool,
            sub_pool=net(ip_range) if ip_range else None,
            v6=pool.version == 6,
        )
    ).pool_id


def _rows(store: SQLiteStore, pool_id: str | None = None) -> int:
    if pool_id is None:
        row = store.fetchone("SELECT count(*) FROM ipam_addresses")
    else:
        row = store.fetchone("SELECT count(*) FROM ipam_addresses WHERE pool_id=?", (pool_id,))
    assert row is not None
    return int(row[0])


def _addrs(ipam: DefaultIpam, pool_id: str) -> list[str]:
    return [str(a) for a, _, _ in ipam.allocated(pool_id)]


def _take(ipam: DefaultIpam, pool_id: str, n: int) -> list[str]:
    return [str(ipam.request_address(pool_id).ip) for _ in range(n)]


# --- reserved addresses ----------------------------------------------------------------


def test_gateway_is_first_host_and_endpoints_follow(env) -> None:
    store, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    gw = ipam.request_address(pid, None, GW, owner="net1")
    assert gw == ipaddress.ip_interface("10.0.0.1/24")
    ep = ipam.request_address(pid, owner="ep1")
    assert ep == ipaddress.ip_interface("10.0.0.2/24")  # returned with the pool's prefix
    assert ipam.allocated(pid) == [
        (ip("10.0.0.1"), "gateway", "net1"),
        (ip("10.0.0.2"), "endpoint", "ep1"),
    ]
    assert _rows(store, pid) == 2


def test_first_dynamic_address_without_gateway_is_not_the_network(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    assert str(ipam.request_address(pid)) == "10.0.0.1/24"


@pytest.mark.parametrize(
    ("subnet", "expected"),
    [
        ("10.0.0.0/30", ["10.0.0.1", "10.0.0.2"]),
        ("10.0.0.8/29", [f"10.0.0.{i}" for i in range(9, 15)]),
        # IPv6 has no broadcast: the last address is usable, the network (anycast) is not.
        ("fd00::/126", ["fd00::1", "fd00::2", "fd00::3"]),
        ("fd00::10/124", [f"fd00::{i:x}" for i in range(0x11, 0x20)]),
    ],
)
def test_network_and_ipv4_broadcast_are_never_handed_out(env, subnet, expected) -> None:
    store, ipam = env
    pid = _pool(ipam, subnet)
    assert _take(ipam, pid, len(expected)) == expected
    with pytest.raises(errors.PoolExhausted) as exc:
        ipam.request_address(pid)
    assert isinstance(exc.value, errors.Unavailable)
    assert _rows(store, pid) == len(expected)


def test_gateway_and_aux_addresses_are_skipped(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/29")
    ipam.request_address(pid, ip("10.0.0.3"), GW)
    ipam.request_address(pid, ip("10.0.0.1"), AUX)
    ipam.request_address(pid, ip("10.0.0.5"), AUX)
    assert _take(ipam, pid, 3) == ["10.0.0.2", "10.0.0.4", "10.0.0.6"]
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(pid)
    kinds = {str(a): k for a, k, _ in ipam.allocated(pid)}
    assert kinds == {
        "10.0.0.1": "aux",
        "10.0.0.2": "endpoint",
        "10.0.0.3": "gateway",
        "10.0.0.4": "endpoint",
        "10.0.0.5": "aux",
        "10.0.0.6": "endpoint",
    }


# --- static addresses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "address", "error"),
    [
        ("10.0.0.0/24", "10.0.1.1", errors.InvalidParameter),  # outside
        ("10.0.0.0/24", "9.255.255.255", errors.InvalidParameter),
        ("10.0.0.0/24", "10.0.0.0", errors.InvalidParameter),  # network
        ("10.0.0.0/24", "10.0.0.255", errors.InvalidParameter),  # broadcast
        ("10.0.0.0/24", "::a00:5", errors.InvalidParameter),  # other family
        ("fd00::/64", "fd00:0:0:1::1", errors.InvalidParameter),
        ("fd00::/64", "fd00::", errors.InvalidParameter),
        ("fd00::/64", "10.0.0.5", errors.InvalidParameter),
        ("10.0.0.0/24", "10.0.0.7", errors.AddressInUse),  # taken by an endpoint
        ("10.0.0.0/24", "10.0.0.1", errors.AddressInUse),  # the gateway
        ("10.0.0.0/24", "10.0.0.9", errors.AddressInUse),  # an aux address
        ("fd00::/64", "fd00::7", errors.AddressInUse),
        ("fd00::/64", "fd00::1", errors.AddressInUse),
    ],
)
def test_static_address_errors(env, subnet: str, address: str, error: type) -> None:
    store, ipam = env
    pid = _pool(ipam, subnet)
    base = net(subnet).network_address
    ipam.request_address(pid, None, GW)
    ipam.request_address(pid, base + 7)
    ipam.request_address(pid, base + 9, AUX)
    before = ipam.allocated(pid)
    with pytest.raises(error) as exc:
        ipam.request_address(pid, ip(address))
    if error is errors.AddressInUse:
        assert isinstance(exc.value, errors.Conflict)
    assert ipam.allocated(pid) == before
    assert _rows(store, pid) == 3


def test_static_addresses_accepted_anywhere_in_the_pool(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24", "10.0.0.128/25")
    # Docker: a static --ip only has to be in the subnet, not in the ip-range.
    assert str(ipam.request_address(pid, ip("10.0.0.5"))) == "10.0.0.5/24"
    assert str(ipam.request_address(pid, ip("10.0.0.254"))) == "10.0.0.254/24"
    pid6 = _pool(ipam, "fd00::/64")
    last = "fd00::ffff:ffff:ffff:ffff"
    assert str(ipam.request_address(pid6, ip(last))) == f"{last}/64"


# --- serial allocation -----------------------------------------------------------------


def test_released_address_is_not_reused_at_once(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    assert _take(ipam, pid, 3) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    ipam.release_address(pid, ip("10.0.0.2"))
    assert _take(ipam, pid, 2) == ["10.0.0.4", "10.0.0.5"]
    ipam.release_address(pid, ip("10.0.0.5"))  # even the very last one handed out
    assert _take(ipam, pid, 1) == ["10.0.0.6"]


def test_cursor_wraps_at_the_end_of_the_pool(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/29")
    assert _take(ipam, pid, 6) == [f"10.0.0.{i}" for i in range(1, 7)]
    ipam.release_addresses(pid, [ip("10.0.0.4"), ip("10.0.0.2")])
    assert _take(ipam, pid, 2) == ["10.0.0.2", "10.0.0.4"]
    # The cursor now sits mid-pool: the next one is searched after it, then wraps.
    ipam.release_addresses(pid, [ip("10.0.0.1"), ip("10.0.0.3"), ip("10.0.0.6")])
    assert _take(ipam, pid, 3) == ["10.0.0.6", "10.0.0.1", "10.0.0.3"]
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(pid)
    # Full pool, cursor on the first host, that very host released: it is found again.
    ipam.release_address(pid, ip("10.0.0.1"))
    assert _take(ipam, pid, 1) == ["10.0.0.1"]
    ipam.release_address(pid, ip("10.0.0.1"))
    assert _take(ipam, pid, 1) == ["10.0.0.1"]
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(pid)


def test_static_and_gateway_requests_do_not_move_the_cursor(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    assert _take(ipam, pid, 3) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    ipam.release_address(pid, ip("10.0.0.1"))
    ipam.request_address(pid, ip("10.0.0.50"))
    # The gateway is the first free host of the whole pool, not the next serial one.
    assert str(ipam.request_address(pid, None, GW)) == "10.0.0.1/24"
    ipam.request_address(pid, None, AUX)  # likewise: .4
    assert [(str(a), k) for a, k, _ in ipam.allocated(pid) if k != "endpoint"] == [
        ("10.0.0.1", "gateway"),
        ("10.0.0.4", "aux"),
    ]
    assert _take(ipam, pid, 1) == ["10.0.0.5"]


def test_cursor_survives_a_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    store, ipam = _open(state)
    pid = _pool(ipam, "fd00::/120")
    assert _take(ipam, pid, 3) == ["fd00::1", "fd00::2", "fd00::3"]
    ipam.release_address(pid, ip("fd00::2"))
    store.close()
    store, again = _open(state)
    assert _take(again, pid, 1) == ["fd00::4"]
    store.close()


def test_serial_scan_crosses_long_allocated_runs(env) -> None:
    """After a wrap, the free address is found past more than one scan chunk of rows."""
    store, ipam = env
    pid = _pool(ipam, "10.16.0.0/21")  # 2046 hosts
    got = ipam.request_addresses(pid, [None] * 2046)
    assert len({a.ip for a in got}) == 2046
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(pid)
    hole = ipaddress.ip_address("10.16.0.0") + 1700
    ipam.release_address(pid, hole)
    assert ipam.request_address(pid).ip == hole
    assert _rows(store, pid) == 2046


# --- ip_range (sub-pool) ---------------------------------------------------------------


def test_ip_range_limits_endpoints_but_not_the_gateway(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24", "10.0.0.128/25")
    assert str(ipam.request_address(pid, None, GW)) == "10.0.0.1/24"
    got = _take(ipam, pid, 127)
    assert got == [f"10.0.0.{i}" for i in range(128, 255)]  # .255 is the broadcast
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(pid)


def test_ip_range_at_the_start_of_the_pool_skips_the_network(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24", "10.0.0.0/28")
    assert str(ipam.request_address(pid, None, GW)) == "10.0.0.1/24"
    assert _take(ipam, pid, 14) == [f"10.0.0.{i}" for i in range(2, 16)]
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(pid)


def test_ipv6_ip_range(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "fd00::/64", "fd00::ff00/120")
    assert str(ipam.request_address(pid, None, GW).ip) == "fd00::1"
    got = _take(ipam, pid, 256)
    assert got == [str(ip("fd00::ff00") + i) for i in range(256)]
    with pytest.raises(errors.PoolExhausted):
        ipam.request_address(pid)


# --- release ---------------------------------------------------------------------------


def test_release_errors(env) -> None:
    store, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    a = ipam.request_address(pid).ip
    with pytest.raises(errors.AddressNotFound) as exc:
        ipam.release_address(pid, ip("10.0.0.9"))
    assert isinstance(exc.value, errors.NotFound)
    with pytest.raises(errors.NotFound):
        ipam.release_address("LocalDefault/10.9.0.0/24", a)
    with pytest.raises(errors.NotFound):
        ipam.request_address("LocalDefault/10.9.0.0/24")
    ipam.release_address(pid, a)
    with pytest.raises(errors.AddressNotFound):
        ipam.release_address(pid, a)
    assert _rows(store) == 0


def test_release_with_an_address_of_the_other_family_frees_nothing(env) -> None:
    """::a00:2 has the same integer value as 10.0.0.2; it must not release it."""
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    _take(ipam, pid, 2)
    with pytest.raises((errors.NotFound, errors.InvalidParameter)):
        ipam.release_address(pid, ip("::a00:2"))
    assert _addrs(ipam, pid) == ["10.0.0.1", "10.0.0.2"]


def test_release_pool_drops_its_addresses(env) -> None:
    store, ipam = env
    keep = _pool(ipam, "10.1.0.0/24")
    _take(ipam, keep, 3)
    pid = _pool(ipam, "10.0.0.0/24")
    ipam.request_address(pid, None, GW)
    _take(ipam, pid, 5)
    ipam.release_pool(pid)
    assert _rows(store) == 3
    with pytest.raises(errors.NotFound):
        ipam.allocated(pid)
    # A fresh pool on the same subnet starts from scratch (no stale cursor or rows).
    pid = _pool(ipam, "10.0.0.0/24")
    assert _take(ipam, pid, 1) == ["10.0.0.1"]


# --- batches ---------------------------------------------------------------------------


def test_batch_request_returns_in_order_with_owners(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    got = ipam.request_addresses(pid, [None, ip("10.0.0.100"), None], owners=["a", "b", "c"])
    assert [str(g) for g in got] == ["10.0.0.1/24", "10.0.0.100/24", "10.0.0.2/24"]
    assert [(str(a), o) for a, _, o in ipam.allocated(pid)] == [
        ("10.0.0.1", "a"),
        ("10.0.0.2", "c"),
        ("10.0.0.100", "b"),
    ]


@pytest.mark.parametrize(
    ("batch", "error"),
    [
        ([None, "10.0.0.3", None], errors.AddressInUse),  # taken before the batch
        ([None, None, "10.0.0.6"], errors.AddressInUse),  # taken earlier in the batch
        ([None, "10.0.1.1", None], errors.InvalidParameter),
        ([None, "10.0.0.255", None], errors.InvalidParameter),
        ([None] * 200, errors.PoolExhausted),
        ([None, None, "10.0.0.250", *[None] * 300], errors.PoolExhausted),
    ],
)
def test_batch_request_is_all_or_nothing(env, batch: Sequence[str | None], error: type) -> None:
    store, ipam = env
    pid = _pool(ipam, "10.0.0.0/24", "10.0.0.0/25")
    assert _take(ipam, pid, 4) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    ipam.release_address(pid, ip("10.0.0.2"))
    before = ipam.allocated(pid)
    with pytest.raises(error):
        ipam.request_addresses(pid, [ip(a) if a else None for a in batch])
    assert ipam.allocated(pid) == before
    assert _rows(store, pid) == 3
    # The cursor did not move either: the next address is still .5.
    assert _take(ipam, pid, 1) == ["10.0.0.5"]


def test_batch_release_is_all_or_nothing(env) -> None:
    _, ipam = env
    pid = _pool(ipam, "10.0.0.0/24")
    _take(ipam, pid, 3)
    with pytest.raises(errors.AddressNotFound):
        ipam.release_addresses(pid, [ip("10.0.0.1"), ip("10.0.0.9"), ip("10.0.0.3")])
    assert _addrs(ipam, pid) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    ipam.release_addresses(pid, [ip("10.0.0.1"), ip("10.0.0.3")])
    assert _addrs(ipam, pid) == ["10.0.0.2"]


# --- huge pools cost what is allocated ---------------------------------------------------


def test_slash64_costs_what_is_allocated_not_its_size(env) -> None:
    store, ipam = env
    t0 = time.perf_counter()
    pid = _pool(ipam, "fd00:1:2:3::/64")
    gw = ipam.request_address(pid, None, GW)
    assert str(gw.ip) == "fd00:1:2:3::1"
    got: list[IPAddress] = []
    for _ in range(5):
        got += [a.ip for a in ipam.request_addresses(pid, [None] * 600)]
    got += [ipam.request_address(pid).ip for _ in range(200)]
    elapsed = time.perf_counter() - t0
    assert len(got) == len(set(got)) == 3200
    assert got == [ip("fd00:1:2:3::2") + i for i in range(3200)]
    assert _rows(store, pid) == 3201
    assert elapsed < 8.0, f"3200 allocations in a /64 took {elapsed:.2f}s"
    # Releasing and allocating more stays proportional too.
    ipam.release_addresses(pid, got[:1000])
    assert _rows(store, pid) == 2201
    nxt = ipam.request_address(pid).ip
    assert nxt == got[-1] + 1  # serial: no reuse of the freed ones
    row = store.fetchone("PRAGMA page_count")
    assert row is not None and row[0] < 2000  # a few hundred KiB, not 2**64 of anything


def test_huge_ipv4_and_ipv6_pools_are_instant(env) -> None:
    store, ipam = env
    t0 = time.perf_counter()
    p4 = _pool(ipam, "10.0.0.0/8")
    p6 = _pool(ipam, "fd00::/32", "fd00:0:ffff:ffff::/64")
    assert str(ipam.request_address(p4, None, GW)) == "10.0.0.1/8"
    assert str(ipam.request_address(p6).ip) == "fd00:0:ffff:ffff::"
    last = ip("10.255.255.254")
    assert ipam.request_address(p4, last).ip == last
    with pytest.raises(errors.InvalidParameter):
        ipam.request_address(p4, ip("10.255.255.255"))
    assert time.perf_counter() - t0 < 2.0
    assert _rows(store) == 3


# --- property tests ----------------------------------------------------------------------


@st.composite
def _layouts(draw, v6: bool) -> tuple[IPNetwork, IPNetwork | None, int | None, list[int]]:
    """A small pool (/24-/28 or /120-/124), optional ip_range, gateway and aux addresses."""
    bits = 128 if v6 else 32
    plen = draw(st.integers(bits - 8, bits - 4))
    if v6:
        base = (0xFD00 << 112) | (draw(st.integers(0, 2**32 - 1)) << 16)
    else:
        base = (10 << 24) | (draw(st.integers(0, 2**16 - 1)) << 8)
    pool = ipaddress.ip_network((base, plen), strict=False)
    first = int(pool.network_address)
    ip_range = None
    if draw(st.booleans()):
        rplen = draw(st.integers(plen, bits - 2))
        idx = draw(st.integers(0, 2 ** (rplen - plen) - 1))
        ip_range = ipaddress.ip_network((first + idx * 2 ** (bits - rplen), rplen))
    plo = first + 1
    phi = int(pool.broadcast_address) - (0 if v6 else 1)
    gateway = draw(st.one_of(st.none(), st.integers(plo, phi)))
    gw_value = plo if gateway is None else gateway
    aux = draw(
        st.lists(st.integers(plo, phi).filter(lambda v: v != gw_value), unique=True, max_size=3)
    )
    return pool, ip_range, gateway, aux


@contextmanager
def _raises(exc: type[BaseException]) -> Iterator[None]:
    """Like pytest.raises, but fails with an AssertionError that Hypothesis can shrink."""
    try:
        yield
    except exc:
        return
    raise AssertionError(f"{exc.__name__} was not raised")


class _IpamMachine(RuleBasedStateMachine):
    """Random request/release sequences against an exact model of the serial allocator."""

    V6 = False

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.store, self.ipam = _open(os.path.join(self.tmp.name, "state"))
        self.pool_id = ""
        self.reserved: dict[int, str] = {}  # gateway, aux
        self.endpoints: set[int] = set()
        self.dynamic: set[int] = set()  # endpoints handed out without a requested address
        self.cursor: int | None = None

    def teardown(self) -> None:
        self.store.close()
        self.tmp.cleanup()

    # -- model

    def _ip(self, value: int) -> IPAddress:
        return ipaddress.IPv6Address(value) if self.V6 else ipaddress.IPv4Address(value)

    def _taken(self) -> set[int]:
        return self.endpoints | set(self.reserved)

    def _next(self, taken: set[int], cursor: int | None) -> int | None:
        if cursor is not None and self.rlo <= cursor < self.rhi:
            order = [*range(cursor + 1, self.rhi + 1), *range(self.rlo, cursor + 1)]
        else:
            order = list(range(self.rlo, self.rhi + 1))
        return next((v for v in order if v not in taken), None)

    def _static_error(self, value: int, taken: set[int]) -> type | None:
        if not (self.first <= value <= self.last):
            return errors.InvalidParameter
        if value == self.first or (not self.V6 and value == self.last):
            return errors.InvalidParameter
        if value in taken:
            return errors.AddressInUse
        return None

    # -- set-up

    @initialize(data=st.data())
    def make_pool(self, data: st.DataObject) -> None:
        pool, ip_range, gateway, aux = data.draw(_layouts(self.V6))
        self.net = pool
        self.first, self.last = int(pool.network_address), int(pool.broadcast_address)
        self.plo, self.phi = self.first + 1, self.last - (0 if self.V6 else 1)
        self.rlo, self.rhi = self.plo, self.phi
        if ip_range is not None:
            self.rlo = max(self.plo, int(ip_range.network_address))
            self.rhi = min(self.phi, int(ip_range.broadcast_address))
        res = self.ipam.request_pool(
            PoolRequest(LOCAL_DEFAULT, pool=pool, sub_pool=ip_range, v6=self.V6)
        )
        self.pool_id = res.pool_id
        expect_id = f"{LOCAL_DEFAULT}/{pool}" + (f"/{ip_range}" if ip_range else "")
        assert self.pool_id == expect_id
        want = None if gateway is None else self._ip(gateway)
        gw = self.ipam.request_address(self.pool_id, want, GW, owner="net")
        # The gateway comes from the whole pool: the first host unless given.
        assert int(gw.ip) == (self.plo if gateway is None else gateway)
        assert gw.network == pool
        self.reserved[int(gw.ip)] = "gateway"
        for value in aux:
            self.ipam.request_address(self.pool_id, self._ip(value), AUX, owner="net")
            self.reserved[value] = "aux"

    # -- rules

    @rule()
    def request_dynamic(self) -> None:
        expected = self._next(self._taken(), self.cursor)
        if expected is None:
            with _raises(errors.PoolExhausted):
                self.ipam.request_address(self.pool_id, owner="ep")
            return
        got = self.ipam.request_address(self.pool_id, owner="ep")
        value = int(got.ip)
        assert got.network == self.net
        assert value not in self._taken(), "duplicate address handed out"
        assert self.rlo <= value <= self.rhi, "dynamic address outside the ip_range"
        assert value == expected, f"expected {self._ip(expected)}, got {got.ip}"
        self.endpoints.add(value)
        self.dynamic.add(value)
        self.cursor = value

    @rule(offset=st.integers(-2, 257))
    def request_static(self, offset: int) -> None:
        value = self.first + offset
        error = self._static_error(value, self._taken())
        if error is not None:
            with _raises(error):
                self.ipam.request_address(self.pool_id, self._ip(value))
            return
        got = self.ipam.request_address(self.pool_id, self._ip(value))
        assert int(got.ip) == value
        self.endpoints.add(value)

    @precondition(lambda self: self.endpoints)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        value = data.draw(st.sampled_from(sorted(self.endpoints)))
        self.ipam.release_address(self.pool_id, self._ip(value))
        self.endpoints.discard(value)
        self.dynamic.discard(value)

    @precondition(lambda self: self.endpoints)
    @rule(data=st.data())
    def release_then_request_same(self, data: st.DataObject) -> None:
        value = data.draw(st.sampled_from(sorted(self.endpoints)))
        self.ipam.release_address(self.pool_id, self._ip(value))
        assert int(self.ipam.request_address(self.pool_id, self._ip(value)).ip) == value
        self.dynamic.discard(value)  # now a static one

    @precondition(lambda self: self.endpoints)
    @rule(data=st.data())
    def release_then_request_when_full(self, data: st.DataObject) -> None:
        """In a full range, the one address just released is the one handed out next."""
        free_in_range = [v for v in range(self.rlo, self.rhi + 1) if v not in self._taken()]
        in_range = sorted(v for v in self.endpoints if self.rlo <= v <= self.rhi)
        if free_in_range or not in_range:
            return
        value = data.draw(st.sampled_from(in_range))
        self.ipam.release_address(self.pool_id, self._ip(value))
        got = self.ipam.request_address(self.pool_id)
        assert int(got.ip) == value
        self.dynamic.add(value)
        self.cursor = value

    @rule(offset=st.integers(-1, 256))
    def release_unallocated(self, offset: int) -> None:
        value = self.first + offset
        if value in self._taken():
            return
        with _raises(errors.NotFound):
            self.ipam.release_address(self.pool_id, self._ip(value))

    @rule(batch=st.lists(st.one_of(st.none(), st.integers(-1, 256)), min_size=1, max_size=6))
    def request_batch(self, batch: list[int | None]) -> None:
        taken, cursor = self._taken(), self.cursor
        expected: list[int] = []
        error: type | None = None
        for item in batch:
            if item is None:
                value = self._next(taken, cursor)
                if value is None:
                    error = errors.PoolExhausted
                    break
                cursor = value
            else:
                value = self.first + item
                error = self._static_error(value, taken)
                if error is not None:
                    break
            taken.add(value)
            expected.append(value)
        request = [None if i is None else self._ip(self.first + i) for i in batch]
        if error is not None:
            with _raises(error):
                self.ipam.request_addresses(self.pool_id, request)
            return  # all or nothing: the invariants check nothing changed
        got = [int(a.ip) for a in self.ipam.request_addresses(self.pool_id, request)]
        assert got == expected
        self.endpoints.update(got)
        self.dynamic.update(v for v, i in zip(got, batch, strict=True) if i is None)
        self.cursor = cursor

    @precondition(lambda self: self.endpoints)
    @rule(data=st.data(), stray=st.booleans())
    def release_batch(self, data: st.DataObject, stray: bool) -> None:
        values = data.draw(st.lists(st.sampled_from(sorted(self.endpoints)), unique=True))
        free = [v for v in range(self.plo, self.phi + 1) if v not in self._taken()]
        if stray and free:
            values.insert(len(values) // 2, free[0])
            with _raises(errors.AddressNotFound):
                self.ipam.release_addresses(self.pool_id, [self._ip(v) for v in values])
            return
        self.ipam.release_addresses(self.pool_id, [self._ip(v) for v in values])
        self.endpoints.difference_update(values)
        self.dynamic.difference_update(values)

    # -- invariants

    @invariant()
    def store_matches_model(self) -> None:
        if not self.pool_id:
            return
        rows = self.ipam.allocated(self.pool_id)
        values = [int(a) for a, _, _ in rows]
        assert len(values) == len(set(values)), "duplicate rows"
        assert _rows(self.store, self.pool_id) == len(self.endpoints) + len(self.reserved)
        assert set(values) == self._taken()
        kinds = {int(a): k for a, k, _ in rows}
        for value, kind in self.reserved.items():
            assert kinds[value] == kind
        for value in self.endpoints:
            assert kinds[value] == "endpoint"

    @invariant()
    def reserved_never_handed_out(self) -> None:
        if not self.pool_id:
            return
        forbidden = {self.first, *self.reserved}
        if not self.V6:
            forbidden.add(self.last)
        assert not (self.endpoints & forbidden)
        assert all(self.rlo <= v <= self.rhi for v in self.dynamic)
        assert all(self.first < v <= self.last for v in self.endpoints)


_MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=30, deadline=None)


class _IpamMachine6(_IpamMachine):
    V6 = True


TestIpamStateMachineV4 = _IpamMachine.TestCase
TestIpamStateMachineV4.settings = _MACHINE_SETTINGS
TestIpamStateMachineV6 = _IpamMachine6.TestCase
TestIpamStateMachineV6.settings = _MACHINE_SETTINGS


@settings(max_examples=40, deadline=None)
@given(layout=_layouts(v6=False) | _layouts(v6=True), data=st.data())
def test_full_pool_release_then_request_round_trips(layout, data) -> None:
    """Fill the range, release any subset: the next requests return exactly that subset."""
    pool, ip_range, gateway, aux = layout
    with tempfile.TemporaryDirectory() as tmp:
        store, ipam = _open(os.path.join(tmp, "state"))
        try:
            pid = ipam.request_pool(
                PoolRequest(LOCAL_DEFAULT, pool=pool, sub_pool=ip_range, v6=pool.version == 6)
            ).pool_id
            version = pool.version

            def mk(v: int) -> IPAddress:
                return ipaddress.IPv6Address(v) if version == 6 else ipaddress.IPv4Address(v)

            ipam.request_address(pid, None if gateway is None else mk(gateway), GW)
            for value in aux:
                ipam.request_address(pid, mk(value), AUX)
            got: list[IPAddress] = []
            while True:
                try:
                    got.append(ipam.request_address(pid).ip)
                except errors.PoolExhausted:
                    break
            assert len(got) == len(set(got))
            reserved = {int(a) for a, k, _ in ipam.allocated(pid) if k != "endpoint"}
            reserved.add(int(pool.network_address))
            if version == 4:
                reserved.add(int(pool.broadcast_address))
            assert not ({int(a) for a in got} & reserved)
            if ip_range is not None:
                assert all(a in ip_range for a in got)
            assert _rows(store, pid) == len(got) + len(reserved) - (2 if version == 4 else 1)
            if not got:
                return
            freed = data.draw(st.lists(st.sampled_from(got), unique=True, min_size=1))
            ipam.release_addresses(pid, freed)
            again = [ipam.request_address(pid).ip for _ in freed]
            assert again == sorted(freed)
            with pytest.raises(errors.PoolExhausted):
                ipam.request_address(pid)
        finally:
            store.close()
