"""The global store: etcd (v3 API through its HTTP/JSON gateway) under one key prefix.

Owns the connection to etcd (several endpoints, failing over between them), records as
JSON under `<prefix>/`, compare-and-swap transactions (create-if-absent, update-if-
unchanged), ranges with the revision they were read at, and watches that resume from a
revision and report a lost connection instead of hanging on, so the caller can back off,
reconnect and resynchronise.

Client: `etcd3gw` (OpenStack's client for etcd's gRPC gateway): plain HTTP + JSON over
`requests`, so no generated protobuf code to fall out of step with the installed
protobuf/grpc (python-etcd3's last release predates protobuf 4), threads rather than
asyncio (aetcd), typed, and served by Debian 12's etcd 3.4 on `/v3/`. Its own watch helper
cannot tell a dropped stream from a quiet one, so watches here read the gateway's stream
themselves, through the client's session and URL.

A watch is also checked for liveness, since a silent partition (no FIN, no RST) would
otherwise leave it waiting for ever on a quiet stream: its TCP connection keeps alive
with short probes (TCP_KEEPIDLE = the liveness period, 3 probes 1 s apart, and
TCP_USER_TIMEOUT for unacknowledged data), so the kernel fails a connection that stopped
answering; and every liveness period a lightweight request (maintenance status) goes to
the same endpoint, so an etcd that still holds the connection but no longer answers
(hung, stopped) ends the watch too. Either way WatchLost is raised within about the
liveness period plus 3 s ($CNM_ETCD_LIVENESS, 5 s by default).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection

from .. import errors

_log = logging.getLogger(__name__)
_URL_RE = re.compile(r"etcd://(?P<hosts>[^/\s]+)(?P<prefix>/\S*)?\Z")
DEFAULT_PREFIX = "cnm"
API_PATH = "/v3/"  # etcd >= 3.4
LIVENESS = float(os.environ.get("CNM_ETCD_LIVENESS", "5"))
KEEPALIVE_PROBES = 3  # TCP keepalive probes, 1 s apart, after LIVENESS s of silence
MAX_TXN_OPS = 128  # etcd's default limit of operations in one transaction


@dataclass(frozen=True)
class EtcdURL:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str  # no leading or trailing "/"

    @classmethod
    def parse(cls, url: str) -> EtcdURL:
        """`etcd://host:port[,host:port]/prefix` (port 2379 when left out)."""
        m = _URL_RE.match(url) if isinstance(url, str) else None
        if m is None:
            raise errors.InvalidParameter(
                f"store must be 'etcd://host:port[,host:port]/prefix', not {url!r}"
            )
        endpoints = []
        for part in m.group("hosts").split(","):
            host, sep, port = part.rpartition(":")
            if not sep:
                host, port = part, "2379"
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise errors.InvalidParameter(f"store: bad etcd endpoint {part!r} in {url!r}")
            endpoints.append((host, int(port)))
        prefix = (m.group("prefix") or "").strip("/") or DEFAULT_PREFIX
        return cls(tuple(endpoints), prefix)


@dataclass(frozen=True)
class KV:
    key: str  # relative to the prefix
    value: Any  # decoded JSON
    mod_revision: int
    create_revision: int


@dataclass(frozen=True)
class Event:
    type: str  # "PUT" or "DELETE"
    key: str  # relative to the prefix
    value: Any  # decoded JSON; None for a delete
    revision: int


class WatchLost(Exception):
    """The watch stream ended or broke: reconnect, resynchronise, watch again."""


# --- transaction building blocks --------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    key: str
    # "CREATE" (create_revision), "MOD" (mod_revision), "VERSION": an int;
    # "VALUE": the record itself (any JSON value, compared as the bytes Put writes)
    target: str
    value: Any
    result: str = "EQUAL"

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "CREATE", 0)

    @staticmethod
    def unchanged(key: str, mod_revision: int) -> Compare:
        return Compare(key, "MOD", mod_revision)

    @staticmethod
    def equals(key: str, value: Any) -> Compare:
        """`key` holds exactly `value` (false when it is absent)."""
        return Compare(key, "VALUE", value)


@dataclass(frozen=True)
class Put:
    key: str
    value: Any


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


def _encode(value: Any) -> str:
    """A record as stored: one encoding for puts and value comparisons alike."""
    return json.dumps(value)


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(key: str) -> str:
    raw = bytearray(key.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


class EtcdStore:
    """Records under `<prefix>/` in etcd; every method raises GlobalStoreUnavailable when
    no endpoint answers."""

    def __init__(self, url: str, *, timeout: float = 2.0, liveness: float | None = None) -> None:
        self.url = EtcdURL.parse(url)
        self.prefix = self.url.prefix + "/"
        self.timeout = timeout
        self.liveness = LIVENESS if liveness is None else liveness
        if not self.liveness > 0:
            raise errors.InvalidParameter(f"etcd liveness period must be > 0, not {liveness}")
        self._clients = [
            Etcd3Client(host=h, port=p, timeout=timeout, api_path=API_PATH)
            for h, p in self.url.endpoints
        ]
        self._current = 0
        self._lock = threading.Lock()
        self._closed = False
        self._watches: set[_Closer] = set()

    def close(self) -> None:
        """End every watch (their readers return) and the sessions; from now on every
        call raises GlobalStoreUnavailable at once instead of reconnecting."""
        self._closed = True
        for closer in list(self._watches):
            closer.close()
        for c in self._clients:
            c.session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- plumbing -------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self.prefix + key

    def _rel(self, raw_key: str) -> str:
        key = _unb64(raw_key).decode()
        return key[len(self.prefix) :] if key.startswith(self.prefix) else key

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """One gateway call, failing over to the next endpoint when one does not answer."""
        last: Exception | None = None
        if self._closed:
            raise errors.GlobalStoreUnavailable("etcd: the store was closed")
        with self._lock:
            for attempt in range(len(self._clients)):
                idx = (self._current + attempt) % len(self._clients)
                client = self._clients[idx]
                try:
                    out = client.post(client.get_url(path), json=dict(body))
                except (ConnectionFailedError, ConnectionTimeoutError) as exc:
                    last = exc
                    continue
                except Etcd3Exception as exc:
                    raise errors.StoreError(f"etcd {path}: {exc}") from None
                self._current = idx
                return out
        host, port = self.url.endpoints[self._current]
        raise errors.GlobalStoreUnavailable(
            f"etcd at {host}:{port} does not answer ({type(last).__name__})"
        )

    @staticmethod
    def _kv(store: EtcdStore, raw: Mapping[str, Any]) -> KV:
        value = json.loads(_unb64(raw["value"])) if raw.get("value") else None
        return KV(
            key=store._rel(raw["key"]),
            value=value,
            mod_revision=int(raw.get("mod_revision", 0)),
            create_revision=int(raw.get("create_revision", 0)),
        )

    def _op(self, op: Op) -> dict[str, Any]:
        key = self._full(op.key)
        if isinstance(op, Put):
            return {"request_put": {"key": _b64(key), "value": _b64(_encode(op.value))}}
        if isinstance(op, Delete):
            req: dict[str, Any] = {"key": _b64(key)}
            if op.prefix:
                req["range_end"] = _range_end(key)
            return {"request_delete_range": req}
        req = {"key": _b64(key)}
        if op.prefix:
            req["range_end"] = _range_end(key)
        return {"request_range": req}

    # --- reads ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self._post("/maintenance/status", {})

    def get(self, key: str) -> KV | None:
        out = self._post("/kv/range", {"key": _b64(self._full(key))})
        kvs = out.get("kvs") or []
        return self._kv(self, kvs[0]) if kvs else None

    def range(self, prefix: str) -> tuple[list[KV], int]:
        """Every record under `prefix`, and the revision the read saw."""
        full = self._full(prefix)
        out = self._post("/kv/range", {"key": _b64(full), "range_end": _range_end(full)})
        kvs = [self._kv(self, kv) for kv in out.get("kvs") or []]
        return kvs, int(out["header"]["revision"])

    # --- writes ---------------------------------------------------------------------

    def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> tuple[bool, list[list[KV]]]:
        """An etcd transaction: (whether every comparison held, the Get results of the
        branch that ran, one list per Get)."""
        cmp = []
        for c in compare:
            entry = {"key": _b64(self._full(c.key)), "target": c.target, "result": c.result}
            if c.target == "VALUE":
                entry["value"] = _b64(_encode(c.value))
            else:
                field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version"}
                entry[field[c.target]] = str(c.value)
            cmp.append(entry)
        body = {
            "compare": cmp,
            "success": [self._op(o) for o in success],
            "failure": [self._op(o) for o in failure],
        }
        out = self._post("/kv/txn", body)
        gets: list[list[KV]] = []
        for resp in out.get("responses") or []:
            rng = resp.get("response_range")
            if rng is not None:
                gets.append([self._kv(self, kv) for kv in rng.get("kvs") or []])
        return bool(out.get("succeeded")), gets

    def put(self, key: str, value: Any) -> None:
        self.txn((), [Put(key, value)])

    def put_many(self, items: Mapping[str, Any], deletes: Sequence[str] = ()) -> None:
        """Many puts and deletes, in transactions of at most MAX_TXN_OPS operations (etcd
        refuses bigger ones by default: --max-txn-ops=128): one round trip each. Each
        key stands alone, so a batch needs no single revision."""
        ops: list[Op] = [Delete(k) for k in deletes]
        ops += [Put(k, v) for k, v in items.items()]
        for start in range(0, len(ops), MAX_TXN_OPS):
            self.txn((), ops[start : start + MAX_TXN_OPS])

    def create(self, key: str, value: Any) -> bool:
        """Put `key` only if it does not exist; False when it did."""
        ok, _ = self.txn([Compare.absent(key)], [Put(key, value)])
        return ok

    def delete(self, key: str, *, prefix: bool = False) -> None:
        self.txn((), [Delete(key, prefix)])

    # --- watches --------------------------------------------------------------------

    def watch(
        self, prefix: str, start_revision: int, stop: threading.Event
    ) -> Iterator[list[Event]]:
        """Batches of events under `prefix` from `start_revision` on, one batch per etcd
        revision group. Raises WatchLost when the stream breaks or etcd cancels it (e.g.
        the revision was compacted) or the store is closed; returns when `stop` is set
        (closing the stream)."""
        if self._closed:
            raise WatchLost("the store was closed")
        host, port = self.url.endpoints[self._current]
        client = Etcd3Client(host=host, port=port, timeout=self.timeout, api_path=API_PATH)
        client.session.mount("http://", _KeepAlive(self.liveness))
        probe = Etcd3Client(host=host, port=port, timeout=self.liveness, api_path=API_PATH)
        full = self._full(prefix)
        body = {
            "create_request": {
                "key": _b64(full),
                "range_end": _range_end(full),
                "start_revision": str(start_revision),
                "progress_notify": True,
            }
        }
        try:
            resp = client.session.post(
                client.get_url("/watch"), json=body, stream=True, timeout=(self.timeout, None)
            )
        except requests.RequestException as exc:
            client.session.close()
            probe.session.close()
            raise WatchLost(str(exc)) from None
        closer = _Closer(resp, client, probe, self.liveness, f"{host}:{port}")
        stopper = threading.Thread(target=closer.close_on, args=(stop,), daemon=True)
        stopper.start()
        self._watches.add(closer)
        if self._closed:  # closed while the watch was being made
            closer.close()
        try:
            if resp.status_code != 200:
                raise WatchLost(f"watch refused: {resp.status_code} {resp.text[:200]}")
            for line in resp.iter_lines(chunk_size=None):
                if stop.is_set():
                    return
                if not line.strip():
                    continue
                result = json.loads(line).get("result") or {}
                if result.get("canceled") or result.get("compact_revision"):
                    raise WatchLost(f"watch cancelled: {result.get('cancel_reason', 'compacted')}")
                events = []
                for ev in result.get("events") or []:
                    kv = ev["kv"]
                    kind = ev.get("type", "PUT")
                    value = json.loads(_unb64(kv["value"])) if kv.get("value") else None
                    events.append(
                        Event(kind, self._rel(kv["key"]), value, int(kv.get("mod_revision", 0)))
                    )
                if events:
                    yield events
        except (requests.RequestException, ValueError, OSError, AttributeError) as exc:
            if stop.is_set():
                return
            raise WatchLost(closer.reason or self._why_lost(exc)) from None
        finally:
            closer.close()
            self._watches.discard(closer)
        if not stop.is_set():
            raise WatchLost(closer.reason or self._why_lost(None))

    def _why_lost(self, exc: Exception | None) -> str:
        if self._closed:
            return "the store was closed"
        return str(exc) if exc is not None else "the watch stream ended"


class _KeepAlive(HTTPAdapter):
    """Connections that the kernel fails when the peer stops answering (silent
    partition): TCP keepalive after `liveness` s idle, and a user timeout."""

    def __init__(self, liveness: float) -> None:
        idle = max(1, round(liveness))
        self.socket_options = [
            *HTTPConnection.default_socket_options,
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle + KEEPALIVE_PROBES) * 1000),
        ]
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = self.socket_options
        super().init_poolmanager(*args, **kwargs)


class _Closer:
    """Closes a streaming response when asked, when `stop` is set (that unblocks the
    reader), or when the endpoint fails a liveness probe (then `reason` says so)."""

    def __init__(
        self,
        resp: requests.Response,
        client: Etcd3Client,
        probe: Etcd3Client,
        liveness: float,
        where: str,
    ) -> None:
        self.resp = resp
        self.client = client
        self.probe = probe
        self.liveness = liveness
        self.where = where
        self.reason: str | None = None
        self.done = threading.Event()

    def close_on(self, stop: threading.Event) -> None:
        next_probe = time.monotonic() + self.liveness
        while not self.done.is_set():
            if stop.wait(min(0.2, max(0.0, next_probe - time.monotonic()))):
                self.close()
                return
            if time.monotonic() < next_probe or self.done.is_set():
                continue
            try:
                self.probe.post(self.probe.get_url("/maintenance/status"), json={})
            except (Etcd3Exception, requests.RequestException) as exc:
                if self.done.is_set() or stop.is_set():
                    continue
                self.reason = (
                    f"etcd at {self.where} did not answer a liveness probe within "
                    f"{self.liveness:g} s ({type(exc).__name__})"
                )
                _log.warning("watch: %s", self.reason)
                self.close()
                return
            next_probe = time.monotonic() + self.liveness

    def close(self) -> None:
        if self.done.is_set():
            return
        self.done.set()
        try:
            raw = self.resp.raw
            fp = getattr(raw, "_fp", None)
            sock = getattr(getattr(getattr(fp, "fp", None), "raw", None), "_sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.resp.close()
        self.client.session.close()
        self.probe.session.close()
