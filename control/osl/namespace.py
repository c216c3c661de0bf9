"""Sandbox namespaces: network namespaces bind-mounted at run_dir/netns/<sandbox id>.

Owns the netns directory under run_dir: creating a sandbox's namespace (loopback up,
IPv6 off by default for the interfaces that will come, a netlink socket opened inside and
kept, so joins configure the sandbox from the caller's thread without a namespace hop),
deleting it, telling whether a key still holds a live namespace, and listing what is
mounted there so reconcile can find namespaces that no sandbox owns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Callable
from typing import TypeVar

from cnm.fastpath import netns, transport

from .. import errors

T = TypeVar("T")


def kernel_error(exc: OSError, operation: str) -> errors.CNMError:
    """A typed error for an OSError met in the kernel: Forbidden without privilege, else
    KernelError with errno and the kernel's own message (a NetlinkError's extended ack)."""
    if exc.errno in (errno.EPERM, errno.EACCES):
        return errors.Forbidden(
            f"{operation}: {os.strerror(exc.errno)}; this needs root "
            "(CAP_SYS_ADMIN and CAP_NET_ADMIN)"
        )
    message = getattr(exc, "message", None) or exc.strerror or str(exc)
    return errors.KernelError(exc.errno or 0, message, operation=operation)


def _raise_fd_limit() -> None:
    """Every sandbox keeps a netlink socket open (fastpath.transport caches one per
    namespace, up to a share of RLIMIT_NOFILE): lift the soft limit to the hard one, as
    dockerd and containerd do, so thousands of sandboxes keep theirs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_DEFAULT_DISABLE_IPV6 = "/proc/sys/net/ipv6/conf/default/disable_ipv6"


def _disable_ipv6_by_default() -> None:
    # Runs inside the new namespace (/proc/sys/net is per netns). Interfaces created in or
    # moved into the sandbox later start with IPv6 off; a join with an IPv6 address turns
    # it on for that interface only (osl.interfaces). Plain os calls: once per sandbox.
    try:
        fd = os.open(_DEFAULT_DISABLE_IPV6, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # no IPv6: nothing to turn off
        return
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)


class NamespaceStore:
    """The directory of sandbox keys."""

    def __init__(self, run_dir: str, backend: str | None = None) -> None:
        self.dir = os.path.join(run_dir, "netns")
        self.backend = backend
        _raise_fd_limit()

    def _prepare(self, path: str) -> None:
        # Inside the new namespace: the socket kept for it, loopback up with one ioctl on
        # that socket (netns.create leaves it to us), then the sysctl. Cheapest in this
        # order; on failure the socket is dropped, as netns.create drops the namespace.
        sock = transport.adopt_current(path, backend=self.backend)
        try:
            netns.loopback_up(sock.fileno())
            _disable_ipv6_by_default()
        except BaseException:
            transport.forget(path)
            raise

    def key(self, sandbox_id: str) -> str:
        return os.path.join(self.dir, sandbox_id)

    def create(self, sandbox_id: str, key: str | None = None) -> str:
        """Create the sandbox's namespace (at `key`, default its place under run_dir).

        Returns the key. Nothing is left on failure.
        """
        path = key or self.key(sandbox_id)
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            netns.create(path, self._prepare, loopback=False)
        except OSError as exc:
            raise kernel_error(exc, f"create namespace {path}") from None
        return path

    def create_many(self, sandbox_ids: list[str]) -> list[str]:
        """Create many sandbox namespaces in one worker job; all of them, or none."""
        if not sandbox_ids:
            return []
        paths = [self.key(s) for s in sandbox_ids]
        try:
            os.makedirs(self.dir, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise kernel_error(exc, f"create {self.dir}") from None
        outcomes = netns.create_many(paths, self._prepare, loopback=False)
        failed = [(p, e) for p, e in zip(paths, outcomes, strict=True) if e is not None]
        if failed:
            for path, outcome in zip(paths, outcomes, strict=True):
                if outcome is None:
                    transport.forget(path)
                    netns.delete(path)
            path, exc = failed[0]
            assert isinstance(exc, OSError)
            raise kernel_error(exc, f"create namespace {path}")
        return paths

    def delete(self, key: str) -> None:
        transport.forget(key)  # a cached socket would keep the namespace alive
        try:
            netns.delete(key)
        except OSError as exc:
            raise kernel_error(exc, f"delete namespace {key}") from None

    def exists(self, key: str) -> bool:
        return netns.is_netns(key)

    def mounted(self) -> list[str]:
        """Keys under the directory that hold a namespace (or a stale file)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return [os.path.join(self.dir, n) for n in sorted(names)]

    def run_in(self, key: str, fn: Callable[[], T]) -> T:
        """Run `fn` inside the sandbox's namespace."""
        try:
            return netns.run_in(key, fn)
        except OSError as exc:
            raise kernel_error(exc, f"enter namespace {key}") from None

    def links(self, key: str) -> list[str]:
        """Names of the links inside a sandbox."""
        return self.run_in(key, netns.link_names)
