"""The store's join bookkeeping: the per-network joined counts kept by triggers (schema 3),
and the narrow writes of a join's intent and confirmation."""

from __future__ import annotations

import dataclasses
import os
import sqlite3

import pytest

from cnm.control.store import SCHEMA_VERSION, SQLiteStore
from cnm.control.store import sqlite as sqlite_mod
from cnm.control.types import EndpointRecord, NetworkRecord
from tests.unit.test_store import _net_record

NET_A, NET_B = "a" * 64, "c" * 64


def _net(net_id: str, name: str) -> NetworkRecord:
    return _net_record(name, net_id)


def _ep(net_id: str, n: int, join_state: str = "") -> EndpointRecord:
    return EndpointRecord(
        id=f"{n:064x}",
        name=f"e{n}",
        network_id=net_id,
        ipv4_address=f"10.9.0.{n + 2}/24",
        ipv6_address=None,
        mac_address="02:42:0a:09:00:02",
        options={"k": "v"},
        sandbox_id="s" * 64 if join_state else None,
        state="ready",
        join_state=join_state,  # type: ignore[arg-type]
        driver_data={"keep": 1},
    )


def _counted(store: SQLiteStore, net_id: str) -> int:
    """What the triggers must agree with: a scan of the endpoints."""
    row = store.fetchone(
        "SELECT count(*) FROM endpoints WHERE network_id=? AND join_state != ''", (net_id,)
    )
    assert row is not None
    return int(row[0])


def _check(store: SQLiteStore, *expected: tuple[str, int]) -> None:
    for net_id, n in expected:
        assert store.count_joined(net_id) == _counted(store, net_id) == n


def test_joined_counts_follow_every_kind_of_write(tmp_path: object) -> None:
    store = SQLiteStore(os.path.join(str(tmp_path), "state"))
    try:
        store.put_network(_net(NET_A, "a"))
        store.put_network(_net(NET_B, "b"))
        _check(store, (NET_A, 0), (NET_B, 0))
        # Inserted already joined (a restore, another process) and not joined.
        store.put_endpoints([_ep(NET_A, 0, "joined"), _ep(NET_A, 1), _ep(NET_B, 2, "joining")])
        _check(store, (NET_A, 1), (NET_B, 1))
        # A join's intent and confirmation: counted from the intent on, once.
        store.put_join_intents([(f"{1:064x}", "t" * 64)])
        _check(store, (NET_A, 2), (NET_B, 1))
        store.put_join_results([(f"{1:064x}", {"ifname": "eth0"})])
        _check(store, (NET_A, 2), (NET_B, 1))
        # Upserts through put_endpoints: leaving still counts, left does not.
        store.put_endpoints([dataclasses.replace(_ep(NET_A, 0), join_state="leaving")])
        _check(store, (NET_A, 2))
        store.put_endpoints([_ep(NET_A, 0)])
        _check(store, (NET_A, 1))
        # A rolled back transaction leaves the counts as they were.
        with pytest.raises(RuntimeError), store.tx():
            store.put_join_intents([(f"{0:064x}", "t" * 64)])
            _check(store, (NET_A, 2))
            raise RuntimeError("undo")
        _check(store, (NET_A, 1), (NET_B, 1))
        # Deleting joined and unjoined endpoints, then a network.
        store.delete_endpoints([f"{1:064x}", f"{0:064x}"])
        _check(store, (NET_A, 0), (NET_B, 1))
        store.delete_endpoints([f"{2:064x}"])
        store.delete_network(NET_B)
        assert store.fetchone("SELECT n FROM joined_counts WHERE network_id=?", (NET_B,)) is None
        assert store.count_joined(NET_B) == 0
    finally:
        store.close()


def test_join_writes_touch_only_the_join_columns(tmp_path: object) -> None:
    store = SQLiteStore(os.path.join(str(tmp_path), "state"))
    try:
        store.put_network(_net(NET_A, "a"))
        before = _ep(NET_A, 5)
        store.put_endpoints([before])
        sandbox = "f" * 64
        store.put_join_intents([(before.id, sandbox)])
        rec = store.endpoint_by_id(before.id)
        assert rec is not None
        assert rec == dataclasses.replace(
            before, sandbox_id=sandbox, join_state="joining", owner=store.owner
        )
        store.put_join_results([(before.id, {"keep": 1, "ifname": "eth0", "gateway": True})])
        rec = store.endpoint_by_id(before.id)
        assert rec == dataclasses.replace(
            before,
            sandbox_id=sandbox,
            join_state="joined",
            driver_data={"keep": 1, "ifname": "eth0", "gateway": True},
            owner=store.owner,
        )
        # An endpoint that is not there is not created by either.
        store.put_join_intents([("9" * 64, sandbox)])
        store.put_join_results([("9" * 64, {})])
        assert store.endpoint_by_id("9" * 64) is None
    finally:
        store.close()


def test_schema_2_store_gets_its_counts_on_upgrade(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = os.path.join(str(tmp_path), "state")
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_mod, "SCHEMA_VERSION", 2)
        patch.setattr(sqlite_mod, "MIGRATIONS", sqlite_mod.MIGRATIONS[:2])
        old = SQLiteStore(state)
        try:
            assert old.schema_version == 2
            old.put_network(_net(NET_A, "a"))
            old.put_network(_net(NET_B, "b"))
            old.put_endpoints(
                [
                    _ep(NET_A, 0, "joined"),
                    _ep(NET_A, 1, "leaving"),
                    _ep(NET_A, 2),
                    _ep(NET_B, 3, "joining"),
                ]
            )
        finally:
            old.close()
    store = SQLiteStore(state)
    try:
        assert store.schema_version == SCHEMA_VERSION
        _check(store, (NET_A, 2), (NET_B, 1))
        store.put_join_intents([(f"{2:064x}", "t" * 64)])
        _check(store, (NET_A, 3))
    finally:
        store.close()
    db = sqlite3.connect(os.path.join(state, "state.db"))
    try:
        triggers = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        assert {"endpoints_joined_insert", "endpoints_joined_delete"} <= triggers
    finally:
        db.close()


def test_migration_statements_keep_trigger_bodies_whole() -> None:
    script = """
    CREATE TABLE t (x);
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET x = 1; DELETE FROM t; END;
    INSERT INTO t VALUES (';')
    """
    statements = [" ".join(s.split()) for s in sqlite_mod._statements(script)]
    assert statements == [
        "CREATE TABLE t (x);",
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET x = 1; DELETE FROM t; END;",
        "INSERT INTO t VALUES (';') ;",
    ]
