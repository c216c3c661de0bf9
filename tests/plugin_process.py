"""`cnm plugin serve` as a child process, for the round-trip tests and the benchmark.

Owns starting cnm's own plugin server with its own state and run directories and a
temporary plugin directory (never the real /run/docker/plugins), waiting until it
serves, stopping it by its PID (SIGTERM: a clean exit that removes its socket; SIGKILL:
a crash that leaves the socket behind), and reading its store independently of cnm
(sqlite3, read-only).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

STORE_TABLES = ("networks", "endpoints", "sandboxes", "ipam_pools", "ipam_addresses")
POOL_REFS_KEY = "plugin.ipam_pools"  # where the plugin keeps its IPAM reference counts


class CnmPlugin:
    """One `cnm plugin serve` process; `base` holds its state dir, run dir and log."""

    def __init__(self, base: Path, plugin_dir: Path, name: str = "cnm") -> None:
        self.state, self.run, self.log = base / "state", base / "run", base / "plugin.log"
        self.plugin_dir, self.name = plugin_dir, name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.plugin_dir / f"{self.name}.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> CnmPlugin:
        assert self.proc is None, "already running"
        cmd = [sys.executable, "-m", "cnm.control.cli", "--state-dir", str(self.state)]
        cmd += ["--run-dir", str(self.run), "plugin", "serve", "--name", self.name]
        cmd += ["--plugin-dir", str(self.plugin_dir)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("serving "):
            self.stop(signal.SIGKILL)
            raise AssertionError(f"the plugin did not start: {self.log.read_text()[-3000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the process with `sig`; its exit status (None if it was not running).
        A SIGTERM must end in a clean exit that removed the socket."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        if sig == signal.SIGTERM:
            assert proc.returncode == 0, self.log.read_text()[-3000:]
            assert not self.socket.exists(), "the plugin left its socket behind"
        return proc.returncode

    def store_rows(self) -> dict[str, int]:
        """Rows in each table of the plugin's store (read-only, without cnm's code)."""
        return store_rows(self.state)

    def pool_refs(self) -> dict[str, object]:
        """The plugin's IPAM reference counts (its meta record), {} when none."""
        db = sqlite3.connect(f"file:{self.state / 'state.db'}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key=?", (POOL_REFS_KEY,)).fetchone()
        finally:
            db.close()
        return json.loads(row[0]) if row and row[0] else {}

    def network_names(self) -> list[str]:
        db = sqlite3.connect(f"file:{self.state / 'state.db'}?mode=ro", uri=True)
        try:
            return sorted(r[0] for r in db.execute("SELECT name FROM networks"))
        finally:
            db.close()

    def endpoint_names(self) -> list[str]:
        db = sqlite3.connect(f"file:{self.state / 'state.db'}?mode=ro", uri=True)
        try:
            return sorted(r[0] for r in db.execute("SELECT name FROM endpoints"))
        finally:
            db.close()


def store_rows(state_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Rows in each table of the store in `state_dir` (read-only, without cnm's code)."""
    db = sqlite3.connect(f"file:{Path(state_dir) / 'state.db'}?mode=ro", uri=True)
    try:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in STORE_TABLES}
    finally:
        db.close()
