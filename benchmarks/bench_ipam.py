"""IPAM: a /16 filled and drained through the default IPAM, one address per transaction.

Reference (same run): the store's floor, the same number of one-row INSERT and DELETE
transactions on a bare SQLite table of the same shape in the same WAL mode.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import tempfile

from cnm.control.ipam.api import PoolRequest
from cnm.control.ipam.default import DefaultIpam
from cnm.control.store import SQLiteStore

from .bench_common import best_of, record_ratio, timed

SUBNET = ipaddress.ip_network("10.44.0.0/16")
HOSTS = SUBNET.num_addresses - 2


def _fill_and_drain(ipam: DefaultIpam, pool_id: str) -> None:
    got = [ipam.request_address(pool_id).ip for _ in range(HOSTS)]
    assert len(set(got)) == HOSTS
    for ip in got:
        ipam.release_address(pool_id, ip)


def _floor(path: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS a (p TEXT, addr BLOB, k TEXT, o TEXT,"
        " PRIMARY KEY (p, addr)) WITHOUT ROWID"
    )
    for i in range(HOSTS):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO a VALUES ('p', ?, 'endpoint', '')", (i.to_bytes(16, "big"),))
        db.execute("COMMIT")
    for i in range(HOSTS):
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM a WHERE p='p' AND addr=?", (i.to_bytes(16, "big"),))
        db.execute("COMMIT")
    db.close()


def test_ipam_fill_and_drain_a_slash16(benchmark) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = SQLiteStore(os.path.join(d, "state"))
        ipam = DefaultIpam(store, routes=lambda: [])
        pool_id = ipam.request_pool(PoolRequest("LocalDefault", SUBNET)).pool_id
        times: list[float] = []
        benchmark.pedantic(
            timed(_fill_and_drain, times), args=(ipam, pool_id), rounds=1, iterations=1
        )
        assert ipam.allocated(pool_id) == []
        ours = min(times)
        reference = best_of(lambda: _floor(os.path.join(d, "floor.db")), rounds=1)
        record_ratio(benchmark, "ipam_slash16_fill_drain", ours, reference)
        store.close()
