"""Batched rtnetlink transport: one socket per network namespace, many requests per send.

Owns the NETLINK_ROUTE sockets (opened once per namespace by the namespace worker, no
process, then reused), batching, ACK collection, dumps, and the mapping of every kernel
error back to the request that caused it.

Batch semantics (what callers rely on to roll back exactly):
- Requests are sent in order, packed into as few sendmsg calls as the socket buffers
  allow (chunks of at most MAX_CHUNK_MESSAGES messages and MAX_CHUNK_BYTES bytes).
- The kernel handles a chunk synchronously inside sendmsg, one request after another,
  and does NOT stop at a failure: every request of the batch is attempted, in order.
- Only the last request of a chunk asks for an ACK; the kernel still answers every
  request that fails with an NLMSG_ERROR carrying its sequence number, so each failure is
  mapped back to its request, and every request without an error reply succeeded.
- `execute()` returns a BatchResult listing the failed requests (index -> NetlinkError
  with errno and the kernel's extended-ack text); all other requests were applied. A
  request that depends on a failed one (e.g. an address on a link that was not created)
  fails on its own and is listed too.
- If the receive buffer overflows (ENOBUFS), the kernel has applied the chunk but some
  replies were lost: BatchStateUnknown is raised and the caller must re-read the kernel.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import random
import resource
import socket
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from . import codec as _select_codec
from . import messages as m
from . import netns, rtnl
from .messages import Message

MAX_CHUNK_MESSAGES = 512
MAX_CHUNK_BYTES = 96 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
_RECV_SIZE = 1 << 20
_SIOCGIFINDEX = 0x8933


class NetlinkError(OSError):
    """The kernel refused a request: errno, the kernel's message, and which request."""

    def __init__(
        self,
        errno: int,
        message: str = "",
        *,
        index: int | None = None,
        request: Message | None = None,
    ) -> None:
        text = message or os.strerror(errno)
        super().__init__(errno, text)
        self.message = text
        self.index = index
        self.request = request

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        where = f" (request {self.index})" if self.index is not None else ""
        return f"{self.message} ({name}){where}"


class BatchStateUnknown(NetlinkError):
    """Replies were lost (ENOBUFS): the batch was applied, but which requests failed is
    unknown. Re-read the kernel's state before acting on it."""


@dataclass
class BatchResult:
    total: int
    errors: dict[int, NetlinkError] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def succeeded(self) -> list[int]:
        return [i for i in range(self.total) if i not in self.errors]

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[min(self.errors)]


class _Requests(Sequence[Message]):
    """The requests of a NeighBatch by batch-wide index, made only when one failed."""

    def __init__(self, batch: rtnl.NeighBatch, offset: int) -> None:
        self.batch, self.offset = batch, offset

    def __len__(self) -> int:
        return self.offset + len(self.batch)

    def __getitem__(self, index: int) -> Message:  # type: ignore[override]
        return self.batch.message(index - self.offset)


class _Lazy(Sequence[Message]):
    """Requests built on first use (only a failure names its request)."""

    def __init__(self, build: Callable[[], Sequence[Message]]) -> None:
        self._build = build
        self._built: Sequence[Message] | None = None

    def _all(self) -> Sequence[Message]:
        if self._built is None:
            self._built = self._build()
        return self._built

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, index: int) -> Message:  # type: ignore[override]
        return self._all()[index]


_local = threading.local()


def _recv_buffer() -> bytearray:
    """One receive buffer per thread, shared by all its sockets (allocated once)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(_RECV_SIZE)
    return buf


def _open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, m.NETLINK_ROUTE)
    try:
        sock.setsockopt(m.SOL_NETLINK, m.NETLINK_EXT_ACK, 1)
        sock.setsockopt(m.SOL_NETLINK, m.NETLINK_CAP_ACK, 1)
        for force, plain in (
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _extack(msg: Message) -> str:
    for a in msg.attrs:
        if a.type == m.NLMSGERR_ATTR_MSG and isinstance(a.value, str):
            return a.value
    return ""


_package = sys.modules[__package__]  # cnm.fastpath, read at call time (tests patch it)
_backends: dict[tuple[str | None, str | None, bool], tuple[str, ModuleType]] = {}


def _backend(requested: str | None) -> tuple[str, ModuleType]:
    """The backend and codec module of a request, resolved once per set of what decides
    it (the request, $CNM_FASTPATH when there is none, the native codec being built):
    sockets are opened one per sandbox."""
    key = (
        requested,
        None if requested else os.environ.get("CNM_FASTPATH"),
        _package.native_available(),
    )
    found = _backends.get(key)
    if found is None:
        name = _package.select_backend(requested)
        found = _backends[key] = (name, _select_codec(name))
    return found


class NetlinkSocket:
    """A NETLINK_ROUTE socket bound to one network namespace (thread-safe)."""

    def __init__(self, netns_path: str | None = None, *, backend: str | None = None) -> None:
        self.netns_path = netns_path
        self.backend, self.codec = _backend(backend)
        self._sock = (
            _open_socket() if netns_path is None else netns.run_in(netns_path, _open_socket)
        )
        self._seq = random.getrandbits(30) or 1
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:  # never under a batch another thread is sending
            self._sock.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def ifindex(self, name: str) -> int:
        """The index of the link `name` in this socket's namespace (SIOCGIFINDEX on the
        socket: no netlink round trip and no link message to decode). NetlinkError
        ENODEV when there is none."""
        raw = name.encode()
        if not raw or len(raw) > 15 or b"\0" in raw:  # the kernel would cut it to 15 bytes
            raise NetlinkError(_errno.ENODEV, f"no link {name!r}")
        try:
            reply = fcntl.ioctl(self._sock.fileno(), _SIOCGIFINDEX, struct.pack("16s24x", raw))
            return int(struct.unpack_from("16xi", reply)[0])
        except OSError as exc:
            raise NetlinkError(exc.errno or _errno.EIO, f"no link {name}") from None

    def _recv(self) -> list[Message]:
        rbuf = _recv_buffer()
        try:
            n = self._sock.recv_into(rbuf)
        except OSError as exc:
            if exc.errno == _errno.ENOBUFS:
                raise BatchStateUnknown(
                    _errno.ENOBUFS, "netlink replies were lost: re-read the kernel's state"
                ) from None
            raise
        return self.codec.decode(memoryview(rbuf)[:n])

    def execute(self, requests: Sequence[Message]) -> BatchResult:
        """Send a batch; returns which requests failed (see the module docstring)."""
        result = BatchResult(len(requests))
        if not requests:
            return result
        with self._lock:
            start = 0
            total = len(requests)
            while start < total:
                count = min(MAX_CHUNK_MESSAGES, total - start)
                while True:
                    first = self._seq if self._seq + count < 0x7FFFFFFF else 1
                    chunk = [
                        r._replace(
                            seq=first + k,
                            flags=r.flags
                            | m.NLM_F_REQUEST
                            | (m.NLM_F_ACK if k == count - 1 else 0),
                        )
                        for k, r in enumerate(requests[start : start + count])
                    ]
                    data = self.codec.encode(chunk)
                    if len(data) <= MAX_CHUNK_BYTES or count == 1:
                        break
                    count = max(1, count // 2)
                self._seq = first + count
                self._sock.send(data)
                self._collect(first, count, start, requests, result)
                start += count
        return result

    def execute_encoded(
        self,
        count: int,
        layout: Callable[[int], bytes],
        requests: Callable[[], Sequence[Message]],
    ) -> BatchResult:
        """Send `count` requests laid out by `layout(first sequence number)` as one chunk
        (numbered from there, the ACK asked on the last: what `execute` would send for
        them), with `execute`'s error mapping; `requests()` builds the Messages only to
        name a failed one. For a small batch encoded in one call (fastpath/attach.py)."""
        result = BatchResult(count)
        with self._lock:
            first = self._seq if self._seq + count < 0x7FFFFFFF else 1
            data = layout(first)
            self._seq = first + count
            self._sock.send(data)
            self._collect(first, count, 0, _Lazy(requests), result)
        return result

    def execute_neighbours(self, batches: Sequence[rtnl.NeighBatch]) -> BatchResult:
        """Send neighbour / FDB batches in order, as `execute` sends Messages (same chunks,
        same ACK on each chunk's last message, same error mapping), encoded in one pass
        per chunk. Request indices run across the batches, in order."""
        total = sum(len(b) for b in batches)
        result = BatchResult(total)
        if not total:
            return result
        with self._lock:
            offset = 0
            for batch in batches:
                template = batch.template()
                entries = batch.wire_entries()
                view = _Requests(batch, offset)
                start = 0
                while start < len(entries):
                    count = min(MAX_CHUNK_MESSAGES, len(entries) - start)
                    while True:
                        first = self._seq if self._seq + count < 0x7FFFFFFF else 1
                        data = self.codec.encode_neighbours(
                            template, entries[start : start + count], first, m.NLM_F_ACK
                        )
                        if len(data) <= MAX_CHUNK_BYTES or count == 1:
                            break
                        count = max(1, count // 2)
                    self._seq = first + count
                    self._sock.send(data)
                    self._collect(first, count, offset + start, view, result)
                    start += count
                offset += len(entries)
        return result

    def _collect(
        self, first: int, count: int, offset: int, requests: Sequence[Message], result: BatchResult
    ) -> None:
        last = first + count - 1
        while True:
            for reply in self._recv():
                k = reply.seq - first
                if not 0 <= k < count or reply.type != m.NLMSG_ERROR:
                    continue
                err = -reply.header[0]
                if err:
                    index = offset + k
                    result.errors[index] = NetlinkError(
                        err, _extack(reply), index=index, request=requests[index]
                    )
                if reply.seq == last:
                    return

    def get(self, msg: Message) -> Message:
        """A non-dump GET (e.g. one link by name): the kernel's answer, or NetlinkError."""
        with self._lock:
            seq = self._seq if self._seq < 0x7FFFFFFF else 1
            self._seq = seq + 1
            self._sock.send(self.codec.encode([msg._replace(seq=seq)]))
            while True:
                for reply in self._recv():
                    if reply.seq != seq:
                        continue
                    if reply.type == m.NLMSG_ERROR:
                        raise NetlinkError(
                            -reply.header[0] or _errno.EIO, _extack(reply), request=msg
                        )
                    return reply

    def request(self, msg: Message) -> None:
        """One request, ACKed; raises NetlinkError on failure."""
        self.execute([msg]).raise_first()

    def dump(self, msg: Message) -> list[Message]:
        """Send a dump request and gather every part of the answer."""
        with self._lock:
            seq = self._seq if self._seq < 0x7FFFFFFF else 1
            self._seq = seq + 1
            self._sock.send(self.codec.encode([msg._replace(seq=seq)]))
            out: list[Message] = []
            while True:
                for reply in self._recv():
                    if reply.seq != seq:
                        continue
                    if reply.type == m.NLMSG_DONE:
                        err = -reply.header[0]
                        if err > 0:  # the dump failed part-way
                            raise NetlinkError(err, _extack(reply), request=msg)
                        return out
                    if reply.type == m.NLMSG_ERROR:
                        err = -reply.header[0]
                        if err:
                            raise NetlinkError(err, _extack(reply), request=msg)
                        return out
                    out.append(reply)


# --- one socket per namespace, opened once ---------------------------------------------

# Cached sockets, least recently used first. Sockets of other namespaces (sandboxes) are
# evicted beyond a share of the file-descriptor limit; the caller's own never is.
_sockets: OrderedDict[tuple[str | None, int, int, str], NetlinkSocket] = OrderedDict()
_sockets_lock = threading.Lock()
FD_SHARE = 4  # at most RLIMIT_NOFILE // FD_SHARE cached sockets


def _identity(path: str | None) -> tuple[int, int]:
    st = os.stat(path if path is not None else "/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


def _cache_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    return max(16, soft // FD_SHARE)


_limit = 0  # _cache_limit() as last read; read again whenever the cache grows past it


def _remember(key: tuple[str | None, int, int, str], sock: NetlinkSocket) -> None:
    """Cache `sock` (lock held), evicting the least recently used sandbox sockets.

    The limit is read again only when the cache grows past the last one read (so a limit
    raised since is seen before anything is evicted), not on every socket.
    An evicted socket is only dropped from the cache, not closed: a thread may still be
    using it; it closes when its last user lets go of it (NetlinkSocket.__del__)."""
    global _limit
    _sockets[key] = sock
    if len(_sockets) <= _limit:
        return
    _limit = _cache_limit()
    excess = len(_sockets) - _limit
    if excess > 0:
        for old in [k for k in _sockets if k[0] is not None and k != key][:excess]:
            del _sockets[old]


def socket_for(netns_path: str | None = None, *, backend: str | None = None) -> NetlinkSocket:
    """The cached socket of a namespace (None: the caller's own), opened on first use.

    Keyed by the namespace's identity, so a path reused for a new namespace gets a new
    socket. Call `forget()` when deleting a namespace: a cached socket keeps it alive.
    """
    name = _backend(backend)[0]
    key = (netns_path, *_identity(netns_path), name)
    with _sockets_lock:
        sock = _sockets.get(key)
        if sock is not None:
            _sockets.move_to_end(key)
            return sock
    sock = NetlinkSocket(netns_path, backend=name)  # outside the lock: a worker hop
    with _sockets_lock:
        if key in _sockets:  # another thread was quicker
            sock.close()
            return _sockets[key]
        _remember(key, sock)
        return sock


def adopt_current(netns_path: str, *, backend: str | None = None) -> NetlinkSocket:
    """Open and cache the socket of `netns_path` from a thread that is inside that
    namespace now (the namespace worker, right after creating it): no extra hop."""
    name = _backend(backend)[0]
    sock = NetlinkSocket(None, backend=name)
    sock.netns_path = netns_path
    key = (netns_path, *_identity(netns_path), name)
    with _sockets_lock:
        stale = _sockets.pop(key, None)
        if stale is not None:
            stale.close()
        _remember(key, sock)
    return sock


def forget(netns_path: str) -> None:
    """Close the cached sockets of a namespace path (before or after deleting it)."""
    with _sockets_lock:
        for key in [k for k in _sockets if k[0] == netns_path]:
            _sockets.pop(key).close()


def _forget_all_after_fork() -> None:
    global _sockets_lock
    _sockets.clear()
    _sockets_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_all_after_fork)
