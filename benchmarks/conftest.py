"""Benchmarks run in the same throwaway host as the tests (tests/harness.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import harness

from .bench_common import build_c


def pytest_configure(config: pytest.Config) -> None:
    harness.ensure_isolated()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is not None:
        reason = harness.why_not_isolated()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def floor_binary() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield build_c("attach_floor", d)


@pytest.fixture
def run_root() -> Iterator[Path]:
    """A directory on the throwaway host's private /run (tmpfs), as a real host's
    /run/cnm is: sandbox keys and their files go there; state stays on disk."""
    with tempfile.TemporaryDirectory(dir="/run", prefix="cnm-bench-") as d:
        yield Path(d)
