"""libbpf (libbpf.so.1) through cffi in ABI mode: objects, maps, programs, pins, TC hooks.

- `BpfObject`: an opened object file. Before load it is a spec (its programs, maps and
  load-time globals, read from the object's BTF); `set_global` / `set_max_entries` /
  `reuse_map` configure it; `load()` puts it into the kernel. A verifier rejection raises
  VerifierError carrying the verifier's log (a per-program log buffer).
- `Map` and `Program`: live kernel handles (file descriptors) that outlive the object;
  opened from an object, or from a pin with `Map.from_pin` / `Program.from_pin`.
- `ensure_bpffs`, `pin`, `unpin_dir`: cnm's directory on a bpf filesystem (mounted when
  absent), objects pinned with mode 0600. `PinLock`: the exclusive lock every process
  takes on a pin root before it loads, picks up or removes pins there.
- `tc_attach`, `tc_detach`, `tc_query`: a program on the clsact ingress/egress hook of an
  interface, in the calling namespace or in the one at a given path.

libbpf's own messages go to the `cnm.ebpf.libbpf` logger and are kept (per thread) so an
error can say what libbpf said. Nothing here imports cnm.control.
"""

from __future__ import annotations

import contextlib
import errno as E
import fcntl
import logging
import os
import platform
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cffi

from cnm.ebpf import errors

LIBBPF = "libbpf.so.1"
DEFAULT_PIN_ROOT = "/sys/fs/bpf/cnm"
BPFFS_DEFAULT_MOUNT = "/sys/fs/bpf"
OBJ_DIR = Path(__file__).resolve().parent  # ebpf/<name>.bpf.o, built by setup.py

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
# cnm's filter on a clsact hook: one fixed handle and priority, so attach replaces and
# detach finds exactly cnm's program and never another tool's.
TC_HANDLE = 0xC17
TC_PRIORITY = 0xC17
LOG_SIZE = 1 << 20  # verifier log buffer per program
# tcx (kernel 6.6+): the TC hooks without a qdisc or a classifier in between (see
# tc_attach for when cnm uses them; CNM_BPF_TCX=0 never); cnm's programs on a tcx hook
# are those whose name starts with PROGRAM_PREFIX.
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
PROGRAM_PREFIX = "cnm_"
_TCX_TYPES = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}

_CDEF = """
struct bpf_object; struct bpf_program; struct bpf_map; struct btf;
struct btf_type { uint32_t name_off; uint32_t info; uint32_t size_or_type; };
struct btf_var_secinfo { uint32_t type; uint32_t offset; uint32_t size; };
struct bpf_tc_hook { size_t sz; int ifindex; int attach_point; uint32_t parent; };
struct bpf_tc_opts {
    size_t sz; int prog_fd; uint32_t flags; uint32_t prog_id; uint32_t handle; uint32_t priority;
};

unsigned int libbpf_major_version(void);
unsigned int libbpf_minor_version(void);
typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *args);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
int libbpf_num_possible_cpus(void);
int libbpf_probe_bpf_prog_type(int prog_type, const void *opts);
int libbpf_probe_bpf_helper(int prog_type, int helper_id, const void *opts);

struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct btf *bpf_object__btf(const struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj,
                                             struct bpf_program *prog);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
const char *bpf_program__name(const struct bpf_program *prog);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_program__set_log_buf(struct bpf_program *prog, char *log_buf, size_t log_size);
int bpf_program__set_log_level(struct bpf_program *prog, uint32_t log_level);
const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
uint32_t bpf_map__key_size(const struct bpf_map *map);
uint32_t bpf_map__value_size(const struct bpf_map *map);
uint32_t bpf_map__max_entries(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, uint32_t max_entries);
bool bpf_map__is_internal(const struct bpf_map *map);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);
const void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);

int32_t btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
const struct btf_type *btf__type_by_id(const struct btf *btf, uint32_t id);
const char *btf__name_by_offset(const struct btf *btf, uint32_t offset);

int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_map_update_batch(int fd, const void *keys, const void *values, uint32_t *count,
                         const void *opts);
int bpf_map_delete_batch(int fd, const void *keys, uint32_t *count, const void *opts);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);

int bpf_tc_hook_create(struct bpf_tc_hook *hook);
int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_prog_attach(int prog_fd, int attachable_fd, int type, unsigned int flags);
int bpf_prog_detach2(int prog_fd, int attachable_fd, int type);
int bpf_prog_query(int target_fd, int type, uint32_t query_flags, uint32_t *attach_flags,
                   uint32_t *prog_ids, uint32_t *prog_cnt);
int bpf_prog_get_fd_by_id(uint32_t id);

int vsnprintf(char *str, size_t size, const char *format, void *ap);
"""

log = logging.getLogger("cnm.ebpf.libbpf")
T = TypeVar("T")

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_lib: Any = None
_libc: Any = None
_lib_lock = threading.Lock()
_local = threading.local()
_print_cb: Any = None  # the cffi callback must stay alive as long as libbpf may call it


def _on_libbpf_message(level: int, fmt: Any, args: Any) -> int:
    buf = _ffi.new("char[]", 1024)
    _libc.vsnprintf(buf, 1024, fmt, args)
    text = _ffi.string(buf).decode(errors="replace").rstrip("\n")
    log.debug("%s", text)
    sink = getattr(_local, "messages", None)
    if sink is not None:
        sink.append(text)
    return 0


def lib() -> Any:
    """The loaded libbpf (LibbpfUnavailable when it cannot be loaded)."""
    global _lib, _libc, _print_cb
    with _lib_lock:
        if _lib is None:
            try:
                handle = _ffi.dlopen(LIBBPF)
            except OSError as exc:
                raise errors.LibbpfUnavailable(f"cannot load {LIBBPF}: {exc}") from exc
            _libc = _ffi.dlopen(None)
            # va_list reaches a callback as a pointer on these ABIs (a decayed array on
            # x86-64, a by-reference composite on aarch64); elsewhere libbpf keeps its own
            # printer.
            if platform.machine() in ("x86_64", "aarch64"):
                _print_cb = _ffi.callback("libbpf_print_fn_t", _on_libbpf_message)
                handle.libbpf_set_print(_print_cb)
            _lib = handle
        return _lib


def libbpf_version() -> str:
    b = lib()
    return f"{b.libbpf_major_version()}.{b.libbpf_minor_version()}"


@contextlib.contextmanager
def _captured() -> Iterator[list[str]]:
    """libbpf's messages printed by this thread inside the block."""
    outer = getattr(_local, "messages", None)
    _local.messages = messages = []
    try:
        yield messages
    finally:
        _local.messages = outer
        if outer is not None:
            outer.extend(messages)


def _errno_of(rc: int) -> int:
    # libbpf 1.x returns -errno (and sets errno); pointer-returning calls only set errno.
    return -rc if rc < 0 else (_ffi.errno or E.EIO)


def num_possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n <= 0:
        raise errors.EbpfError("cannot read the number of possible CPUs", errno=-n)
    return n


# --- live handles ------------------------------------------------------------------------


def _obj_info(fd: int, size: int, what: str) -> bytes:
    """The first `size` bytes of bpf_prog_info / bpf_map_info for the object behind fd."""
    buf = _ffi.new("char[]", size)
    n = _ffi.new("uint32_t *", size)
    rc = lib().bpf_obj_get_info_by_fd(fd, buf, n)
    if rc < 0:
        raise errors.EbpfError(f"cannot read info of {what}", errno=-rc)
    return bytes(_ffi.buffer(buf, size))


def _close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Handle:
    """A kernel object reached through a file descriptor this handle owns."""

    kind = "object"

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def close(self) -> None:
        _close_fd(self.fd)
        self.fd = -1

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin under a bpffs directory with mode 0600; an existing pin is replaced."""
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        rc = lib().bpf_obj_pin(self.fd, path.encode())
        if rc < 0:
            raise errors.PinError(path, f"pin {self.kind} {self.name} at", _errno_of(rc))
        os.chmod(path, 0o600)

    @staticmethod
    def _get_pinned(path: str | os.PathLike[str]) -> int:
        path = os.fspath(path)
        fd = lib().bpf_obj_get(path.encode())
        if fd < 0:
            raise errors.PinError(path, "open pinned object", _errno_of(fd))
        return fd

    def _info(self, size: int) -> bytes:
        return _obj_info(self.fd, size, f"{self.kind} {self.name}")


class Program(_Handle):
    """A loaded BPF program."""

    kind = "program"

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str]) -> Program:
        fd = cls._get_pinned(path)
        # Named by the pin: the kernel keeps only the first 15 characters of a name.
        return cls(fd, os.path.basename(os.fspath(path)))

    @property
    def id(self) -> int:
        return struct.unpack_from("<I", self._info(80), 4)[0]


class Map(_Handle):
    """A BPF map: keys and values are bytes of the map's sizes."""

    kind = "map"

    def __init__(
        self, fd: int, name: str, map_type: int, key_size: int, value_size: int, max_entries: int
    ) -> None:
        super().__init__(fd, name)
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.percpu = map_type in _PERCPU_TYPES
        # A per-CPU value is one slot, rounded up to 8 bytes, per possible CPU.
        self.ncpus = num_possible_cpus() if self.percpu else 1
        self.slot = (value_size + 7) // 8 * 8 if self.percpu else value_size
        self._vbuf = _ffi.new("char[]", self.slot * self.ncpus)

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str]) -> Map:
        fd = cls._get_pinned(path)
        try:
            info = _obj_info(fd, 40, f"map {path}")
        except BaseException:
            _close_fd(fd)
            raise
        map_type, _id, key_size, value_size, max_entries = struct.unpack_from("<5I", info)
        name = os.path.basename(os.fspath(path))
        return cls(fd, name, map_type, key_size, value_size, max_entries)

    @property
    def id(self) -> int:
        """The kernel's id of the map (equal ids: the same map, whoever opened it)."""
        return struct.unpack_from("<I", self._info(40), 4)[0]

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise errors.InvalidArgument(
                f"map {self.name}: key is {len(key)} bytes, the map's keys are {self.key_size}"
            )
        return key

    def _value(self, value: bytes) -> bytes:
        want = self.slot * self.ncpus if self.percpu else self.value_size
        if len(value) != want:
            raise errors.InvalidArgument(
                f"map {self.name}: value is {len(value)} bytes, the map's values are {want}"
            )
        return value

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        rc = lib().bpf_map_update_elem(self.fd, self._key(key), self._value(value), flags)
        if rc < 0:
            raise errors.MapError(self.name, "update", -rc)

    def lookup(self, key: bytes) -> bytes | None:
        """The value (for a per-CPU map: every CPU's slot, concatenated), None when absent."""
        rc = lib().bpf_map_lookup_elem(self.fd, self._key(key), self._vbuf)
        if rc == -E.ENOENT:
            return None
        if rc < 0:
            raise errors.MapError(self.name, "lookup", -rc)
        return bytes(_ffi.buffer(self._vbuf, self.slot * self.ncpus))

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        raw = self.lookup(key)
        if raw is None:
            return None
        return [raw[i * self.slot : i * self.slot + self.value_size] for i in range(self.ncpus)]

    def delete(self, key: bytes) -> bool:
        """Remove one entry; False when it was not there."""
        rc = lib().bpf_map_delete_elem(self.fd, self._key(key))
        if rc == -E.ENOENT:
            return False
        if rc < 0:
            raise errors.MapError(self.name, "delete", -rc)
        return True

    def keys(self) -> Iterator[bytes]:
        cur = _ffi.NULL
        nxt = _ffi.new("char[]", self.key_size)
        while True:
            rc = lib().bpf_map_get_next_key(self.fd, cur, nxt)
            if rc == -E.ENOENT:
                return
            if rc < 0:
                raise errors.MapError(self.name, "next key", -rc)
            key = bytes(_ffi.buffer(nxt, self.key_size))
            yield key
            cur = _ffi.new("char[]", key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def update_batch(self, entries: list[tuple[bytes, bytes]], flags: int = BPF_ANY) -> None:
        """Many updates in one system call (one by one where the kernel lacks batches).
        Every key and value is checked before anything is written."""
        if not entries:
            return
        keys = b"".join(self._key(k) for k, _ in entries)
        values = b"".join(self._value(v) for _, v in entries)
        count = _ffi.new("uint32_t *", len(entries))
        opts = _ffi.new("uint64_t[3]", [24, flags, 0])  # bpf_map_batch_opts: sz, elem_flags, flags
        rc = lib().bpf_map_update_batch(self.fd, keys, values, count, opts)
        if rc in (-E.EINVAL, -E.ENOTSUP, -E.EOPNOTSUPP) and count[0] == 0:
            for k, v in entries:
                self.update(k, v, flags)
            return
        if rc < 0:
            raise errors.MapError(self.name, f"batch update ({count[0]} of {len(entries)})", -rc)

    def delete_batch(self, keys: list[bytes]) -> int:
        """Remove many entries; missing ones are skipped. Returns how many were removed."""
        for k in keys:
            self._key(k)
        return sum(self.delete(k) for k in keys)

    def clear(self) -> None:
        for key in list(self.keys()):
            self.delete(key)


# --- objects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalVar:
    """A load-time global (const volatile) in the object's .rodata."""

    name: str
    offset: int
    size: int


def object_path(name: str, obj_dir: str | os.PathLike[str] | None = None) -> Path:
    """The built object `<name>.bpf.o` (ObjectsNotBuilt when it is missing)."""
    path = Path(obj_dir or OBJ_DIR) / f"{name}.bpf.o"
    if not path.is_file():
        raise errors.ObjectsNotBuilt(str(path))
    return path


class BpfObject:
    """One BPF object file: a spec before load(), live programs and maps after."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise errors.ObjectsNotBuilt(self.path)
        b = lib()
        with _captured() as messages:
            obj = b.bpf_object__open_file(self.path.encode(), _ffi.NULL)
        if obj == _ffi.NULL:
            raise errors.ObjectError(self.path, _ffi.errno, "; ".join(messages[-3:]))
        self._obj = obj
        self.loaded = False
        self._programs: dict[str, Any] = {}
        prog = b.bpf_object__next_program(obj, _ffi.NULL)
        while prog != _ffi.NULL:
            self._programs[_ffi.string(b.bpf_program__name(prog)).decode()] = prog
            prog = b.bpf_object__next_program(obj, prog)
        self._maps: dict[str, Any] = {}
        self._rodata: Any = None
        m = b.bpf_object__next_map(obj, _ffi.NULL)
        while m != _ffi.NULL:
            name = _ffi.string(b.bpf_map__name(m)).decode()
            if b.bpf_map__is_internal(m):
                if name.endswith(".rodata"):
                    self._rodata = m
            else:
                self._maps[name] = m
            m = b.bpf_object__next_map(obj, m)
        self.globals = self._read_globals()

    def _read_globals(self) -> dict[str, GlobalVar]:
        b = lib()
        btf = b.bpf_object__btf(self._obj)
        if btf == _ffi.NULL or self._rodata is None:
            return {}
        sec_id = b.btf__find_by_name_kind(btf, b".rodata", BTF_KIND_DATASEC)
        if sec_id < 0:
            return {}
        sec = b.btf__type_by_id(btf, sec_id)
        vlen = sec.info & 0xFFFF
        infos = _ffi.cast("struct btf_var_secinfo *", sec + 1)
        out = {}
        for i in range(vlen):
            var = b.btf__type_by_id(btf, infos[i].type)
            if (var.info >> 24) & 0x1F != BTF_KIND_VAR:
                continue
            name = _ffi.string(b.btf__name_by_offset(btf, var.name_off)).decode()
            out[name] = GlobalVar(name, infos[i].offset, infos[i].size)
        return out

    @property
    def programs(self) -> tuple[str, ...]:
        return tuple(self._programs)

    @property
    def maps(self) -> tuple[str, ...]:
        return tuple(self._maps)

    def _need(self, loaded: bool) -> None:
        if self._obj is None:
            raise errors.NotLoaded(f"{self.path}: the object is closed")
        if self.loaded != loaded:
            state = "before" if not loaded else "after"
            raise errors.NotLoaded(f"{self.path}: only possible {state} load()")

    def _map(self, name: str) -> Any:
        try:
            return self._maps[name]
        except KeyError:
            raise errors.NotFound(f"{self.path} has no map {name!r}") from None

    def set_global(self, name: str, value: int | bytes) -> None:
        """Set a const volatile global before load (an int in the host's byte order)."""
        self._need(loaded=False)
        var = self.globals.get(name)
        if var is None:
            raise errors.NotFound(f"{self.path} has no load-time global {name!r}")
        if isinstance(value, int):
            try:
                data = value.to_bytes(var.size, sys.byteorder)
            except OverflowError:
                raise errors.InvalidArgument(
                    f"{name}: {value} does not fit in {var.size} bytes"
                ) from None
        else:
            data = bytes(value)
            if len(data) != var.size:
                raise errors.InvalidArgument(f"{name}: {len(data)} bytes, it holds {var.size}")
        size = _ffi.new("size_t *")
        base = lib().bpf_map__initial_value(self._rodata, size)
        if base == _ffi.NULL or var.offset + var.size > size[0]:
            raise errors.EbpfError(f"{self.path}: .rodata is not writable before load")
        _ffi.memmove(_ffi.cast("char *", base) + var.offset, data, len(data))

    def get_global(self, name: str) -> bytes:
        var = self.globals.get(name)
        if var is None:
            raise errors.NotFound(f"{self.path} has no load-time global {name!r}")
        size = _ffi.new("size_t *")
        base = lib().bpf_map__initial_value(self._rodata, size)
        return bytes(_ffi.buffer(_ffi.cast("char *", base) + var.offset, var.size))

    def rodata(self) -> bytes:
        """Every load-time global as the object will load them (the .rodata image)."""
        if self._rodata is None:
            return b""
        size = _ffi.new("size_t *")
        base = lib().bpf_map__initial_value(self._rodata, size)
        return bytes(_ffi.buffer(base, size[0]))

    def set_max_entries(self, name: str, n: int) -> None:
        self._need(loaded=False)
        if n <= 0:
            raise errors.InvalidArgument(f"map {name}: max_entries must be positive, not {n}")
        rc = lib().bpf_map__set_max_entries(self._map(name), n)
        if rc < 0:
            raise errors.MapError(name, "set max_entries", -rc)

    def reuse_map(self, name: str, existing: Map) -> None:
        """Load with an existing map (e.g. a pinned one) instead of a new one."""
        self._need(loaded=False)
        rc = lib().bpf_map__reuse_fd(self._map(name), existing.fd)
        if rc < 0:
            raise errors.MapError(name, "reuse", -rc)

    def load(self) -> None:
        """Create the maps and load every program; VerifierError holds the verifier's log."""
        self._need(loaded=False)
        b = lib()
        logs = {}
        for name, prog in self._programs.items():
            buf = _ffi.new("char[]", LOG_SIZE)
            b.bpf_program__set_log_buf(prog, buf, LOG_SIZE)
            # Level 0: no log on success; libbpf retries a failed load at level 1 into buf.
            b.bpf_program__set_log_level(prog, 0)
            logs[name] = buf
        with _captured() as messages:
            rc = b.bpf_object__load(self._obj)
        for prog in self._programs.values():
            b.bpf_program__set_log_buf(prog, _ffi.NULL, 0)
        if rc < 0:
            err = -rc
            for name, buf in logs.items():
                text = _ffi.string(buf).decode(errors="replace")
                if text:
                    raise errors.VerifierError(self.path, name, err, text)
            raise errors.LoadError(self.path, err, "; ".join(messages[-3:]))
        self.loaded = True

    def program(self, name: str) -> Program:
        """A handle (its own fd) on one loaded program."""
        self._need(loaded=True)
        try:
            prog = self._programs[name]
        except KeyError:
            raise errors.NotFound(f"{self.path} has no program {name!r}") from None
        return Program(os.dup(lib().bpf_program__fd(prog)), name)

    def map(self, name: str) -> Map:
        """A handle (its own fd) on one created map."""
        self._need(loaded=True)
        b = lib()
        m = self._map(name)
        return Map(
            os.dup(b.bpf_map__fd(m)),
            name,
            b.bpf_map__type(m),
            b.bpf_map__key_size(m),
            b.bpf_map__value_size(m),
            b.bpf_map__max_entries(m),
        )

    def rodata_map(self) -> Map:
        """The loaded (frozen) .rodata map: the globals the programs were loaded with."""
        self._need(loaded=True)
        if self._rodata is None:
            raise errors.NotFound(f"{self.path} has no load-time globals")
        b = lib()
        m = self._rodata
        return Map(
            os.dup(b.bpf_map__fd(m)),
            "rodata",
            b.bpf_map__type(m),
            b.bpf_map__key_size(m),
            b.bpf_map__value_size(m),
            1,
        )

    def close(self) -> None:
        """Release the object; handles taken from it, pins and attachments stay."""
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# --- bpffs -------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of this mount namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            out.append((point, right.split()[0]))
    return out


def _under(path: str, point: str) -> bool:
    return path == point or path.startswith(point.rstrip("/") + "/")


def fs_type(path: str) -> str | None:
    """The file system type that holds `path` (the innermost visible mount covering it).

    A later mount at P hides every earlier mount at or below P (e.g. a fresh sysfs on
    /sys hides a bpffs that was mounted on the old /sys/fs/bpf), so those are dropped."""
    real = os.path.realpath(path)
    # Only mounts covering `path` matter: one that does not cover it cannot hide one that
    # does (it would have to sit at or above it, and so cover `path` too).
    covering: list[tuple[str, str]] = []
    for point, fstype in _mounts():
        if _under(real, point):
            covering = [(p, t) for p, t in covering if not _under(p, point)]
            covering.append((point, fstype))
    best = max(covering, key=lambda c: len(c[0]), default=None)
    return best[1] if best else None


def ensure_bpffs(root: str | os.PathLike[str] = DEFAULT_PIN_ROOT) -> str:
    """Make `root` a directory (mode 0700) on a bpf file system, mounting one when absent:
    at /sys/fs/bpf for a root below it, otherwise at `root` itself."""
    from cnm.fastpath import netns  # the project's mount(2) binding

    root = os.path.realpath(os.fspath(root))
    existing = root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if fs_type(existing) != "bpf":
        below_default = root == BPFFS_DEFAULT_MOUNT or root.startswith(BPFFS_DEFAULT_MOUNT + "/")
        point = BPFFS_DEFAULT_MOUNT if below_default else root
        if fs_type(point) != "bpf":
            os.makedirs(point, mode=0o700, exist_ok=True)
            # Two processes must not both mount (the second mount would hide the first's
            # pins): the look and the mount happen under a lock on the directory.
            fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if fs_type(point) != "bpf":
                    netns.mount("bpf", point, "bpf", 0, "mode=0700")
            except OSError as exc:
                raise errors.PinError(point, "mount bpffs at", exc.errno) from exc
            finally:
                os.close(fd)
    os.makedirs(root, mode=0o700, exist_ok=True)
    if fs_type(root) != "bpf":
        raise errors.PinError(root, "use", None, "not on a bpf file system")
    os.chmod(root, 0o700)
    return root


class PinLock:
    """An exclusive `flock` on a pin root, held by one process (and one thread) at a time
    while it loads, picks up or removes the pins under it: without it, two processes on
    one state directory could both load and pin, and one would keep a map nobody else
    sees. A bpf file system holds no regular files, so the lock is on the directory
    itself; a root removed and made again while a process waited is locked anew.
    Re-entrant within one holder; released at the end of the outermost `with`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self._mutex = threading.RLock()
        self._fd = -1
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def __enter__(self) -> PinLock:
        self._mutex.acquire()
        try:
            if self._depth == 0:
                self._fd = self._lock()
            self._depth += 1
        except BaseException:
            self._mutex.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            _close_fd(self._fd)  # closing the descriptor drops the lock
            self._fd = -1
        self._mutex.release()

    def _lock(self) -> int:
        while True:
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                ensure_bpffs(self.root)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = os.fstat(fd)
                try:
                    now = os.stat(self.root)
                except FileNotFoundError:
                    now = None
            except OSError as exc:
                _close_fd(fd)
                raise errors.PinError(self.root, "lock", exc.errno) from exc
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            _close_fd(fd)  # the root went (and maybe came back) while this one waited


def unpin_dir(path: str | os.PathLike[str]) -> None:
    """Remove a pin directory and the pins in it (the objects live on while in use)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


# --- TC ----------------------------------------------------------------------------------

_DIRECTIONS = {"ingress": BPF_TC_INGRESS, "egress": BPF_TC_EGRESS}


def _in_netns(netns_path: str | None, fn: Callable[[], T]) -> T:
    if netns_path is None:
        return fn()
    from cnm.fastpath import netns

    return netns.run_in(netns_path, fn)


def _tc_args(ifindex: int, direction: str, priority: int = TC_PRIORITY) -> tuple[Any, Any]:
    if not isinstance(ifindex, int) or isinstance(ifindex, bool) or ifindex <= 0:
        raise errors.InvalidArgument(f"ifindex must be a positive integer, not {ifindex!r}")
    if direction not in _DIRECTIONS:
        raise errors.InvalidArgument(f"direction must be 'ingress' or 'egress', not {direction!r}")
    hook = _ffi.new("struct bpf_tc_hook *")
    hook.sz = _ffi.sizeof("struct bpf_tc_hook")
    hook.ifindex = ifindex
    hook.attach_point = _DIRECTIONS[direction]
    opts = _ffi.new("struct bpf_tc_opts *")
    opts.sz = _ffi.sizeof("struct bpf_tc_opts")
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 < priority < 2**16:
        raise errors.InvalidArgument(f"priority must be an integer in 1..65535, not {priority!r}")
    opts.handle = TC_HANDLE
    opts.priority = priority
    return hook, opts


def tcx_available() -> bool:
    """Whether cnm attaches on the tcx hooks: the kernel has them (6.6+) and CNM_BPF_TCX
    is not "0"."""
    global _tcx
    if _tcx is None:
        release = os.uname().release.split("-")[0].split(".")
        try:
            version = (int(release[0]), int(release[1]))
        except (IndexError, ValueError):
            version = (0, 0)
        _tcx = version >= (6, 6) and os.environ.get("CNM_BPF_TCX", "1") != "0"
    return _tcx


_tcx: bool | None = None


def _tcx_ids(ifindex: int, kind: int) -> list[int]:
    """Ids of the programs on a tcx hook (this thread's namespace); [] when none."""
    b = lib()
    cnt = _ffi.new("uint32_t *", 64)
    ids = _ffi.new("uint32_t[]", 64)
    flags = _ffi.new("uint32_t *")
    with _captured():
        rc = b.bpf_prog_query(ifindex, kind, 0, flags, ids, cnt)
    if rc in (-E.ENOENT, -E.ENODEV, -E.EINVAL, -E.EOPNOTSUPP):
        return []
    if rc < 0:
        raise errors.AttachError("tcx query", ifindex, -rc)
    return [int(ids[i]) for i in range(min(int(cnt[0]), 64))]


def _cnm_programs(ids: list[int]) -> list[tuple[int, int]]:
    """(id, fd) of cnm's programs among `ids`; the caller closes the fds."""
    out = []
    for prog_id in ids:
        fd = lib().bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            continue
        try:
            name = _obj_info(fd, 80, "program")[64:80].split(b"\0", 1)[0].decode()
        except errors.EbpfError:
            name = ""
        if name.startswith(PROGRAM_PREFIX):
            out.append((prog_id, fd))
        else:
            _close_fd(fd)
    return out


def _prog_map_ids(fd: int) -> set[int]:
    """Ids of the maps the program behind fd uses (bpf_prog_info.map_ids)."""
    ids = _ffi.new("uint32_t[]", 64)
    buf = _ffi.new("char[]", 80)
    _ffi.cast("uint32_t *", buf + 52)[0] = 64  # nr_map_ids
    _ffi.cast("uint64_t *", buf + 56)[0] = int(_ffi.cast("uintptr_t", ids))  # map_ids
    n = _ffi.new("uint32_t *", 80)
    rc = lib().bpf_obj_get_info_by_fd(fd, buf, n)
    if rc < 0:
        raise errors.EbpfError("cannot read the maps of a program", errno=-rc)
    count = min(int(_ffi.cast("uint32_t *", buf + 52)[0]), 64)
    return {int(ids[i]) for i in range(count)}


def _tcx_detach_cnm(
    ifindex: int, kind: int, keep: int = 0, related: set[int] | None = None
) -> bool:
    """Take cnm's programs except the one with id `keep` off a tcx hook (this thread's
    namespace); with `related` (map ids) only those using one of these maps. Whether one
    was there."""
    found = False
    for prog_id, fd in _cnm_programs(_tcx_ids(ifindex, kind)):
        try:
            if prog_id == keep:
                continue
            if related is not None and not (_prog_map_ids(fd) & related):
                continue
            rc = lib().bpf_prog_detach2(fd, ifindex, kind)
            if rc < 0 and rc not in (-E.ENOENT, -E.ENODEV):
                raise errors.AttachError("tcx detach", ifindex, -rc)
            found = True
        finally:
            _close_fd(fd)
    return found


def tc_attach(
    program: Program,
    ifindex: int,
    direction: str = "ingress",
    netns: str | None = None,
    *,
    tcx: bool = False,
    shared: bool = False,
    priority: int = TC_PRIORITY,
) -> None:
    """Put `program` on the interface's TC hook, replacing cnm's previous program there:
    the clsact hook (made when missing) with cnm's handle and `priority`; with tcx=True
    the tcx hook when the kernel has it (tcx_available).

    shared=True (a hook several of cnm's owners use, each with its own maps): on tcx,
    only cnm's programs that use one of `program`'s maps (earlier loads of the same
    owner) are replaced, the others stay; on clsact each owner gives its own priority.

    tcx runs a program without the classifier layers (cheaper per packet), but the first
    program on a device costs an RCU grace period under the rtnl lock (~10 ms here), where
    a clsact qdisc and filter cost ~0.15 ms: tcx suits a device attached once (the
    tunnel's VXLAN device), clsact the container ports attached at every join."""
    hook, opts = _tc_args(ifindex, direction, priority)
    opts.prog_fd = program.fd
    opts.flags = BPF_TC_F_REPLACE
    b = lib()

    def job() -> None:
        if tcx and tcx_available():
            kind = _TCX_TYPES[direction]
            ours = program.id
            related = _prog_map_ids(program.fd) if shared else None
            _tcx_detach_cnm(ifindex, kind, keep=ours, related=related)
            if ours in _tcx_ids(ifindex, kind):
                return
            with _captured():
                rc = b.bpf_prog_attach(program.fd, ifindex, kind, 0)
            if rc < 0:
                raise errors.AttachError(
                    f"tcx attach {program.name} ({direction})", ifindex, -rc, netns
                )
            with _captured():  # a clsact filter of an earlier cnm would run second
                b.bpf_tc_detach(hook, opts)
            return
        with _captured():
            rc = b.bpf_tc_hook_create(hook)
        if rc < 0 and rc != -E.EEXIST:
            raise errors.AttachError("clsact hook create", ifindex, -rc, netns)
        with _captured():
            rc = b.bpf_tc_attach(hook, opts)
        if rc < 0:
            raise errors.AttachError(f"attach {program.name} ({direction})", ifindex, -rc, netns)

    _in_netns(netns, job)


def tc_detach(
    ifindex: int,
    direction: str = "ingress",
    netns: str | None = None,
    *,
    shared_with: Program | None = None,
    priority: int = TC_PRIORITY,
) -> bool:
    """Take cnm's programs off the interface (tcx hook and clsact filter); False when none
    was there (or no interface). shared_with (a hook shared by owners, see tc_attach):
    only the programs using one of its maps, and the clsact filter at `priority`."""
    hook, opts = _tc_args(ifindex, direction, priority)
    b = lib()

    def job() -> bool:
        related = _prog_map_ids(shared_with.fd) if shared_with is not None else None
        kind = _TCX_TYPES[direction]
        found = _tcx_detach_cnm(ifindex, kind, related=related) if tcx_available() else False
        with _captured():
            rc = b.bpf_tc_detach(hook, opts)
        if rc in (-E.ENOENT, -E.ENODEV, -E.EINVAL):
            return found
        if rc < 0:
            raise errors.AttachError(f"detach ({direction})", ifindex, -rc, netns)
        return True

    return _in_netns(netns, job)


def tc_attached(
    program: Program,
    ifindex: int,
    direction: str = "ingress",
    netns: str | None = None,
    *,
    priority: int = TC_PRIORITY,
) -> bool:
    """Whether `program` runs on the interface's hook: among the tcx hook's programs, or
    cnm's clsact filter at `priority`."""
    hook, opts = _tc_args(ifindex, direction, priority)
    ours = program.id
    b = lib()

    def job() -> bool:
        if tcx_available() and ours in _tcx_ids(ifindex, _TCX_TYPES[direction]):
            return True
        with _captured():
            rc = b.bpf_tc_query(hook, opts)
        if rc in (-E.ENOENT, -E.ENODEV, -E.EINVAL):
            return False
        if rc < 0:
            raise errors.AttachError(f"query ({direction})", ifindex, -rc, netns)
        return int(opts.prog_id) == ours

    return _in_netns(netns, job)


def tc_query(ifindex: int, direction: str = "ingress", netns: str | None = None) -> int | None:
    """The id of cnm's program on the interface (its tcx hook first, then its clsact
    filter), None when there is none."""
    hook, opts = _tc_args(ifindex, direction)
    b = lib()

    def job() -> int | None:
        if tcx_available():
            found = _cnm_programs(_tcx_ids(ifindex, _TCX_TYPES[direction]))
            for _, fd in found:
                _close_fd(fd)
            if found:
                return found[0][0]
        with _captured():
            rc = b.bpf_tc_query(hook, opts)
        if rc in (-E.ENOENT, -E.ENODEV, -E.EINVAL):
            return None
        if rc < 0:
            raise errors.AttachError(f"query ({direction})", ifindex, -rc, netns)
        return int(opts.prog_id)

    return _in_netns(netns, job)


# --- probes (used by cnm.ebpf.probe) -----------------------------------------------------


def probe_prog_type(prog_type: int) -> int:
    """1 supported, 0 not, <0 -errno (e.g. -EPERM without privilege)."""
    with _captured():
        return int(lib().libbpf_probe_bpf_prog_type(prog_type, _ffi.NULL))


def probe_helper(prog_type: int, helper_id: int) -> int:
    """1 supported, 0 not, <0 -errno."""
    with _captured():
        return int(lib().libbpf_probe_bpf_helper(prog_type, helper_id, _ffi.NULL))
