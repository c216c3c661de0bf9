"""Benchmarks run in the same throwaway host as the tests (tests/harness.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import harness


def pytest_configure(config: pytest.Config) -> None:
    harness.ensure_isolated()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is not None:
        reason = harness.why_not_isolated()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def floor_binary() -> Iterator[str]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler for the kernel-floor reference")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "attach_floor")
        src = Path(__file__).with_name("attach_floor.c")
        subprocess.run([gcc, "-O2", "-o", out, str(src)], check=True)
        yield out


@pytest.fixture
def run_root() -> Iterator[Path]:
    """A directory on the throwaway host's private /run (tmpfs), as a real host's
    /run/cnm is: sandbox keys and their files go there; state stays on disk."""
    with tempfile.TemporaryDirectory(dir="/run", prefix="cnm-bench-") as d:
        yield Path(d)
