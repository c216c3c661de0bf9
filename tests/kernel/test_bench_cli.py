"""`cnm bench`: every method measured in one run, a table or JSON, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged


def _cnm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnm.control.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_measures_every_method(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = _cnm("bench", "--containers", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["containers"] == 3
    methods = {r["method"]: r for r in doc["results"]}
    assert "cnm (python)" in methods
    for name in ("cnm (python)", "pyroute2 (one message at a time)", "ip per operation"):
        r = methods[name]
        assert r["join_p50_ms"] > 0 and r["leave_p50_ms"] > 0, r
    assert methods["cnm (python)"]["bulk_join_per_s"] > 0
    cni = methods["CNI bridge plugin"]
    assert cni["join_p50_ms"] is not None or "not installed" in cni["note"]
    assert "join p50" in proc.stdout  # the table


def test_bench_refuses_an_unknown_method() -> None:
    proc = _cnm("bench", "--containers", "1", "--compare", "docker")
    assert proc.returncode == 1
    assert "unknown --compare" in proc.stderr and "Traceback" not in proc.stderr
