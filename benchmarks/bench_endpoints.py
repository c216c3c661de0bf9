"""10,000 endpoints on the null driver: creation in the store, and the controller's RSS.

Reference (same run): the store's floor, 10,000 rows of the same shape inserted in one
transaction into a bare SQLite table. The RSS bound (100 MB with 10,000 endpoints held)
is a memory budget, so it is asserted; speed is only reported as a ratio.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile

from cnm.control import NetworkController

from .bench_common import best_of, record_ratio, timed

N = 10_000
RSS_BUDGET_MB = 100


def _create(state: str, run: str) -> None:
    with NetworkController(state_dir=state, run_dir=run) as ctl:
        net = ctl.create_network("bench", driver="null")
        eps = net.create_endpoints([f"ep{i}" for i in range(N)])
        assert len({e.ipv4_address for e in eps}) == N


def _floor(path: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE e (id TEXT PRIMARY KEY, name TEXT, n TEXT, v4 TEXT, mac TEXT,"
        " opts TEXT, UNIQUE (n, name))"
    )
    db.execute("CREATE TABLE a (p TEXT, addr BLOB, PRIMARY KEY (p, addr)) WITHOUT ROWID")
    db.execute("BEGIN IMMEDIATE")
    for i in range(N):
        db.execute(
            "INSERT INTO e VALUES (?,?,?,?,?,?)",
            (
                os.urandom(32).hex(),
                f"ep{i}",
                "n",
                f"172.17.{i >> 8}.{i & 255}/16",
                "02:42:ac:11:00:00",
                "{}",
            ),
        )
        db.execute("INSERT INTO a VALUES ('p', ?)", (i.to_bytes(16, "big"),))
    db.execute("COMMIT")
    db.close()


def test_create_10000_endpoints(benchmark) -> None:
    with tempfile.TemporaryDirectory() as d:
        runs = iter(range(100))

        def setup() -> tuple[tuple[str, str], dict[str, object]]:
            i = next(runs)
            return (os.path.join(d, f"s{i}"), os.path.join(d, f"r{i}")), {}

        times: list[float] = []
        benchmark.pedantic(timed(_create, times), setup=setup, rounds=1, iterations=1)
        ours = min(times)
        floors = iter(range(100))
        reference = best_of(lambda: _floor(os.path.join(d, f"floor{next(floors)}.db")), rounds=1)
        record_ratio(benchmark, "create_10000_endpoints", ours, reference)


_RSS_PROBE = """
import json, sys, time
from cnm.control import NetworkController
state, run, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with NetworkController(state_dir=state, run_dir=run) as ctl:
    net = ctl.create_network("rss", driver="null")
    net.create_endpoints([f"ep{i}" for i in range(n)])
with NetworkController(state_dir=state, run_dir=run) as ctl:
    t0 = time.perf_counter()
    held = [ep for n in ctl.networks() for ep in n.endpoints()]
    listed = time.perf_counter() - t0
    # VmHWM: this process's own peak. getrusage's ru_maxrss would also count the parent's
    # size at fork (Linux keeps it across exec), i.e. the whole pytest process.
    with open("/proc/self/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"endpoints": len(held), "rss_mb": rss_kb / 1024, "list_s": listed}))
"""


def test_controller_rss_with_10000_endpoints(benchmark) -> None:
    """A fresh controller process that loads and holds 10,000 endpoints stays under 100 MB.

    The benchmark times the whole probe process (create 10,000, reopen, list them all).
    """
    results: list[dict[str, float]] = []

    def probe() -> None:
        with tempfile.TemporaryDirectory() as d:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _RSS_PROBE,
                    os.path.join(d, "s"),
                    os.path.join(d, "r"),
                    str(N),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))

    benchmark.pedantic(probe, rounds=1, iterations=1)
    result = results[-1]
    benchmark.extra_info.update(result)
    print(f"\nRSS with {result['endpoints']} endpoints held: {result['rss_mb']:.1f} MB")
    assert result["endpoints"] == N
    assert result["rss_mb"] < RSS_BUDGET_MB
