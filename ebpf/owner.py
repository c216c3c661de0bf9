"""What every program owner shares: load an object once per host and pin it, or pick up
what an earlier owner pinned; attach and detach its programs; read per-CPU counters.

Pins live in <pin_root>/<object name>/: one file per map and per program, and `config`,
the frozen .rodata map holding the load-time globals the programs were loaded with. An
owner whose configuration matches the pinned one picks everything up without loading;
one whose configuration differs (or asked for `reload=True`) loads the programs again
and keeps the pinned maps, so their entries survive. Programs are pinned last: a program
pin means its maps were pinned before it.

Several processes may own the same pin root (a CLI, an agent and a plugin server on one
state directory): loading, picking up and unpinning happen under the root's `PinLock`,
so they all end up on the one pinned map. A process whose map was unpinned behind its
back (by `unpin` in another) notices with `ensure_current`, under the same lock, and
loads or picks up again before it writes entries.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, ClassVar

from cnm.ebpf import errors, loader
from cnm.ebpf.loader import BpfObject, Map, Program

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
CONFIG_PIN = "config"


def mac_bytes(mac: str | bytes | None, what: str = "mac") -> bytes:
    """A MAC as 6 bytes ("aa:bb:cc:dd:ee:ff" or bytes); None gives all zero."""
    if mac is None:
        return bytes(6)
    if isinstance(mac, bytes):
        if len(mac) != 6:
            raise errors.InvalidArgument(f"{what}: {len(mac)} bytes, a MAC has 6")
        return mac
    if not isinstance(mac, str) or not _MAC.match(mac):
        raise errors.InvalidArgument(f"{what}: {mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ipv4(value: object, what: str = "address") -> ipaddress.IPv4Address:
    try:
        addr = ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise errors.InvalidArgument(f"{what}: {value!r} is not an IPv4 address") from None
    if not isinstance(addr, ipaddress.IPv4Address):
        raise errors.InvalidArgument(f"{what}: {value!r} is not an IPv4 address")
    return addr


def positive_int(value: object, what: str, limit: int = 2**32 - 1, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= limit:
        raise errors.InvalidArgument(f"{what} must be an integer in {low}..{limit}, not {value!r}")
    return value


class ProgramOwner:
    """Base of the per-object owners (cnm.ebpf.redirect, cnm.ebpf.tunnel)."""

    object_name: ClassVar[str]
    program_names: ClassVar[tuple[str, ...]]
    map_layouts: ClassVar[dict[str, tuple[int, int]]]  # map -> (key size, value size)
    counter_names: ClassVar[tuple[str, ...]]
    counter_map: ClassVar[str]
    entry_maps: ClassVar[tuple[str, ...]]  # the maps whose size max_entries sets

    def __init__(
        self,
        pin_root: str | os.PathLike[str] = loader.DEFAULT_PIN_ROOT,
        *,
        obj_dir: str | os.PathLike[str] | None = None,
        max_entries: int | None = None,
    ) -> None:
        self.pin_root = os.fspath(pin_root)
        self.pin_dir = os.path.join(self.pin_root, self.object_name)
        self.obj_dir = obj_dir
        if max_entries is not None:
            positive_int(max_entries, "max_entries")
        self.max_entries = max_entries
        self.programs: dict[str, Program] = {}
        self.maps: dict[str, Map] = {}
        self.picked_up = False  # True when load() took an earlier owner's pins
        self.lock = loader.PinLock(self.pin_root)  # shared with every process on the root
        self._pin_ino: int | None = None  # the inode of the watched map's pin when loaded

    # -- configuration, set by each owner ---------------------------------------------

    def globals(self) -> dict[str, int]:
        """The load-time globals this owner wants (name -> value)."""
        return {}

    # -- load / pick up ----------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return bool(self.programs)

    def _pin(self, name: str) -> str:
        return os.path.join(self.pin_dir, name)

    def _open_object(self) -> BpfObject | None:
        try:
            path = loader.object_path(self.object_name, self.obj_dir)
        except errors.ObjectsNotBuilt:
            return None
        obj = BpfObject(path)
        try:
            for name, value in self.globals().items():
                obj.set_global(name, value)
            if self.max_entries is not None:
                for name in self.entry_maps:
                    obj.set_max_entries(name, self.max_entries)
        except BaseException:
            obj.close()
            raise
        return obj

    def _pinned_maps(self) -> dict[str, Map]:
        """The pinned maps whose layout this owner understands (others are left out)."""
        out = {}
        for name, (key_size, value_size) in self.map_layouts.items():
            if not os.path.exists(self._pin(name)):
                continue
            m = Map.from_pin(self._pin(name))
            # A counter map pinned by an older build may hold fewer counters.
            short = name == self.counter_map and m.max_entries < len(self.counter_names)
            if (m.key_size, m.value_size) == (key_size, value_size) and not short:
                out[name] = m
            else:
                m.close()
        return out

    def _all_pinned(self) -> bool:
        names = [*self.map_layouts, *self.program_names, CONFIG_PIN]
        return all(os.path.exists(self._pin(n)) for n in names)

    def load(self, *, reload: bool = False) -> None:
        """Load the programs (once per host) and pin them, or pick up the pinned ones."""
        if self.loaded:
            return
        loader.ensure_bpffs(self.pin_root)
        obj = self._open_object()
        try:
            with self.lock:
                os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
                if not reload and self._all_pinned():
                    maps = self._pinned_maps()
                    if len(maps) == len(self.map_layouts) and (
                        obj is None or self._pinned_config() == obj.rodata()
                    ):
                        self.maps = maps
                        self.programs = {
                            n: Program.from_pin(self._pin(n)) for n in self.program_names
                        }
                        self.picked_up = True
                        self._pin_ino = self._watched_pin()
                        return
                    for m in maps.values():
                        m.close()
                if obj is None:
                    loader.object_path(self.object_name, self.obj_dir)  # raises ObjectsNotBuilt
                    raise AssertionError("unreachable")
                self._load_new(obj)
                self._pin_ino = self._watched_pin()
        finally:
            if obj is not None:
                obj.close()

    def _watched_pin(self) -> int | None:
        """The inode of the first entry map's pin (None: not pinned): a new inode means
        the pins were removed (and maybe made again) since."""
        try:
            return os.stat(self._pin(self.entry_maps[0])).st_ino
        except FileNotFoundError:
            return None

    def ensure_current(self, *, load: bool = True) -> bool:
        """Hold the maps the pins hold: when another process removed the pins (and maybe
        loaded anew) since this one loaded, close the stale handles and load or pick up
        again. With load=False, pins that are gone are left gone (the stale maps are
        kept: they were empty when unpinned, a reader may use them). Call it under
        `self.lock`; True when it loaded or picked up again."""
        self._need_loaded()
        if not self.lock.held:
            raise errors.NotLoaded(f"{self.object_name}: ensure_current() needs the pin lock")
        ino = self._watched_pin()
        if ino is not None and ino == self._pin_ino:
            return False
        if ino is None and not load:
            return False
        if ino is not None:
            name = self.entry_maps[0]
            with Map.from_pin(self._pin(name)) as pinned:
                if pinned.id == self.maps[name].id:  # pinned again, the same map
                    self._pin_ino = ino
                    return False
        self.close()
        self.load()
        return True

    def _pinned_config(self) -> bytes | None:
        with Map.from_pin(self._pin(CONFIG_PIN)) as m:
            return m.lookup(bytes(4))

    def _load_new(self, obj: BpfObject) -> None:
        kept = self._pinned_maps()
        try:
            for name, m in kept.items():
                obj.reuse_map(name, m)
            obj.load()
        finally:
            for m in kept.values():
                m.close()
        maps = {name: obj.map(name) for name in self.map_layouts}
        programs = {name: obj.program(name) for name in self.program_names}
        with obj.rodata_map() as config:
            for name, m in maps.items():
                if name not in kept:  # a kept map is pinned already: its pin stays
                    m.pin(self._pin(name))  # (replacing a pinned map of another layout)
            config.pin(self._pin(CONFIG_PIN))
        for name, p in programs.items():
            p.pin(self._pin(name))
        self.maps, self.programs, self.picked_up = maps, programs, False

    def _need_loaded(self) -> None:
        if not self.loaded:
            raise errors.NotLoaded(f"{self.object_name}: call load() first")

    def map(self, name: str) -> Map:
        self._need_loaded()
        return self.maps[name]

    def program(self, name: str) -> Program:
        self._need_loaded()
        return self.programs[name]

    # -- attach ------------------------------------------------------------------------

    def _attach(
        self, program: str, ifindex: int, netns: str | None, direction: str, *, tcx: bool = False
    ) -> None:
        loader.tc_attach(self.program(program), ifindex, direction, netns, tcx=tcx)

    def _attached(self, program: str, ifindex: int, netns: str | None, direction: str) -> bool:
        prog_id = loader.tc_query(ifindex, direction, netns)
        return prog_id is not None and prog_id == self.program(program).id

    def detach(self, ifindex: int, netns: str | None = None, direction: str = "ingress") -> bool:
        """Take cnm's program off the interface (works without load(): the kernel knows
        what is attached). False when nothing was attached."""
        return loader.tc_detach(ifindex, direction, netns)

    # -- counters ----------------------------------------------------------------------

    def counter_values(self) -> dict[str, int]:
        """Every counter, summed over the CPUs."""
        m = self.map(self.counter_map)
        out = {}
        for i, name in enumerate(self.counter_names):
            slots = m.lookup_percpu(i.to_bytes(4, "little")) or []
            out[name] = sum(int.from_bytes(s, "little") for s in slots)
        return out

    def reset_counters(self) -> None:
        m = self.map(self.counter_map)
        zero = bytes(m.slot * m.ncpus)
        for i in range(len(self.counter_names)):
            m.update(i.to_bytes(4, "little"), zero)

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Release this owner's handles; pins and attachments stay for the next owner."""
        for h in [*self.programs.values(), *self.maps.values()]:
            h.close()
        self.programs, self.maps = {}, {}

    def unpin(self) -> None:
        """Remove the pins (attached programs keep running until detached)."""
        if not os.path.isdir(self.pin_dir):
            return
        with self.lock:
            loader.unpin_dir(self.pin_dir)

    def __enter__(self) -> Any:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
