"""The throwaway host shared by tests/ and benchmarks/.

When run as root, `ensure_isolated()` moves the whole process (before any thread exists)
into a new network namespace and a new private mount namespace with its own /run and
/sys. Every device, namespace mount and socket the run makes lives there; the kernel
discards all of it when the process exits, and the host's links, routes, firewall and
/run are never touched. `check_host_untouched()` proves the host's link list is what it
was at the start.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from cnm.fastpath import netns


@dataclass(frozen=True)
class IsolatedHost:
    host_netns: str  # a path that opens the host's network namespace (read-only use)
    host_links: tuple[str, ...]

    def current_host_links(self) -> tuple[str, ...]:
        return tuple(sorted(netns.run_in(self.host_netns, netns.link_names)))


def why_not_isolated() -> str | None:
    if os.geteuid() != 0:
        return "privileged tests need root (they run in a throwaway network + mount namespace)"
    return None


_ISOLATION: IsolatedHost | None = None


def ensure_isolated() -> IsolatedHost | None:
    """Enter the throwaway namespaces once per process (a no-op without root)."""
    global _ISOLATION
    if _ISOLATION is not None or why_not_isolated() is not None:
        return _ISOLATION
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("the test process must be single-threaded to enter its namespaces")
    host_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    host_links = tuple(sorted(name for _, name in socket.if_nameindex()))
    netns.enter_throwaway_host()
    _ISOLATION = IsolatedHost(f"/proc/{os.getpid()}/fd/{host_fd}", host_links)
    return _ISOLATION


def isolation() -> IsolatedHost | None:
    return _ISOLATION


def check_host_untouched() -> None:
    if _ISOLATION is not None:
        after = _ISOLATION.current_host_links()
        assert after == _ISOLATION.host_links, (
            f"the host's links changed during the run: {_ISOLATION.host_links} -> {after}"
        )
