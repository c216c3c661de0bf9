"""Finding a plugin by name in the plugin directories, as Docker's engine does.

Owns the lookup order and the three file formats. In each directory, in the order
given: the unix socket `NAME.sock`, then `NAME/NAME.sock`; only when no directory
holds a socket, the spec files `NAME.spec` (one URL: `unix:///path.sock` or
`tcp://host:port`) and `NAME.json` (`{"Name", "Addr", "TLSConfig"}`), each also looked
for as `NAME/NAME.<ext>`. A file that exists but cannot be used is a PluginError (it
names the file); a name found nowhere is None.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .. import errors

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
SCHEMES = ("unix", "tcp", "http", "https")


@dataclass(frozen=True)
class TLSConfig:
    """`TLSConfig` of a `.json` spec file (Docker's tlsconfig.Options)."""

    insecure_skip_verify: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class PluginSpec:
    """Where a plugin listens: `addr` is a URL (unix:///path or tcp://host:port)."""

    name: str
    addr: str
    source: str  # the socket or spec file it was found through
    tls: TLSConfig | None = None

    @property
    def scheme(self) -> str:
        return urlsplit(self.addr).scheme

    @property
    def socket_path(self) -> str:
        """The unix socket's path (unix:// addresses only)."""
        parts = urlsplit(self.addr)
        return parts.netloc + parts.path

    @property
    def host_port(self) -> tuple[str, int]:
        """Host and port (tcp://, http://, https:// addresses only)."""
        parts = urlsplit(self.addr)
        if parts.hostname is None or parts.port is None:
            raise errors.PluginError(self.name, "discovery", f"{self.addr!r} needs a host and port")
        return parts.hostname, parts.port


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _check_addr(name: str, addr: object, source: str) -> str:
    if not isinstance(addr, str) or not addr.strip():
        raise errors.PluginError(name, "discovery", f"{source}: no plugin address")
    addr = addr.strip()
    parts = urlsplit(addr)
    if parts.scheme not in SCHEMES:
        raise errors.PluginError(
            name, "discovery", f"{source}: unknown protocol in {addr!r} (unix:// or tcp://)"
        )
    if parts.scheme == "unix" and not (parts.netloc + parts.path):
        raise errors.PluginError(name, "discovery", f"{source}: {addr!r} names no socket")
    if parts.scheme != "unix":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise errors.PluginError(name, "discovery", f"{source}: {addr!r} needs host:port")
    return addr


def _read(name: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.PluginError(name, "discovery", f"cannot read {path}: {exc}") from None


def _from_spec_file(name: str, path: str) -> PluginSpec:
    return PluginSpec(name, _check_addr(name, _read(name, path), path), path)


def _from_json_file(name: str, path: str) -> PluginSpec:
    try:
        doc = json.loads(_read(name, path))
    except ValueError as exc:
        raise errors.PluginError(name, "discovery", f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise errors.PluginError(name, "discovery", f"{path}: expected a JSON object")
    tls = None
    raw = doc.get("TLSConfig")
    if raw is not None:
        if not isinstance(raw, dict):
            raise errors.PluginError(name, "discovery", f"{path}: TLSConfig must be an object")
        values = {
            "insecure_skip_verify": raw.get("InsecureSkipVerify", False),
            "ca_file": raw.get("CAFile", ""),
            "cert_file": raw.get("CertFile", ""),
            "key_file": raw.get("KeyFile", ""),
        }
        if not isinstance(values["insecure_skip_verify"], bool) or not all(
            isinstance(values[k], str) for k in ("ca_file", "cert_file", "key_file")
        ):
            raise errors.PluginError(name, "discovery", f"{path}: malformed TLSConfig")
        tls = TLSConfig(**values)
    # The engine names the plugin after the file it was looked up by, whatever "Name" says.
    return PluginSpec(name, _check_addr(name, doc.get("Addr"), path), path, tls)


def find_spec(name: str, dirs: Sequence[str]) -> PluginSpec | None:
    """Where the plugin `name` listens, or None when no directory knows it."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return None
    for d in dirs:
        for path in (os.path.join(d, f"{name}.sock"), os.path.join(d, name, f"{name}.sock")):
            if _is_socket(path):
                return PluginSpec(name, f"unix://{os.path.abspath(path)}", path)
    for d in dirs:
        for ext, reader in ((".spec", _from_spec_file), (".json", _from_json_file)):
            for path in (os.path.join(d, name + ext), os.path.join(d, name, name + ext)):
                if os.path.isfile(path):
                    return reader(name, path)
    return None
