"""Network namespaces without processes: create, enter, delete.

Owns the libc calls that Python 3.11 lacks (setns, unshare, mount, umount2), bound with
cffi in ABI mode, and one long-lived worker thread that does all namespace switching.
Network namespaces are per thread in Linux, so the worker can unshare into a fresh
namespace, bind-mount it at a path (the sandbox key), and setns back home, while the
rest of the process never moves. No `ip`, no fork, no subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import cffi

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
NS_GET_NSTYPE = 0xB703

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
# SIOCSIFFLAGS for a loopback born just now: its flags are IFF_LOOPBACK alone, so one
# ioctl sets IFF_UP without reading them first.
_LO_UP_REQUEST = struct.pack("16sH22x", b"lo", _IFF_LOOPBACK | _IFF_UP)

_ffi = cffi.FFI()
_ffi.cdef(
    """
    int setns(int fd, int nstype);
    int unshare(int flags);
    int mount(const char *source, const char *target, const char *filesystemtype,
              unsigned long mountflags, const void *data);
    int umount2(const char *target, int flags);
    """
)
_libc = _ffi.dlopen(None)

T = TypeVar("T")


def _check(rc: int, what: str, path: str | None = None) -> None:
    if rc != 0:
        err = _ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace behind `fd`."""
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    """Give the calling thread (process, for CLONE_NEWNS) new namespaces."""
    _check(_libc.unshare(flags), "unshare")


def mount(
    source: str, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    src = source.encode()
    tgt = target.encode()
    fs = fstype.encode() if fstype else _ffi.NULL
    dat = data.encode() if data else _ffi.NULL
    _check(_libc.mount(src, tgt, fs, flags, dat), "mount", target)


def umount(target: str, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount", target)


def is_netns(path: str) -> bool:
    """True when `path` is a bind-mounted (or /proc) network namespace handle."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


def _set_link_up(name: str) -> None:
    """Set IFF_UP on a link of the calling thread's namespace (used for loopback).

    The interface ioctls work on any socket; an AF_UNIX one is the cheapest to make in a
    namespace that has just been born.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(
                s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | _IFF_UP)
            )


def loopback_up(fd: int) -> None:
    """Bring up the loopback of a namespace created just now (whose loopback was never
    touched), with one SIOCSIFFLAGS ioctl on `fd`: any socket opened inside it, e.g. the
    netlink socket a `prepare` opens there anyway."""
    fcntl.ioctl(fd, _SIOCSIFFLAGS, _LO_UP_REQUEST)


class NamespaceWorker:
    """One thread that runs work inside other network namespaces and always comes home.

    If the thread ever fails to return to its home namespace it stops accepting work, so
    nothing is silently done in the wrong namespace.
    """

    def __init__(self, name: str = "cnm-netns") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._home_fd = -1
        self._depth = 0
        self._broken: BaseException | None = None
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self._thread.start()
        ready.result()

    def _run(self, ready: Future[None]) -> None:
        try:
            self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, fut = job
            if self._broken is not None:
                fut.set_exception(RuntimeError(f"namespace worker is broken: {self._broken}"))
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
        os.close(self._home_fd)

    @contextlib.contextmanager
    def _away(self) -> Iterator[None]:
        """Switch namespaces inside; afterwards come back to where the thread was.

        That is home for a top-level job, or the outer job's namespace for a nested one
        (work run inside a namespace may itself call run_in or create).
        """
        nested = self._depth > 0
        back = (
            os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            if nested
            else (self._home_fd)
        )
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            try:
                setns(back)
            except OSError as exc:
                self._broken = exc
                raise
            finally:
                if nested:
                    os.close(back)

    def submit(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit_async(fn).result()

    def submit_async(self, fn: Callable[[], T]) -> Future[T]:
        """Queue `fn` for the worker thread; its future (from the worker thread itself,
        run at once)."""
        fut: Future[T] = Future()
        if threading.current_thread() is self._thread:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)
            return fut
        self._jobs.put((fn, fut))
        return fut

    def create(
        self, path: str, prepare: Callable[[str], None] | None = None, *, loopback: bool = True
    ) -> None:
        """Create a new network namespace bind-mounted at `path`, loopback up.

        `prepare(path)`, if given, runs inside the new namespace before the worker comes
        home (sysctls, a socket opened there). With `loopback=False` the prepare brings
        loopback up itself (`loopback_up` on a socket it opens there anyway). `path` must
        not exist. On any failure nothing is left behind.
        """

        def job() -> None:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            os.close(fd)
            mounted = False
            try:
                with self._away():
                    unshare(CLONE_NEWNET)
                    mount("/proc/thread-self/ns/net", path, None, MS_BIND)
                    mounted = True
                    if loopback:
                        _set_link_up("lo")
                    if prepare is not None:
                        prepare(path)
            except BaseException:
                if mounted:
                    with contextlib.suppress(OSError):
                        umount(path)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise

        self.submit(job)

    def run_in(self, path: str, fn: Callable[[], T]) -> T:
        """Run `fn` in the worker thread while it is inside the namespace at `path`."""

        def job() -> T:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with self._away():
                    setns(fd)
                    os.close(fd)
                    fd = -1
                    return fn()
            finally:
                if fd >= 0:
                    os.close(fd)

        return self.submit(job)

    def create_many(
        self,
        paths: Sequence[str],
        prepare: Callable[[str], None] | None = None,
        *,
        loopback: bool = True,
    ) -> list[BaseException | None]:
        """Create many namespaces in one job (one thread hand-off in all); `prepare` and
        `loopback` as for `create`.

        Returns, per path, None or the error that path met; a failed path leaves nothing.
        """

        def job() -> list[BaseException | None]:
            out: list[BaseException | None] = []
            for path in paths:
                try:
                    self.create(path, prepare, loopback=loopback)
                    out.append(None)
                except OSError as exc:
                    out.append(exc)
            return out

        return self.submit(job)

    def each(self, fds: Sequence[int], fn: Callable[[int], T]) -> list[T | BaseException]:
        """Run fn(i) inside the namespace of fds[i], for every i, in one job.

        Each result is fn's return value or the exception it raised; one failing
        namespace does not stop the others. The worker comes home once, at the end.
        """

        def job() -> list[T | BaseException]:
            out: list[T | BaseException] = []
            with self._away():
                for i, fd in enumerate(fds):
                    try:
                        setns(fd)
                        out.append(fn(i))
                    except Exception as exc:
                        out.append(exc)
            return out

        return self.submit(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


_worker: NamespaceWorker | None = None
_second: NamespaceWorker | None = None  # shares big create_many calls with _worker
_worker_lock = threading.Lock()

# create_many splits this many namespaces or more over two workers, on a host with more
# than one CPU: most of a namespace's set-up (unshare) is kernel work outside the rtnl
# lock, and two threads make hundreds in about 0.65x the time of one.
PARALLEL_CREATE_MIN = 32


def _forget_worker_after_fork() -> None:
    # A forked child has the worker object but not its thread: start afresh on demand.
    global _worker, _second, _worker_lock
    _worker = None
    _second = None
    _worker_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_worker_after_fork)


def worker() -> NamespaceWorker:
    """The process's namespace worker, started on first use."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = NamespaceWorker()
        return _worker


def _second_worker() -> NamespaceWorker | None:
    """The worker that shares big create_many calls, started on first use; None on a
    host with one CPU."""
    global _second
    with _worker_lock:
        if _second is None and len(os.sched_getaffinity(0)) > 1:
            _second = NamespaceWorker("cnm-netns-2")
        return _second


def create(
    path: str, prepare: Callable[[str], None] | None = None, *, loopback: bool = True
) -> None:
    """Create a network namespace bind-mounted at `path` with loopback up (by `prepare`
    when `loopback=False`; see NamespaceWorker.create)."""
    worker().create(path, prepare, loopback=loopback)


def enter_throwaway_host() -> None:
    """Move the calling process, which must be single-threaded, into a new network
    namespace and a new private mount namespace with its own /run and /sys, loopback up.

    Everything made afterwards lives there and goes when the process exits; the host's
    links, routes, firewall and /run are never touched (used by `cnm bench` and tests).
    """
    unshare(CLONE_NEWNET | CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _set_link_up("lo")


def create_many(
    paths: Sequence[str], prepare: Callable[[str], None] | None = None, *, loopback: bool = True
) -> list[BaseException | None]:
    """Create many namespaces at once; per path None or its error (see NamespaceWorker).

    From PARALLEL_CREATE_MIN paths on (and more than one CPU), a second worker makes the
    second half at the same time: `prepare` runs in both threads."""
    first = worker()
    second = _second_worker() if len(paths) >= PARALLEL_CREATE_MIN else None
    if second is None or threading.current_thread() in (first._thread, second._thread):
        return first.create_many(paths, prepare, loopback=loopback)
    half = (len(paths) + 1) // 2
    rest = paths[half:]
    later = second.submit_async(lambda: second.create_many(rest, prepare, loopback=loopback))
    try:
        out = first.create_many(paths[:half], prepare, loopback=loopback)
    finally:
        later.exception()  # waits: no worker is still making namespaces after this call
    return out + later.result()


def each(fds: Sequence[int], fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run fn(i) inside the namespace of fds[i] for every i (see NamespaceWorker.each)."""
    return worker().each(fds, fn)


def delete(path: str) -> None:
    """Unmount and remove the namespace handle at `path`; missing is not an error.

    The kernel frees the namespace (and every device in it, in one batch) once nothing
    holds it any more.
    """
    try:
        umount(path)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def run_in(path: str, fn: Callable[[], T]) -> T:
    """Run `fn` inside the network namespace at `path` (in the worker thread)."""
    return worker().run_in(path, fn)


def link_names() -> list[str]:
    """Names of the links in the calling thread's namespace."""
    return [name for _, name in socket.if_nameindex()]


def link_is_up(name: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
    return bool(flags & _IFF_UP)
