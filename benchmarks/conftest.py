"""Benchmarks run in the same throwaway host as the tests (tests/harness.py)."""

from __future__ import annotations

import pytest

from tests import harness


def pytest_configure(config: pytest.Config) -> None:
    harness.ensure_isolated()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is not None:
        reason = harness.why_not_isolated()
        if reason is not None:
            pytest.skip(reason)
