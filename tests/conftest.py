"""Test harness: the throwaway host and the privileged marker.

When the suite runs as root, the session fixture `isolated_host` moves the whole test
process (before any thread exists) into a new network namespace and a new private mount
namespace with its own /run and /sys. Every device, namespace mount and socket the tests
make lives there; the kernel discards all of it when the process exits, and the host's
links, routes, firewall and /run are never touched. At the end of the session the
fixture checks the host's link list is exactly what it was at the start.

Tests marked `privileged` need that isolation; without root they are skipped with the
reason. Everything else runs anywhere.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cnm.fastpath import netns


@dataclass(frozen=True)
class IsolatedHost:
    host_netns: str  # a path that opens the host's network namespace (read-only use)
    host_links: tuple[str, ...]

    def current_host_links(self) -> tuple[str, ...]:
        return tuple(sorted(netns.run_in(self.host_netns, netns.link_names)))


def _why_not_isolated() -> str | None:
    if os.geteuid() != 0:
        return "privileged tests need root (they run in a throwaway network + mount namespace)"
    return None


def _isolate() -> IsolatedHost:
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("the test process must be single-threaded to enter its namespaces")
    host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    host_links = tuple(sorted(name for _, name in socket.if_nameindex()))
    netns.unshare(netns.CLONE_NEWNET | netns.CLONE_NEWNS)
    netns.mount("none", "/", None, netns.MS_REC | netns.MS_PRIVATE)
    netns.mount("tmpfs", "/run", "tmpfs", netns.MS_NOSUID | netns.MS_NODEV, "mode=755")
    netns.mount("sysfs", "/sys", "sysfs", netns.MS_NOSUID | netns.MS_NODEV | netns.MS_NOEXEC)
    netns._set_link_up("lo")
    return IsolatedHost(f"/proc/{os.getpid()}/fd/{host_fd}", host_links)


_ISOLATION: IsolatedHost | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Enter the throwaway namespaces before any test (or thread) exists."""
    global _ISOLATION
    if _why_not_isolated() is None:
        _ISOLATION = _isolate()


@pytest.fixture(scope="session", autouse=True)
def isolated_host() -> Iterator[IsolatedHost | None]:
    """The session's throwaway host; on teardown, proof the real host was not touched."""
    yield _ISOLATION
    if _ISOLATION is not None:
        after = _ISOLATION.current_host_links()
        assert after == _ISOLATION.host_links, (
            f"the host's links changed during the test run: {_ISOLATION.host_links} -> {after}"
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is not None:
        reason = _why_not_isolated()
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
