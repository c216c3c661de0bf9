"""The plugin client: one JSON POST per call over HTTP/1.1 (unix socket or TCP).

Owns the transport of spec/remote-protocol.md: `POST /<Subsystem>.<Method>` with a
JSON body (or an empty one), the engine's `Accept` header and no Content-Type, a
timeout on every socket operation (the engine has none: a plugin that hangs would hang
us too), retries with backoff while the plugin cannot be reached (1, 2, 4, 8, 16 s by
default, bounded), and the mapping of every failure to one PluginError naming the
plugin and the method: unreachable, no reply in time, connection closed, a reply that
is not a JSON object, a non-200 status (text from the body's "Err"), or a 200 reply
whose error field is set.

A call that reached the plugin is never retried: most methods are not idempotent
(RequestAddress, CreateEndpoint), so only failures to connect are.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import errors
from .discovery import PluginSpec

ACCEPT = "application/vnd.docker.plugins.v1.2+json"
DEFAULT_TIMEOUT = 30.0  # seconds per socket operation of one call
RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)  # the engine's backoff
MAX_REPLY = 16 << 20  # a reply larger than this is garbage, not data


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("plugin", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _tls_context(spec: PluginSpec) -> ssl.SSLContext:
    tls = spec.tls
    ctx = ssl.create_default_context(cafile=(tls.ca_file or None) if tls else None)
    if tls is not None:
        if tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    return ctx


def _error_text(raw: bytes) -> str:
    """A non-200 body's message: its "Err" (or "Error") when it is JSON, else the text."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("Err", "Error"):
            if isinstance(doc.get(key), str) and doc[key]:
                return doc[key]
    text = raw.decode("utf-8", "replace").strip()
    return text[:500] or "(empty body)"


class PluginClient:
    """Calls one plugin. Thread-safe: every call has its own connection."""

    def __init__(
        self,
        spec: PluginSpec,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if spec.scheme not in ("unix", "tcp", "http", "https"):
            raise errors.PluginError(spec.name, "discovery", f"unknown protocol in {spec.addr!r}")
        self.spec = spec
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        self._sleep = sleep

    @property
    def name(self) -> str:
        return self.spec.name

    def _new_connection(self) -> http.client.HTTPConnection:
        spec = self.spec
        if spec.scheme == "unix":
            return _UnixHTTPConnection(spec.socket_path, self.timeout)
        host, port = spec.host_port
        tls = spec.tls
        if spec.scheme == "https" or (tls is not None and (tls.ca_file or tls.cert_file)):
            return http.client.HTTPSConnection(
                host, port, timeout=self.timeout, context=_tls_context(spec)
            )
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _connect(self, method: str) -> http.client.HTTPConnection:
        """A connected connection; connection failures are retried with backoff."""
        attempt = 0
        while True:
            conn = self._new_connection()
            try:
                conn.connect()
                return conn
            except (OSError, ssl.SSLError) as exc:
                conn.close()
                if attempt >= len(self.retry_delays):
                    raise errors.PluginError(
                        self.name,
                        method,
                        f"cannot connect to {self.spec.addr} after {attempt + 1} attempts: {exc}",
                    ) from None
                self._sleep(self.retry_delays[attempt])
                attempt += 1

    def call(
        self,
        method: str,
        body: Mapping[str, Any] | None = None,
        *,
        error_key: str = "Err",
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        """POST /<method>; the reply object. `body` None sends an empty body.

        `error_key` is the reply field that carries a failure ("Err"; IPAM methods use
        "Error"). With `missing_ok` a 404 returns None instead of failing.
        """
        payload = b"" if body is None else json.dumps(body).encode()
        conn = self._connect(method)
        try:
            conn.request(
                "POST",
                f"/{method}",
                body=payload,
                headers={"Accept": ACCEPT, "Content-Length": str(len(payload))},
            )
            resp = conn.getresponse()
            raw = resp.read(MAX_REPLY + 1)
            status = resp.status
        except TimeoutError:
            raise errors.PluginError(
                self.name, method, f"no reply within {self.timeout:g}s (timed out)"
            ) from None
        except (http.client.HTTPException, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            raise errors.PluginError(
                self.name, method, f"connection closed without a reply: {detail}"
            ) from None
        finally:
            conn.close()
        if status != 200:
            if status == 404 and missing_ok:
                return None
            raise errors.PluginError(self.name, method, f"HTTP {status}: {_error_text(raw)}")
        if len(raw) > MAX_REPLY:
            raise errors.PluginError(self.name, method, f"reply larger than {MAX_REPLY} bytes")
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            shown = raw[:80].decode("utf-8", "replace")
            raise errors.PluginError(
                self.name, method, f"reply is not JSON ({exc}): {shown!r}"
            ) from None
        if not isinstance(reply, dict):
            raise errors.PluginError(
                self.name, method, f"reply is not a JSON object: {type(reply).__name__}"
            )
        failure = reply.get(error_key)
        if failure:
            raise errors.PluginError(self.name, method, str(failure))
        return reply

    def activate(self) -> list[str]:
        """The handshake: POST /Plugin.Activate -> the subsystems the plugin implements."""
        reply = self.call("Plugin.Activate") or {}
        implements = reply.get("Implements")
        if not isinstance(implements, list) or not all(isinstance(i, str) for i in implements):
            raise errors.PluginError(
                self.name, "Plugin.Activate", f"Implements must be a list of strings: {reply!r}"
            )
        return implements
