"""Test fixtures: the throwaway host (tests/harness.py) and the privileged marker.

Tests marked `privileged` need the isolation; without root they are skipped with the
reason. Everything else runs anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import harness
from tests.harness import IsolatedHost

__all__ = ["IsolatedHost"]


def pytest_configure(config: pytest.Config) -> None:
    """Enter the throwaway namespaces before any test (or thread) exists."""
    harness.ensure_isolated()


@pytest.fixture(scope="session", autouse=True)
def isolated_host() -> Iterator[IsolatedHost | None]:
    """The session's throwaway host; on teardown, proof the real host was not touched."""
    yield harness.isolation()
    harness.check_host_untouched()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is not None:
        reason = harness.why_not_isolated()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture
def dirs(tmp_path: pytest.TempPathFactory) -> tuple[str, str]:
    """A fresh (state_dir, run_dir) pair."""
    state = tmp_path / "state"  # type: ignore[operator]
    run = tmp_path / "run"  # type: ignore[operator]
    return str(state), str(run)


@pytest.fixture
def ctl(dirs: tuple[str, str]) -> Iterator[object]:
    from cnm.control import NetworkController

    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as c:
        yield c
