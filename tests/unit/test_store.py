"""The embedded SQLite store: persistence across controllers, WAL, schema, transactions."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import sqlite3

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control.ipam.default import DefaultIpam
from cnm.control.store import SCHEMA_VERSION, SQLiteStore
from cnm.control.store import sqlite as sqlite_mod
from cnm.control.types import EndpointRecord, NetworkRecord, PoolData

TABLES = {"meta", "networks", "endpoints", "sandboxes", "ipam_pools", "ipam_addresses"}


def _open(dirs: tuple[str, str]) -> NetworkController:
    return NetworkController(state_dir=dirs[0], run_dir=dirs[1])


def _raw(state_dir: str) -> sqlite3.Connection:
    """A connection of our own, outside cnm, to look at what is really on disk."""
    return sqlite3.connect(os.path.join(state_dir, "state.db"))


def _fields(rec: object) -> dict[str, object]:
    """A record's persistent fields, minus `owner` (which store instance last wrote it)."""
    out = dataclasses.asdict(rec)  # type: ignore[call-overload]
    out.pop("owner", None)
    return out


def _ipam(ctl: NetworkController) -> DefaultIpam:
    ipam = ctl.ipam_driver("default")
    assert isinstance(ipam, DefaultIpam)
    return ipam


def _clean(report: dict[str, object]) -> bool:
    """A reconcile report with nothing in it: no repairs, no errors (extra keys empty too)."""
    return report.get("repairs") == [] and report.get("errors") == [] and not any(report.values())


def _net_record(name: str = "n1", net_id: str = "a" * 64) -> NetworkRecord:
    return NetworkRecord(
        id=net_id,
        name=name,
        driver="null",
        scope="local",
        ipam_driver="default",
        enable_ipv6=False,
        internal=False,
        options={},
        labels={},
        ipam_options={},
        ipv4=(),
        ipv6=(),
        state="ready",
        created=1.0,
    )


def _ep_record(network_id: str, name: str = "e1", ep_id: str = "b" * 64) -> EndpointRecord:
    return EndpointRecord(
        id=ep_id,
        name=name,
        network_id=network_id,
        ipv4_address="10.9.0.2/24",
        ipv6_address=None,
        mac_address="02:42:0a:09:00:02",
        options={},
        sandbox_id=None,
        state="ready",
        join_state="",
        driver_data={},
    )


# --- persistence across controllers ------------------------------------------------------


def test_network_survives_a_new_controller_with_every_field(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        net = ctl.create_network(
            "web",
            driver="null",
            ipv4=[
                IPAMConfig(
                    subnet="10.20.0.0/24",
                    gateway="10.20.0.254",
                    ip_range="10.20.0.128/25",
                    aux_addresses={"router": "10.20.0.5", "dns": "10.20.0.6"},
                )
            ],
            ipv6=[IPAMConfig(subnet="fd00:20::/64", gateway="fd00:20::1")],
            enable_ipv6=True,
            internal=True,
            options={"com.docker.network.driver.mtu": "1400"},
            labels={"team": "blue", "env": "test"},
            ipam_options={"opt": "x"},
        )
        before = net.record
        before_dict = net.to_dict()
        other = ctl.create_network("db", driver="null")
        other_before = other.record
    with _open(dirs) as ctl2:
        after = ctl2.network("web").record
        assert _fields(after) == _fields(before)
        assert ctl2.network(before.id).to_dict() == before_dict
        assert ctl2.network(before.id[:12]).id == before.id
        # Spot-check the fields that are easiest to lose in (de)serialisation.
        assert after.state == "ready"
        assert after.internal is True and after.enable_ipv6 is True
        assert after.options == {"com.docker.network.driver.mtu": "1400"}
        assert after.labels == {"team": "blue", "env": "test"}
        assert after.ipam_options == {"opt": "x"}
        (p4,) = after.ipv4
        assert isinstance(p4, PoolData)
        assert p4.subnet == "10.20.0.0/24"
        assert p4.gateway == "10.20.0.254/24"
        assert p4.ip_range == "10.20.0.128/25"
        assert p4.aux_addresses == {"router": "10.20.0.5/24", "dns": "10.20.0.6/24"}
        (p6,) = after.ipv6
        assert p6.subnet == "fd00:20::/64"
        assert p6.gateway == "fd00:20::1/64"
        assert _fields(ctl2.network("db").record) == _fields(other_before)
        assert [n.name for n in ctl2.networks()] == ["web", "db"]


def test_endpoints_survive_a_new_controller(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        net = ctl.create_network("web", driver="null", ipv4=[IPAMConfig(subnet="10.21.0.0/24")])
        e1 = net.create_endpoint("e1")
        e2 = net.create_endpoint(
            "e2", ipv4_address="10.21.0.77", mac_address="02:aa:bb:cc:dd:ee", options={"k": "v"}
        )
        bulk = net.create_endpoints(["b1", "b2", "b3"])
        before = {e.name: _fields(e.record) for e in [e1, e2, *bulk]}
    with _open(dirs) as ctl2:
        net2 = ctl2.network("web")
        eps = net2.endpoints()
        assert [e.name for e in eps] == ["e1", "e2", "b1", "b2", "b3"]  # creation order kept
        assert {e.name: _fields(e.record) for e in eps} == before
        got = net2.endpoint("e2")
        assert got.ipv4_address == ipaddress.IPv4Interface("10.21.0.77/24")
        assert got.mac_address == "02:aa:bb:cc:dd:ee"
        assert got.options == {"k": "v"}
        assert net2.endpoint("e1").ipv4_address == ipaddress.IPv4Interface("10.21.0.2/24")
        # Docker's MAC scheme: 02:42 + the IPv4 address; it must come back as stored.
        assert net2.endpoint("e1").mac_address == "02:42:0a:15:00:02"
        assert net2.endpoint(str(before["b1"]["id"])).name == "b1"
        assert ctl2.store.count_endpoints() == 5


def test_allocated_addresses_are_not_handed_out_again(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        net = ctl.create_network("web", driver="null", ipv4=[IPAMConfig(subnet="10.22.0.0/24")])
        first = {str(e.ipv4_address.ip) for e in net.create_endpoints(["a", "b", "c"])}
        assert first == {"10.22.0.2", "10.22.0.3", "10.22.0.4"}
    with _open(dirs) as ctl2:
        net2 = ctl2.network("web")
        # A static request for an address the first controller gave out is refused.
        with pytest.raises(errors.AddressInUse):
            net2.create_endpoint("dup", ipv4_address="10.22.0.3")
        with pytest.raises(errors.AddressInUse):  # the gateway is reserved too
            net2.create_endpoint("gw", ipv4_address="10.22.0.1")
        new = net2.create_endpoints([f"n{i}" for i in range(5)])
        got = {str(e.ipv4_address.ip) for e in new}
        assert not got & first
        assert "10.22.0.1" not in got
        allocated = _ipam(ctl2).allocated(net2.record.ipv4[0].pool_id)
        assert len(allocated) == 1 + 3 + 5  # gateway + both controllers' endpoints


def test_serial_cursor_persists_across_controllers(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        net = ctl.create_network("web", driver="null", ipv4=[IPAMConfig(subnet="10.23.0.0/24")])
        net.create_endpoint("a")  # .2
        b = net.create_endpoint("b")  # .3
        c = net.create_endpoint("c")  # .4
        assert str(c.ipv4_address.ip) == "10.23.0.4"
        b.delete()
        c.delete()  # .3 and .4 are free again, but the cursor stands at .4
    with _open(dirs) as ctl2:
        d = ctl2.network("web").create_endpoint("d")
        # Without the persisted cursor the lowest free address (.3) would come back.
        assert str(d.ipv4_address.ip) == "10.23.0.5"
    with _open(dirs) as ctl3:
        e = ctl3.network("web").create_endpoints(["e", "f"])
        assert [str(x.ipv4_address.ip) for x in e] == ["10.23.0.6", "10.23.0.7"]


def test_pools_survive_a_new_controller(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        explicit = ctl.create_network(
            "fixed", driver="null", ipv4=[IPAMConfig(subnet="10.24.0.0/16")]
        )
        auto = ctl.create_network("auto", driver="null")
        auto_subnet = auto.subnets[0]
    with _open(dirs) as ctl2:
        with pytest.raises(errors.PoolOverlap):
            ctl2.create_network("clash", driver="null", ipv4=[IPAMConfig(subnet="10.24.5.0/24")])
        again = ctl2.create_network("auto2", driver="null")
        assert not again.subnets[0].overlaps(auto_subnet)  # type: ignore[arg-type]
        assert set(_ipam(ctl2).pools()) == {
            explicit.record.ipv4[0].pool_id,
            auto.record.ipv4[0].pool_id,
            again.record.ipv4[0].pool_id,
        }


def test_deleted_network_stays_deleted_and_frees_its_pool(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        net = ctl.create_network("web", driver="null", ipv4=[IPAMConfig(subnet="10.25.0.0/24")])
        net.delete()
    with _open(dirs) as ctl2:
        with pytest.raises(errors.NetworkNotFound):
            ctl2.network("web")
        assert _ipam(ctl2).pools() == []
        ctl2.create_network("web", driver="null", ipv4=[IPAMConfig(subnet="10.25.0.0/24")])


def test_ula_seed_is_persisted(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        seed = ctl.store.meta("ula_seed")
        assert seed
        v6 = ctl.create_network("v6", driver="null", enable_ipv6=True).record.ipv6[0].subnet
    with _open(dirs) as ctl2:
        assert ctl2.store.meta("ula_seed") == seed
        other = ctl2.create_network("v6b", driver="null", enable_ipv6=True).record.ipv6[0]
        # Both come from the same /48 (the persisted seed), and do not overlap.
        a, b = ipaddress.ip_network(v6), ipaddress.ip_network(other.subnet)
        assert a.supernet(new_prefix=48) == b.supernet(new_prefix=48)
        assert not a.overlaps(b)


# --- the file itself: WAL and schema -------------------------------------------------


def test_wal_mode_is_on(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        assert ctl.store.fetchone("PRAGMA journal_mode") == ("wal",)
    # WAL is persistent in the file: a connection of our own sees it too.
    with _raw(dirs[0]) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_fresh_store_migrates_to_current_schema(tmp_path: object) -> None:
    state = os.path.join(str(tmp_path), "fresh", "nested")
    store = SQLiteStore(state)
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert store.meta("schema_version") == str(SCHEMA_VERSION)
    finally:
        store.close()
    assert oct(os.stat(state).st_mode & 0o777) == oct(0o700)
    db = _raw(state)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables >= TABLES
        (ver,) = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert int(ver) == SCHEMA_VERSION
    finally:
        db.close()
    # Reopening is a no-op, not a second migration (which would fail on CREATE TABLE).
    SQLiteStore(state).close()


def test_newer_schema_is_refused(dirs: tuple[str, str]) -> None:
    SQLiteStore(dirs[0]).close()
    db = _raw(dirs[0])
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(errors.StoreError, match="schema version"):
        SQLiteStore(dirs[0])
    with pytest.raises(errors.StoreError):
        NetworkController(state_dir=dirs[0], run_dir=dirs[1])
    # Refusing must not "downgrade" the recorded version.
    db = _raw(dirs[0])
    try:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert row == (str(SCHEMA_VERSION + 1),)
    finally:
        db.close()


def test_older_schema_is_migrated_forward(
    dirs: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with _open(dirs) as ctl:
        ctl.create_network("keep", driver="null", ipv4=[IPAMConfig(subnet="10.26.0.0/24")])
    extra = (
        "CREATE TABLE future_things (id TEXT PRIMARY KEY); CREATE INDEX f_i ON future_things(id)"
    )
    monkeypatch.setattr(sqlite_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", [*sqlite_mod.MIGRATIONS, extra])
    store = SQLiteStore(dirs[0])
    try:
        assert store.schema_version == SCHEMA_VERSION + 1
        assert store.fetchone("SELECT count(*) FROM future_things") == (0,)
        net = store.network_by_name("keep")
        assert net is not None and net.ipv4[0].subnet == "10.26.0.0/24"
    finally:
        store.close()


def test_failed_migration_changes_nothing(
    dirs: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    SQLiteStore(dirs[0]).close()
    broken = "CREATE TABLE half_done (x); THIS IS NOT SQL"
    monkeypatch.setattr(sqlite_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", [*sqlite_mod.MIGRATIONS, broken])
    with pytest.raises(errors.StoreError, match="syntax error"):
        SQLiteStore(dirs[0])
    monkeypatch.undo()
    store = SQLiteStore(dirs[0])
    try:
        assert store.schema_version == SCHEMA_VERSION
        assert store.fetchone("SELECT name FROM sqlite_master WHERE name='half_done'") is None
    finally:
        store.close()


# The schema as version 1 was released (a frozen copy: the code's MIGRATIONS[0] must never
# change, because stores written by it exist; later changes come as new migrations).
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE networks (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, driver TEXT NOT NULL,
    scope TEXT NOT NULL, ipam_driver TEXT NOT NULL, data TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE endpoints (
    id TEXT PRIMARY KEY, network_id TEXT NOT NULL REFERENCES networks(id),
    name TEXT NOT NULL, ipv4 TEXT, ipv6 TEXT, mac TEXT NOT NULL, options TEXT NOT NULL,
    sandbox_id TEXT, state TEXT NOT NULL, join_state TEXT NOT NULL DEFAULT '',
    driver_data TEXT NOT NULL DEFAULT '{}', UNIQUE (network_id, name)
);
CREATE INDEX endpoints_sandbox ON endpoints(sandbox_id);
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY, container_id TEXT NOT NULL UNIQUE, key TEXT NOT NULL,
    explicit INTEGER NOT NULL, data TEXT NOT NULL, state TEXT NOT NULL
);
CREATE TABLE ipam_pools (
    pool_id TEXT PRIMARY KEY, address_space TEXT NOT NULL, subnet TEXT NOT NULL,
    version INTEGER NOT NULL, net_lo BLOB NOT NULL, net_hi BLOB NOT NULL,
    range_lo BLOB NOT NULL, range_hi BLOB NOT NULL, cursor BLOB, refcount INTEGER NOT NULL
);
CREATE TABLE ipam_addresses (
    pool_id TEXT NOT NULL REFERENCES ipam_pools(pool_id), addr BLOB NOT NULL,
    kind TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '', PRIMARY KEY (pool_id, addr)
) WITHOUT ROWID;
"""


def _b(addr: str) -> bytes:
    return int(ipaddress.ip_address(addr)).to_bytes(16, "big")


def test_store_written_by_schema_v1_still_opens(dirs: tuple[str, str]) -> None:
    """A state.db made by the released version-1 schema keeps working after an upgrade."""
    os.makedirs(dirs[0])
    net_id, ep_id = "1" * 64, "2" * 64
    pool_id = "LocalDefault/10.70.0.0/24"
    data = {
        "enable_ipv6": False,
        "internal": False,
        "options": {},
        "labels": {"old": "yes"},
        "ipam_options": {},
        "ipv4": [
            {
                "pool_id": pool_id,
                "subnet": "10.70.0.0/24",
                "gateway": "10.70.0.1/24",
                "ip_range": None,
                "aux_addresses": {},
            }
        ],
        "ipv6": [],
    }
    db = _raw(dirs[0])
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_SCHEMA_V1)
    with db:
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        db.execute(
            "INSERT INTO networks VALUES (?,?,?,?,?,?,?,?)",
            (net_id, "old", "null", "local", "default", json.dumps(data), "ready", 1.5),
        )
        db.execute(
            "INSERT INTO endpoints (id, network_id, name, ipv4, ipv6, mac, options, sandbox_id,"
            " state, join_state, driver_data) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                *(ep_id, net_id, "e1", "10.70.0.2/24", None, "02:42:0a:46:00:02", "{}"),
                *(None, "ready", "", "{}"),
            ),
        )
        db.execute(
            "INSERT INTO ipam_pools VALUES (?,?,?,?,?,?,?,?,?,1)",
            (
                *(pool_id, "LocalDefault", "10.70.0.0/24", 4),
                *(_b("10.70.0.0"), _b("10.70.0.255"), _b("10.70.0.1"), _b("10.70.0.254")),
                _b("10.70.0.2"),  # the cursor
            ),
        )
        db.executemany(
            "INSERT INTO ipam_addresses VALUES (?,?,?,?)",
            [
                (pool_id, _b("10.70.0.1"), "gateway", net_id),
                (pool_id, _b("10.70.0.2"), "endpoint", ep_id),
            ],
        )
    db.close()

    with _open(dirs) as ctl:
        assert ctl.store.schema_version == SCHEMA_VERSION
        net = ctl.network("old")
        assert net.id == net_id
        assert net.labels == {"old": "yes"}
        assert [str(s) for s in net.subnets] == ["10.70.0.0/24"]
        (ep,) = net.endpoints()
        assert (ep.id, ep.name, str(ep.ipv4_address)) == (ep_id, "e1", "10.70.0.2/24")
        with pytest.raises(errors.AddressInUse):
            net.create_endpoint("dup", ipv4_address="10.70.0.2")
        assert str(net.create_endpoint("e2").ipv4_address) == "10.70.0.3/24"
        report = ctl.reconcile().to_dict()
        assert _clean(report), report
        ep.delete()
        net.endpoint("e2").delete()
        net.delete()
        assert ctl.networks() == []


# --- transactions --------------------------------------------------------------------


class _Boom(Exception):
    pass


def test_failure_inside_tx_rolls_back_everything(dirs: tuple[str, str]) -> None:
    store = SQLiteStore(dirs[0])
    try:
        net = _net_record()
        with pytest.raises(_Boom), store.tx():
            store.put_network(net)  # nested tx() calls join the outer one
            store.put_endpoint(_ep_record(net.id))
            store.set_meta("marker", "1")
            with store.tx():
                store.execute("UPDATE networks SET state='deleting'")
            assert store.network_by_id(net.id) is not None  # visible inside the tx
            raise _Boom
        assert store.network_by_id(net.id) is None
        assert store.endpoints() == []
        assert store.meta("marker") is None
        # The store is usable afterwards, and a clean tx commits.
        with store.tx():
            store.put_network(net)
            store.put_endpoint(_ep_record(net.id))
    finally:
        store.close()
    db = _raw(dirs[0])
    try:
        assert db.execute("SELECT count(*) FROM networks").fetchone() == (1,)
        assert db.execute("SELECT count(*) FROM endpoints").fetchone() == (1,)
    finally:
        db.close()


def test_failure_in_a_nested_tx_rolls_back_the_outer_one(dirs: tuple[str, str]) -> None:
    store = SQLiteStore(dirs[0])
    try:
        net = _net_record()
        with pytest.raises(_Boom), store.tx():
            store.put_network(net)
            with store.tx():
                store.put_endpoint(_ep_record(net.id))
                raise _Boom
        assert store.network_by_id(net.id) is None
        assert store.endpoints() == []
    finally:
        store.close()


def test_uncommitted_writes_are_invisible_to_other_connections(dirs: tuple[str, str]) -> None:
    store = SQLiteStore(dirs[0])
    other = SQLiteStore(dirs[0])
    try:
        net = _net_record()
        with store.tx():
            store.put_network(net)
            assert other.network_by_id(net.id) is None
        assert _fields(other.network_by_id(net.id)) == _fields(net)
    finally:
        store.close()
        other.close()


def test_record_round_trip_is_exact(dirs: tuple[str, str]) -> None:
    store = SQLiteStore(dirs[0])
    try:
        net = dataclasses.replace(
            _net_record(),
            options={"a": "1"},
            labels={"l": "x"},
            ipv4=(PoolData("LocalDefault/10.9.0.0/24", "10.9.0.0/24", "10.9.0.1/24", None, {}),),
        )
        store.put_network(net)
        ep = dataclasses.replace(
            _ep_record(net.id), options={"o": "p"}, driver_data={"n": 1, "l": [1, "x"]}
        )
        store.put_endpoint(ep)
        assert _fields(store.network_by_id(net.id)) == _fields(net)
        assert _fields(store.endpoint_by_id(ep.id)) == _fields(ep)
        # An upsert replaces in place and keeps the creation order.
        store.put_endpoint(_ep_record(net.id, "e0", "c" * 64))
        store.put_endpoint(dataclasses.replace(ep, state="deleting"))
        assert [e.name for e in store.endpoints(net.id)] == ["e1", "e0"]
        assert store.endpoint_by_id(ep.id).state == "deleting"  # type: ignore[union-attr]
    finally:
        store.close()


def test_duplicate_endpoint_name_in_a_batch_leaves_nothing(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        net = ctl.create_network("web", driver="null", ipv4=[IPAMConfig(subnet="10.27.0.0/24")])
        net.create_endpoint("taken")
        pool = net.record.ipv4[0].pool_id
        before = _ipam(ctl).allocated(pool)
        with pytest.raises(errors.NameInUse):
            net.create_endpoints(["x1", "x2", "taken", "x3"])
        assert [e.name for e in net.endpoints()] == ["taken"]
        assert _ipam(ctl).allocated(pool) == before  # no address leaked


def test_failed_network_create_leaves_no_pool_behind(dirs: tuple[str, str]) -> None:
    with _open(dirs) as ctl:
        # The aux address equals the gateway: the pool is taken, then the aux request fails.
        with pytest.raises(errors.AddressInUse):
            ctl.create_network(
                "web",
                driver="null",
                ipv4=[
                    IPAMConfig(
                        subnet="10.28.0.0/24",
                        gateway="10.28.0.1",
                        aux_addresses={"clash": "10.28.0.1"},
                    )
                ],
            )
        assert ctl.networks() == []
        assert _ipam(ctl).pools() == []
        assert ctl.store.fetchone("SELECT count(*) FROM ipam_addresses") == (0,)
        ctl.create_network("web", driver="null", ipv4=[IPAMConfig(subnet="10.28.0.0/24")])
