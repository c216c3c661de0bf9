"""The embedded store: one SQLite file (WAL) per state_dir.

Owns the schema, its migrations, and every read and write of local state: networks,
endpoints, sandboxes, IPAM pools and addresses. Every mutation runs inside `tx()`, a
`BEGIN IMMEDIATE` transaction (a single-statement one, a join's confirmation, may run as a
transaction of its own, which takes the same write lock), so several processes on one
state_dir are serialised by SQLite's write lock and never hand out the same name or
address. What joins read is read in one statement (`join_reads`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

from .. import errors
from ..types import EndpointRecord, NetworkRecord, PoolData, SandboxRecord, new_id

SCHEMA_VERSION = 3
KEPT_SANDBOXES_MAX = 4096  # sandbox records kept between joins (see join_reads)

# Each entry upgrades the schema from (index) to (index + 1). Never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE networks (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        driver TEXT NOT NULL,
        scope TEXT NOT NULL,
        ipam_driver TEXT NOT NULL,
        data TEXT NOT NULL,
        state TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE endpoints (
        id TEXT PRIMARY KEY,
        network_id TEXT NOT NULL REFERENCES networks(id),
        name TEXT NOT NULL,
        ipv4 TEXT,
        ipv6 TEXT,
        mac TEXT NOT NULL,
        options TEXT NOT NULL,
        sandbox_id TEXT,
        state TEXT NOT NULL,
        join_state TEXT NOT NULL DEFAULT '',
        driver_data TEXT NOT NULL DEFAULT '{}',
        UNIQUE (network_id, name)
    );
    CREATE INDEX endpoints_sandbox ON endpoints(sandbox_id);
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        container_id TEXT NOT NULL UNIQUE,
        key TEXT NOT NULL,
        explicit INTEGER NOT NULL,
        data TEXT NOT NULL,
        state TEXT NOT NULL
    );
    CREATE TABLE ipam_pools (
        pool_id TEXT PRIMARY KEY,
        address_space TEXT NOT NULL,
        subnet TEXT NOT NULL,
        version INTEGER NOT NULL,
        net_lo BLOB NOT NULL,
        net_hi BLOB NOT NULL,
        range_lo BLOB NOT NULL,
        range_hi BLOB NOT NULL,
        cursor BLOB,
        refcount INTEGER NOT NULL
    );
    CREATE TABLE ipam_addresses (
        pool_id TEXT NOT NULL REFERENCES ipam_pools(pool_id),
        addr BLOB NOT NULL,
        kind TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (pool_id, addr)
    ) WITHOUT ROWID;
    """,
    # 2: which store instance wrote each record, so reconcile can tell a crashed
    # controller's intents from a live one's.
    """
    ALTER TABLE networks ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE endpoints ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE sandboxes ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    """,
    # 3: joined endpoints (joining, joined or leaving) counted per network by triggers, so
    # the port-limit check of every join reads one row instead of scanning the network's
    # endpoints (a cost that grew with the network).
    """
    CREATE TABLE joined_counts (
        network_id TEXT PRIMARY KEY,
        n INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO joined_counts (network_id, n)
        SELECT network_id, count(*) FROM endpoints WHERE join_state != '' GROUP BY network_id;
    CREATE TRIGGER endpoints_joined_insert AFTER INSERT ON endpoints
        WHEN new.join_state != ''
    BEGIN
        INSERT INTO joined_counts (network_id, n) VALUES (new.network_id, 1)
            ON CONFLICT(network_id) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER endpoints_joined_delete AFTER DELETE ON endpoints
        WHEN old.join_state != ''
    BEGIN
        UPDATE joined_counts SET n = n - 1 WHERE network_id = old.network_id;
    END;
    CREATE TRIGGER endpoints_joined_update AFTER UPDATE OF join_state, network_id ON endpoints
        WHEN (old.join_state != '') != (new.join_state != '')
            OR old.network_id != new.network_id
    BEGIN
        UPDATE joined_counts SET n = n - 1
            WHERE network_id = old.network_id AND old.join_state != '';
        INSERT INTO joined_counts (network_id, n) SELECT new.network_id, 1
            WHERE new.join_state != ''
            ON CONFLICT(network_id) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER networks_joined_delete AFTER DELETE ON networks
    BEGIN
        DELETE FROM joined_counts WHERE network_id = old.id;
    END;
    """,
]


def _statements(script: str) -> Iterator[str]:
    """A migration's statements, one by one (a trigger body holds semicolons of its own,
    so pieces are joined until SQLite calls the statement complete)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\n;"):
        yield pending


# One encoder for every write (json.dumps with options builds a new one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def _c_encoder() -> Any:
    """_ENCODER's C encoder, made once (JSONEncoder.encode makes a new one per call:
    over half of what a join's driver data costs to encode); None without the C
    accelerator or if it does not encode as _ENCODER does. It does not check for
    circular references (stored values are plain trees of JSON types)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        # markers (None: no circular check), default, string encoder (ensure_ascii),
        # indent, key and item separators, sort_keys, skipkeys, allow_nan: as _ENCODER's.
        encode = make(
            None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",",
            True, False, True,
        )  # fmt: skip
        sample = {"b": [1, 2.5, None, True], "a": "\u00e9"}
        same = "".join(encode(sample, 0)) == _ENCODER.encode(sample)
    except TypeError:  # another signature than CPython 3.11-3.13's
        return None
    return encode if same else None


_C_ENCODE = _c_encoder()


def _json(value: Any) -> str:
    if _C_ENCODE is not None and not isinstance(value, str):
        return "".join(_C_ENCODE(value, 0))
    return _ENCODER.encode(value)


def _unchanged(row: Sequence[Any], rec: EndpointRecord) -> bool:
    """Whether an endpoint row (SQLiteStore._EP_COLS first) is what `rec` would parse
    from (owner aside); only empty options and driver data are compared, as stored JSON
    of others may not round-trip to the very same values."""
    return (
        row[0] == rec.id
        and row[1] == rec.name
        and row[2] == rec.network_id
        and row[3] == rec.ipv4_address
        and row[4] == rec.ipv6_address
        and row[5] == rec.mac_address
        and row[6] == "{}"
        and not rec.options
        and row[7] == rec.sandbox_id
        and row[8] == rec.state
        and row[9] == rec.join_state
        and row[10] == "{}"
        and not rec.driver_data
    )


# The endpoint columns join_reads compares with a known record in SQL, in parameter order.
_KNOWN_COLS = ("name", "network_id", "ipv4", "ipv6", "mac", "sandbox_id", "state", "join_state")


def _join_statements(
    endpoint: str, tails: dict[str | None, str], *, known: bool
) -> dict[str | None, str]:
    """join_reads's statement per target (`tails`: what follows the endpoint column).
    `known`: the endpoint column is NULL when the row is what a known record of empty
    options and driver data says: its _KNOWN_COLS are the parameters after the
    statement's own (the id is compared by the WHERE clause)."""
    out: dict[str | None, str] = {}
    for target, tail in tails.items():
        column = endpoint
        if known:
            first = 2 if target is None else 3
            same = " AND ".join(f"e.{c} IS ?{i}" for i, c in enumerate(_KNOWN_COLS, first))
            column = (
                f"CASE WHEN {same} AND e.options = '{{}}' AND e.driver_data = '{{}}'"
                f" THEN NULL ELSE {endpoint} END"
            )
        out[target] = f"SELECT {column}{tail}"
    return out


def _object(text: str) -> Any:
    """A stored JSON object (most endpoints' options and driver data are empty)."""
    return {} if text == "{}" else json.loads(text)


@contextlib.contextmanager
def _flocked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _upsert(cols: str) -> str:
    """Update in place on an id clash, so rows keep their rowid (creation order)."""
    names = [c.strip() for c in cols.split(",") if c.strip() != "id"]
    return "ON CONFLICT(id) DO UPDATE SET " + ", ".join(f"{n}=excluded.{n}" for n in names)


class SQLiteStore:
    """The local-scope store. Thread-safe; every mutation goes through `tx()`."""

    def __init__(self, state_dir: str, *, busy_timeout: float = 60.0) -> None:
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise errors.StoreError(f"cannot create state_dir {state_dir!r}: {exc}") from None
        self.path = os.path.join(state_dir, "state.db")
        self._owners_dir = os.path.join(state_dir, "owners")
        self._lock = threading.RLock()
        self._depth = 0
        # Network and sandbox records as of `_records_version` (see join_reads).
        self._records_version: int | None = None
        self._networks: dict[str, NetworkRecord] = {}
        self._sandboxes: dict[str, SandboxRecord] = {}
        self.owner, self._owner_fd = self._claim_owner()
        try:
            # Opening is serialised across processes: switching a new file to WAL does not
            # wait on SQLite's busy timeout, and first-open set-up must happen once.
            with _flocked(os.path.join(state_dir, "open.lock")):
                self._db = sqlite3.connect(
                    self.path,
                    timeout=busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
                if not mode or str(mode[0]).lower() != "wal":
                    raise errors.StoreError(f"store {self.path!r} cannot use WAL mode: {mode}")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
                self._records_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        except (sqlite3.Error, OSError) as exc:
            self._release_owner()
            raise errors.StoreError(f"cannot open store {self.path!r}: {exc}") from None
        except BaseException:
            self._release_owner()
            raise

    # --- owners: which live store instance wrote an intent --------------------------------

    def _claim_owner(self) -> tuple[str, int]:
        """A token for this instance, alive while we hold the flock on its file."""
        token = new_id()[:16]
        try:
            os.makedirs(self._owners_dir, mode=0o700, exist_ok=True)
            fd = os.open(
                os.path.join(self._owners_dir, token), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise errors.StoreError(f"cannot register in {self._owners_dir!r}: {exc}") from None
        return token, fd

    def owner_alive(self, token: str) -> bool:
        """True while the store instance that wrote `token` is open (in any process)."""
        if token == self.owner:
            return True
        if not token:
            return False
        try:
            fd = os.open(os.path.join(self._owners_dir, token), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def forget_dead_owners(self) -> None:
        """Remove the token files of instances that are gone (after their intents are repaired)."""
        for token in os.listdir(self._owners_dir):
            if not self.owner_alive(token):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._owners_dir, token))

    # --- plumbing ----------------------------------------------------------------------

    def _migrate(self) -> None:
        with self.tx():
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise errors.StoreError(
                    f"store {self.path} has schema version {version}; this cnm knows up to "
                    f"{SCHEMA_VERSION}: upgrade cnm"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[step]):
                    self._db.execute(statement)
            self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    @property
    def schema_version(self) -> int:
        return int(self.meta("schema_version") or 0)

    def tx(self) -> _Transaction:
        """One atomic transaction (nested calls join the outer one)."""
        return _Transaction(self)

    def execute(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            self._db.executemany(sql, rows)

    def fetchall(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def fetchone(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release_owner()

    def _release_owner(self) -> None:
        if self._owner_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._owners_dir, self.owner))
            os.close(self._owner_fd)
            self._owner_fd = -1

    def meta(self, key: str) -> str | None:
        row = self.fetchone("SELECT value FROM meta WHERE key=?", (key,))
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx():
            self.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # --- networks ----------------------------------------------------------------------

    _NET_COLS = "id, name, driver, scope, ipam_driver, data, state, created, owner"

    @staticmethod
    def _network(row: Sequence[Any]) -> NetworkRecord:
        data = json.loads(row[5])
        return NetworkRecord(
            id=row[0],
            name=row[1],
            driver=row[2],
            scope=row[3],
            ipam_driver=row[4],
            enable_ipv6=data["enable_ipv6"],
            internal=data["internal"],
            options=data["options"],
            labels=data["labels"],
            ipam_options=data["ipam_options"],
            ipv4=tuple(PoolData(**p) for p in data["ipv4"]),
            ipv6=tuple(PoolData(**p) for p in data["ipv6"]),
            state=row[6],
            created=row[7],
            owner=row[8],
        )

    def put_network(self, rec: NetworkRecord) -> None:
        data = {
            "enable_ipv6": rec.enable_ipv6,
            "internal": rec.internal,
            "options": rec.options,
            "labels": rec.labels,
            "ipam_options": rec.ipam_options,
            "ipv4": [asdict(p) for p in rec.ipv4],
            "ipv6": [asdict(p) for p in rec.ipv6],
        }
        with self.tx():
            self._networks.pop(rec.id, None)  # kept records: see join_reads
            self.execute(
                f"INSERT INTO networks ({self._NET_COLS}) VALUES (?,?,?,?,?,?,?,?,?) "
                f"{_upsert(self._NET_COLS)}",
                (
                    rec.id,
                    rec.name,
                    rec.driver,
                    rec.scope,
                    rec.ipam_driver,
                    _json(data),
                    rec.state,
                    rec.created,
                    self.owner,
                ),
            )

    def set_network_state(self, network_id: str, state: str) -> None:
        with self.tx():
            self._networks.pop(network_id, None)
            self.execute(
                "UPDATE networks SET state=?, owner=? WHERE id=?", (state, self.owner, network_id)
            )

    def delete_network(self, network_id: str) -> None:
        with self.tx():
            self._networks.pop(network_id, None)
            self.execute("DELETE FROM networks WHERE id=?", (network_id,))

    def network_by_id(self, network_id: str) -> NetworkRecord | None:
        row = self.fetchone(f"SELECT {self._NET_COLS} FROM networks WHERE id=?", (network_id,))
        return self._network(row) if row else None

    def network_by_name(self, name: str) -> NetworkRecord | None:
        row = self.fetchone(f"SELECT {self._NET_COLS} FROM networks WHERE name=?", (name,))
        return self._network(row) if row else None

    def networks_by_id_prefix(self, prefix: str) -> list[NetworkRecord]:
        rows = self.fetchall(
            f"SELECT {self._NET_COLS} FROM networks WHERE id >= ? AND id < ? ORDER BY id",
            (prefix, prefix + "g"),
        )
        return [self._network(r) for r in rows]

    def networks(self) -> list[NetworkRecord]:
        rows = self.fetchall(f"SELECT {self._NET_COLS} FROM networks ORDER BY created, name")
        return [self._network(r) for r in rows]

    # --- endpoints ---------------------------------------------------------------------

    _EP_COLS = (
        "id, name, network_id, ipv4, ipv6, mac, options, sandbox_id, state, join_state,"
        " driver_data, owner"
    )

    @staticmethod
    def _endpoint(row: Sequence[Any]) -> EndpointRecord:
        return EndpointRecord(
            id=row[0],
            name=row[1],
            network_id=row[2],
            ipv4_address=row[3],
            ipv6_address=row[4],
            mac_address=row[5],
            options=_object(row[6]),
            sandbox_id=row[7],
            state=row[8],
            join_state=row[9],
            driver_data=_object(row[10]),
            owner=row[11],
        )

    def _endpoint_row(self, rec: EndpointRecord) -> tuple[Any, ...]:
        return (
            rec.id,
            rec.name,
            rec.network_id,
            rec.ipv4_address,
            rec.ipv6_address,
            rec.mac_address,
            _json(rec.options),
            rec.sandbox_id,
            rec.state,
            rec.join_state,
            _json(rec.driver_data),
            self.owner,
        )

    def put_endpoints(self, recs: list[EndpointRecord]) -> None:
        with self.tx():
            self.executemany(
                f"INSERT INTO endpoints ({self._EP_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                f"{_upsert(self._EP_COLS)}",
                [self._endpoint_row(r) for r in recs],
            )

    def put_endpoint(self, rec: EndpointRecord) -> None:
        self.put_endpoints([rec])

    # A join's intent and its confirmation change two or three columns of rows that exist:
    # an UPDATE of just those (never the name or network of the unique index, and the
    # sandbox, indexed, only in the intent) dirties fewer pages than an upsert of the row,
    # and the WAL commit writes fewer frames.

    def put_join_intents(self, joins: list[tuple[str, str]]) -> None:
        """Mark existing endpoints (id, sandbox id) "joining" that sandbox: a join's intent."""
        self._update_rows(
            "UPDATE endpoints SET sandbox_id=?, join_state='joining', owner=? WHERE id=?",
            [(sandbox_id, self.owner, eid) for eid, sandbox_id in joins],
        )

    def put_join_results(self, joins: list[tuple[str, dict[str, object]]]) -> None:
        """Mark existing endpoints (id, driver data) "joined" the sandbox their intent
        recorded, with the driver data the join set up: a join's confirmation."""
        self._update_rows(
            "UPDATE endpoints SET join_state='joined', driver_data=?, owner=? WHERE id=?",
            [(_json(data), self.owner, eid) for eid, data in joins],
        )

    def put_joins(self, joins: list[tuple[str, str, dict[str, object]]]) -> None:
        """Mark existing endpoints (id, sandbox id, driver data) "joined" that sandbox in
        one write, without an intent before it: for joins whose kernel work ran inside
        the same transaction (a crash before the commit leaves only kernel objects that
        reconcile removes)."""
        self._update_rows(
            "UPDATE endpoints SET sandbox_id=?, join_state='joined', driver_data=?, owner=? "
            "WHERE id=?",
            [(sandbox_id, _json(data), self.owner, eid) for eid, sandbox_id, data in joins],
        )

    def _update_rows(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            if self._depth:  # part of this thread's open transaction (it holds the lock)
                if len(rows) == 1:  # a single join: no executemany iterator to set up
                    self._db.execute(sql, rows[0])
                else:
                    self._db.executemany(sql, rows)
                return
            if len(rows) == 1:
                # One statement outside a transaction is a transaction of its own: SQLite
                # takes the write lock for it at its start (waiting out another writer,
                # as BEGIN IMMEDIATE does) and commits it, without two more round trips.
                try:
                    self._db.execute(sql, rows[0])
                except sqlite3.Error as exc:
                    raise errors.StoreError(f"store {self.path}: {exc}") from None
                return
            with self.tx():
                self._db.executemany(sql, rows)

    def delete_endpoints(self, endpoint_ids: list[str]) -> None:
        with self.tx():
            self.executemany("DELETE FROM endpoints WHERE id=?", [(i,) for i in endpoint_ids])

    def endpoint_by_id(self, endpoint_id: str) -> EndpointRecord | None:
        row = self.fetchone(f"SELECT {self._EP_COLS} FROM endpoints WHERE id=?", (endpoint_id,))
        return self._endpoint(row) if row else None

    def endpoint_by_name(self, network_id: str, name: str) -> EndpointRecord | None:
        row = self.fetchone(
            f"SELECT {self._EP_COLS} FROM endpoints WHERE network_id=? AND name=?",
            (network_id, name),
        )
        return self._endpoint(row) if row else None

    def endpoints_by_id_prefix(self, network_id: str, prefix: str) -> list[EndpointRecord]:
        rows = self.fetchall(
            f"SELECT {self._EP_COLS} FROM endpoints WHERE network_id=? AND id >= ? AND id < ?",
            (network_id, prefix, prefix + "g"),
        )
        return [self._endpoint(r) for r in rows]

    def endpoints(
        self, network_id: str | None = None, *, sandbox_id: str | None = None
    ) -> list[EndpointRecord]:
        if sandbox_id is not None:
            rows = self.fetchall(
                f"SELECT {self._EP_COLS} FROM endpoints WHERE sandbox_id=? ORDER BY rowid",
                (sandbox_id,),
            )
        elif network_id is not None:
            rows = self.fetchall(
                f"SELECT {self._EP_COLS} FROM endpoints WHERE network_id=? ORDER BY rowid",
                (network_id,),
            )
        else:
            rows = self.fetchall(f"SELECT {self._EP_COLS} FROM endpoints ORDER BY rowid")
        return [self._endpoint(r) for r in rows]

    def endpoint_names(self, network_id: str) -> list[str]:
        rows = self.fetchall(
            "SELECT name FROM endpoints WHERE network_id=? ORDER BY rowid", (network_id,)
        )
        return [r[0] for r in rows]

    def count_joined(self, network_id: str) -> int:
        """Endpoints of a network joined to a sandbox (or joining, or leaving)."""
        row = self.fetchone("SELECT n FROM joined_counts WHERE network_id=?", (network_id,))
        return int(row[0]) if row else 0

    def count_endpoints(self, network_id: str | None = None) -> int:
        if network_id is None:
            row = self.fetchone("SELECT count(*) FROM endpoints")
        else:
            row = self.fetchone("SELECT count(*) FROM endpoints WHERE network_id=?", (network_id,))
        assert row is not None
        return int(row[0])

    # --- sandboxes ---------------------------------------------------------------------

    _SB_COLS = "id, container_id, key, explicit, data, state, owner"

    @staticmethod
    def _sandbox(row: Sequence[Any]) -> SandboxRecord:
        data = json.loads(row[4])
        return SandboxRecord(
            id=row[0],
            container_id=row[1],
            key=row[2],
            explicit=bool(row[3]),
            hostname=data["hostname"],
            dns=tuple(data["dns"]),
            dns_search=tuple(data["dns_search"]),
            extra_hosts=tuple(data["extra_hosts"]),
            state=row[5],
            owner=row[6],
        )

    def _sandbox_row(self, rec: SandboxRecord) -> tuple[Any, ...]:
        data = {
            "hostname": rec.hostname,
            "dns": list(rec.dns),
            "dns_search": list(rec.dns_search),
            "extra_hosts": list(rec.extra_hosts),
        }
        return (
            rec.id,
            rec.container_id,
            rec.key,
            int(rec.explicit),
            _json(data),
            rec.state,
            self.owner,
        )

    def put_sandboxes(self, recs: list[SandboxRecord]) -> None:
        rows = [self._sandbox_row(rec) for rec in recs]
        with self.tx():
            for rec in recs:
                self._sandboxes.pop(rec.id, None)
            self.executemany(
                f"INSERT INTO sandboxes ({self._SB_COLS}) VALUES (?,?,?,?,?,?,?) "
                f"{_upsert(self._SB_COLS)}",
                rows,
            )

    def put_sandbox(self, rec: SandboxRecord) -> None:
        with self._lock:
            self.put_sandboxes([rec])
            if rec.state == "ready" and not self._depth:
                # A sandbox made on its own (create_sandbox) is read next by a join: keep
                # its record as it now is in the store (written, committed, parsed from
                # the row as a read would), outside that join (see join_reads).
                self._keep_sandbox(self._sandbox(self._sandbox_row(rec)))

    def delete_sandboxes(self, sandbox_ids: list[str]) -> None:
        with self.tx():
            for sid in sandbox_ids:
                self._sandboxes.pop(sid, None)
            self.executemany("DELETE FROM sandboxes WHERE id=?", [(i,) for i in sandbox_ids])

    def sandbox_by_id(self, sandbox_id: str) -> SandboxRecord | None:
        row = self.fetchone(f"SELECT {self._SB_COLS} FROM sandboxes WHERE id=?", (sandbox_id,))
        return self._sandbox(row) if row else None

    def sandbox_by_container(self, container_id: str) -> SandboxRecord | None:
        row = self.fetchone(
            f"SELECT {self._SB_COLS} FROM sandboxes WHERE container_id=?", (container_id,)
        )
        return self._sandbox(row) if row else None

    def sandboxes_by_id_prefix(self, prefix: str) -> list[SandboxRecord]:
        rows = self.fetchall(
            f"SELECT {self._SB_COLS} FROM sandboxes WHERE id >= ? AND id < ?",
            (prefix, prefix + "g"),
        )
        return [self._sandbox(r) for r in rows]

    def sandboxes(self) -> list[SandboxRecord]:
        rows = self.fetchall(f"SELECT {self._SB_COLS} FROM sandboxes ORDER BY rowid")
        return [self._sandbox(r) for r in rows]

    # --- what a join reads: one statement, records known since kept --------------------
    #
    # A join checks its endpoint, the endpoint's network, the network's joined count (the
    # port limit) and the target sandbox with the endpoints already in it. One statement
    # reads what changes with every join (the endpoint, packed by SQLite into one JSON
    # array: the sqlite3 module hands over each column on its own, with the GIL released
    # and taken back around it; the count; the sandbox's endpoints) and the database's
    # data_version, which moves when another connection commits. Network and sandbox
    # records, which joins do not change, are kept while it stays put: this store's own
    # writes replace or drop what they change, a rollback drops them all.

    _JOIN_ENDPOINT = "json_array(" + ", ".join(f"e.{c.strip()}" for c in _EP_COLS.split(",")) + ")"
    _JOIN_COLS = ", c.n, (SELECT data_version FROM pragma_data_version)"
    _JOIN_FROM = " FROM endpoints e LEFT JOIN joined_counts c ON c.network_id = e.network_id"
    _PRESENT = (
        ", (SELECT json_group_array(json_array(x.network_id,"
        " json_extract(x.driver_data, '$.ifname'), json_extract(x.driver_data, '$.gateway')))"
        " FROM endpoints x WHERE x.sandbox_id = {sid})"
    )
    # What follows the endpoint column, per target: none, a sandbox id, a container id.
    _JOIN_TAILS: dict[str | None, str] = {
        None: _JOIN_COLS + _JOIN_FROM + " WHERE e.id = ?1",
        "id": _JOIN_COLS + ", ?2" + _PRESENT.format(sid="?2") + _JOIN_FROM + " WHERE e.id = ?1",
        "container_id": _JOIN_COLS
        + ", s.id"
        + _PRESENT.format(sid="s.id")
        + _JOIN_FROM
        + " LEFT JOIN sandboxes s ON s.container_id = ?2 WHERE e.id = ?1",
    }
    _JOIN_SQL = _join_statements(_JOIN_ENDPOINT, _JOIN_TAILS, known=False)
    # With a known record of empty options and driver data (the usual caller's), SQLite
    # compares the row with it (as _unchanged does) and sends NULL for the row when they
    # match: no JSON to parse.
    _JOIN_SQL_KNOWN = _join_statements(_JOIN_ENDPOINT, _JOIN_TAILS, known=True)

    def join_reads(
        self,
        endpoint_id: str,
        *,
        sandbox_id: str | None = None,
        container_id: str | None = None,
        known: EndpointRecord | None = None,
    ) -> JoinReads | None:
        """What a join of this endpoint checks (None when the endpoint does not exist);
        with `sandbox_id` or `container_id`, the target sandbox too. `known`: the record
        the caller holds (an Endpoint handle's), returned as is if the stored row still
        says the same (the owner aside, which is bookkeeping), instead of a parse.
        Called inside a transaction (the records it keeps are checked against it)."""
        if sandbox_id is not None:
            key: str | None = "id"
            args: tuple[str | None, ...] = (endpoint_id, sandbox_id)
        elif container_id is not None:
            key, args = "container_id", (endpoint_id, container_id)
        else:
            key, args = None, (endpoint_id,)
        sqls = self._JOIN_SQL
        if (
            known is not None
            and known.id == endpoint_id
            and not known.options
            and not known.driver_data
        ):
            sqls = self._JOIN_SQL_KNOWN
            args += (
                known.name,
                known.network_id,
                known.ipv4_address,
                known.ipv6_address,
                known.mac_address,
                known.sandbox_id,
                known.state,
                known.join_state,
            )
        with self._lock:
            row = self._db.execute(sqls[key], args).fetchone()
            if row is None:
                return None
            if row[2] != self._records_version:  # another connection wrote since
                self._forget_records()
                self._records_version = row[2]
            if row[0] is None:  # the row is what `known` says (_JOIN_SQL_KNOWN)
                assert known is not None
                ep_row, network_id = None, known.network_id
            else:
                ep_row = json.loads(row[0])
                network_id = ep_row[2]
            net = self._networks.get(network_id)
            if net is None:
                net = self.network_by_id(network_id)
                if net is not None:
                    self._networks[net.id] = net
            sb: SandboxRecord | None = None
            present: tuple[tuple[str, str, bool], ...] = ()
            if key is not None and row[3] is not None:
                sb = self._sandboxes.get(row[3])
                if sb is None:
                    sb = self.sandbox_by_id(row[3])
                    if sb is not None:
                        self._keep_sandbox(sb)
                if sb is not None and row[4] != "[]":
                    present = tuple((n, str(i), bool(g)) for n, i, g in json.loads(row[4]))
        if ep_row is None or (known is not None and _unchanged(ep_row, known)):
            assert known is not None
            ep = known
        else:
            ep = self._endpoint(ep_row)
        return JoinReads(ep, net, int(row[1] or 0), sb, present)

    def _keep_sandbox(self, rec: SandboxRecord) -> None:
        if len(self._sandboxes) >= KEPT_SANDBOXES_MAX:
            self._sandboxes.clear()
        self._sandboxes[rec.id] = rec

    def _forget_records(self) -> None:
        self._networks.clear()
        self._sandboxes.clear()


class JoinReads(NamedTuple):
    """What `SQLiteStore.join_reads` read for one join."""

    endpoint: EndpointRecord
    network: NetworkRecord | None
    joined: int  # endpoints of the network joining, joined or leaving (the port limit)
    sandbox: SandboxRecord | None  # the sandbox asked for: None if none (or not asked)
    # Per endpoint that names that sandbox (any join state): its network id, its
    # driver_data "ifname" (as str()), whether it is the sandbox's gateway endpoint.
    present: tuple[tuple[str, str, bool], ...]


class _Transaction:
    """`SQLiteStore.tx()`: BEGIN IMMEDIATE on entry (under the store's lock), COMMIT on a
    clean exit, ROLLBACK on an exception; a nested one joins the outer. A plain context
    manager rather than a generator: every join runs two of them."""

    __slots__ = ("_store",)

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        store = self._store
        store._lock.acquire()
        if store._depth:
            store._depth += 1
            return
        try:
            store._db.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            store._lock.release()
            if isinstance(exc, sqlite3.Error):
                raise errors.StoreError(f"store {store.path}: {exc}") from None
            raise
        store._depth = 1

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        store = self._store
        try:
            if store._depth > 1:
                store._depth -= 1
                return
            store._depth = 0
            if exc_type is not None:
                store._forget_records()  # some may have been read or written in it
                store._db.execute("ROLLBACK")
                return
            try:
                store._db.execute("COMMIT")
            except sqlite3.Error as exc:
                store._forget_records()
                store._db.execute("ROLLBACK")
                raise errors.StoreError(f"store {store.path}: commit failed: {exc}") from None
        finally:
            store._lock.release()
