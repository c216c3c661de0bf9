"""The BPF data path through the controller: NetworkController(ebpf=...) with bridge
networks, in both datapaths (bridge ports, and routed host ends past the 1024-port limit).

Real containers (sandboxes made by the controller), real pings between them (cnm's
osl.ping, ICMP on a raw socket inside the sandbox), and the redirect program's own
per-CPU counters say which path carried them. Everything runs in the session's
throwaway namespaces; bpffs is mounted inside the session's private /sys.

Tests skip only when the probe says this kernel predates a feature the program needs.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control.doctor import doctor
from cnm.control.drivers.bridge import host_name
from cnm.control.osl.ping import ping
from cnm.ebpf import build, loader, probe
from cnm.ebpf.redirect import RedirectEndpoint, RedirectOwner
from tests.bpf_gate import require_bpf

from .oracles import ns_ping, ns_routes
from .test_bridge import remove_everything
from .test_ebpf import BAD_PROGRAM

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

ROUTED = {"com.cnm.bridge.datapath": "routed"}
NO_ICC = {"com.docker.network.bridge.enable_icc": "false"}
# The routed network's size: the default proves more than a bridge's 1024 ports.
ROUTED_CONTAINERS = int(os.environ.get("CNM_ROUTED_CONTAINERS", "4096"))


@pytest.fixture(scope="module", autouse=True)
def bpf_ready() -> probe.EbpfProbe:
    return require_bpf(("cnm_redirect",))


def _controller(dirs: tuple[str, str], ebpf: str) -> Iterator[NetworkController]:
    ctl = NetworkController(state_dir=dirs[0], run_dir=dirs[1], ebpf=ebpf)
    try:
        yield ctl
    finally:
        remove_everything(ctl)
        ctl.close()


@pytest.fixture
def on(dirs: tuple[str, str]) -> Iterator[NetworkController]:
    yield from _controller(dirs, "on")


@pytest.fixture
def off(dirs: tuple[str, str]) -> Iterator[NetworkController]:
    yield from _controller(dirs, "off")


@pytest.fixture
def ip_forward() -> Iterator[None]:
    path = "/proc/sys/net/ipv4/ip_forward"
    before = Path(path).read_text().strip()
    Path(path).write_text("1")
    yield
    Path(path).write_text(before)


def subnet(n: int, prefix: int = 24) -> list[IPAMConfig]:
    net = ipaddress.IPv4Network(f"10.{90 + n}.0.0/{prefix}")
    return [IPAMConfig(subnet=str(net), gateway=str(net.network_address + 1))]


def gateway(n: int) -> str:
    return f"10.{90 + n}.0.1"


def reaches(key: str, address: object, tries: int = 2) -> bool:
    for _ in range(tries):
        try:
            ping(key, ipaddress.ip_address(str(address).split("/")[0]), timeout=1.0)
            return True
        except errors.CNMError:
            continue
    return False


def containers(ctl: NetworkController, net, n: int, tag: str) -> list[tuple[object, str]]:
    eps = net.create_endpoints([f"{tag}{i}" for i in range(n)])
    keys = ctl.join_many([(ep, f"{tag}-c{i}") for i, ep in enumerate(eps)])
    return list(zip(eps, keys, strict=True))


def address(ep) -> str:
    return str(ep.ipv4_address.ip)


def ifindex(ep) -> int:
    return int(Path(f"/sys/class/net/{host_name(ep.id)}/ifindex").read_text())


# --- fast path on, policy kept ------------------------------------------------------------


def test_auto_attaches_off_the_join_path_and_the_fast_path_follows(
    dirs: tuple[str, str],
) -> None:
    """In "auto" the join returns once the map entry is in; the program reaches each host
    end from the attach thread, and then pings are redirected."""
    for ctl in _controller(dirs, "auto"):
        net = ctl.create_network("later", ipv4=subnet(7))
        (a, ka), (b, _) = containers(ctl, net, 2, "l")
        assert ctl.ebpf == "on"
        assert ctl._accel.flush(), "the deferred attaches finish"
        for ep in (a, b):
            assert loader.tc_query(ifindex(ep)) is not None
        before = ctl.ebpf_counters
        assert before is not None and before["endpoints"] == 2
        assert reaches(ka, address(b))
        after = ctl.ebpf_counters
        assert after is not None and after["redirected"] - before["redirected"] >= 2, after
        # A leave before its attach ran: the queued attach is dropped with the entry.
        ((c, _),) = containers(ctl, net, 1, "m")
        ctl.leave_many([(c, "m-c0")])
        assert ctl._accel.flush()
        assert ctl.ebpf_counters["endpoints"] == 2


# --- fast path on, policy kept ------------------------------------------------------------


@pytest.mark.parametrize("datapath", ["bridge", "routed"])
def test_pings_take_the_fast_path_and_doctor_shows_the_counters(
    on: NetworkController, dirs: tuple[str, str], datapath: str
) -> None:
    assert on.ebpf == "on" and on.ebpf_reason is None
    opts = ROUTED if datapath == "routed" else {}
    net = on.create_network("fast", ipv4=subnet(1), options=opts)
    joined = containers(on, net, 3, "f")
    (a, ka), (b, _), (c, _) = joined
    for ep in (a, b, c):
        assert loader.tc_query(ifindex(ep)) is not None, "the program is on every host end"
    if datapath == "routed":
        # Every container (the driver hands the same JoinInfo to each join of the
        # network) routes its subnet's two halves through the gateway.
        for _, key in joined:
            routes = {(r["dst"], r.get("gateway")) for r in ns_routes(key)}
            assert {("10.91.0.0/25", gateway(1)), ("10.91.0.128/25", gateway(1))} <= routes
    before = on.ebpf_counters
    assert before is not None and before["endpoints"] == 3
    for ep in (b, c):
        assert reaches(ka, address(ep))
    assert reaches(ka, gateway(1))  # the gateway: the kernel path
    after = on.ebpf_counters
    assert after is not None
    # Each echo request (a's port) and reply (b's, c's port) went container to container.
    assert after["redirected"] - before["redirected"] >= 4, after
    assert after["redirect_failed"] == 0 and after["passed"] >= before["passed"]

    report = doctor(dirs[0], dirs[1], "auto")
    shown = report.ebpf_datapath
    assert shown["in_use"] and shown["counters"]["redirected"] == after["redirected"]
    assert "redirected" in report.text() and report.to_dict()["ebpf_datapath"]["in_use"]

    on.leave_many([(a, "f-c0")])
    assert on.ebpf_counters["endpoints"] == 2  # type: ignore[index]


@pytest.mark.parametrize("datapath", ["bridge", "routed"])
def test_icc_off_is_still_blocked_and_never_redirected(
    on: NetworkController, datapath: str
) -> None:
    opts = {**NO_ICC, **(ROUTED if datapath == "routed" else {})}
    net = on.create_network("quiet", ipv4=subnet(2), options=opts)
    (_, ka), (b, _) = containers(on, net, 2, "q")
    if datapath == "bridge":
        # The isolated ports pass no ARP: give a the MAC so its packets reach the program.
        mac = b.mac_address
        neigh = ["ip", "neigh", "replace", address(b), "lladdr", mac, "dev", "eth0"]
        subprocess.run(["nsenter", f"--net={ka}", *neigh], check=True)
    before = on.ebpf_counters
    assert not reaches(ka, address(b))
    assert reaches(ka, gateway(2)), "the gateway stays reachable"
    after = on.ebpf_counters
    assert after is not None and before is not None
    assert after["redirected"] == before["redirected"], after
    assert after["policy"] > before["policy"], after


def test_networks_stay_isolated_whatever_their_datapath(
    on: NetworkController, ip_forward: None
) -> None:
    bridged = on.create_network("b1", ipv4=subnet(3))
    routed = on.create_network("r1", ipv4=subnet(4), options=ROUTED)
    other = on.create_network("r2", ipv4=subnet(5), options=ROUTED)
    (b1, kb1), (b2, _) = containers(on, bridged, 2, "b")
    (r1, kr1), (r2, _) = containers(on, routed, 2, "r")
    (o1, ko1), _ = containers(on, other, 2, "o")
    assert reaches(kb1, address(b2)) and reaches(kr1, address(r2))
    for key, target in ((kb1, r1), (kr1, b1), (kr1, o1), (ko1, r2), (ko1, b2)):
        assert not reaches(key, address(target), tries=1), f"{key} reached {address(target)}"
    # No bridge port on the routed networks: their containers are routed host ends.
    for net in (routed, other):
        bridge = f"br-{net.id[:12]}"
        assert not list(Path(f"/sys/class/net/{bridge}/brif").iterdir())


# --- off, and failures ---------------------------------------------------------------------


def test_ebpf_off_loads_and_attaches_nothing(off: NetworkController, dirs) -> None:
    assert off.ebpf == "off" and off.ebpf_counters is None
    net = off.create_network("plain", ipv4=subnet(6))
    (a, ka), (b, _) = containers(off, net, 2, "p")
    assert reaches(ka, address(b))
    assert loader.tc_query(ifindex(a)) is None and loader.tc_query(ifindex(b)) is None
    pin_root = doctor(dirs[0], dirs[1], "auto").ebpf_datapath["pin_root"]
    assert not os.path.exists(pin_root)


@pytest.fixture
def broken_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cnm_redirect.bpf.o replaced by one that the verifier must reject."""
    src = tmp_path / "bad.bpf.c"
    src.write_text(BAD_PROGRAM)
    out = tmp_path / "badobj"
    build.compile_program(src, out / "cnm_redirect.bpf.o")
    monkeypatch.setattr(loader, "OBJ_DIR", out)
    return out


def test_a_failed_load_falls_back_in_auto_and_raises_in_on(
    dirs: tuple[str, str], broken_objects: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(errors.EbpfVerifierRejected) as info:
        NetworkController(state_dir=dirs[0], run_dir=dirs[1], ebpf="on")
    assert isinstance(info.value, errors.EbpfUnavailable | errors.Unavailable)
    assert "invalid access to packet" in (info.value.verifier_log or "")
    assert info.value.program == "cnm_redirect_ingress"

    for ctl in _controller(dirs, "auto"):
        net = ctl.create_network("fallback", ipv4=subnet(7))
        (a, ka), (b, _) = containers(ctl, net, 2, "x")
        assert ctl.ebpf == "off"
        assert "verifier rejected" in (ctl.ebpf_reason or ""), ctl.ebpf_reason
        assert any("eBPF data path unavailable" in r.getMessage() for r in caplog.records)
        assert reaches(ka, address(b)), "the kernel path carries the traffic"
        assert loader.tc_query(ifindex(a)) is None


def test_reconcile_removes_map_entries_of_endpoints_gone_behind_its_back(
    on: NetworkController,
) -> None:
    net = on.create_network("repair", ipv4=subnet(8))
    (a, ka), (b, _), (c, _) = containers(on, net, 3, "m")
    pin_root = on._accel.pin_root
    # A crashed controller's entry (an address no endpoint holds) and a host end deleted
    # behind cnm's back.
    with RedirectOwner(pin_root) as other:
        assert other.picked_up
        other.add_endpoint(RedirectEndpoint("10.98.0.200", ifindex(a), "02:42:0a:62:00:c8", 1))
    subprocess.run(["ip", "link", "del", host_name(c.id)], check=True)

    report = on.reconcile()
    removed = {r.object for r in report.repairs if r.kind == "bpf_endpoint_removed"}
    assert removed == {"10.98.0.200"}, report.to_dict()
    # c's join was redone by reconcile: its entry names the new host end.
    entries = {str(e.address): e.ifindex for e in on._accel.entries()}
    assert entries == {address(ep): ifindex(ep) for ep in (a, b, c)}
    assert reaches(ka, address(b)) and reaches(ka, address(c))
    assert not [r for r in on.reconcile().repairs if r.kind == "bpf_endpoint_removed"]


# --- several controllers on one state directory, and failures that must leave nothing -------


def _pinned_addresses(pin_root: str) -> set[str] | None:
    """The addresses the pinned map holds (a fresh owner picks up the pins); None when
    nothing is pinned."""
    if not os.path.exists(os.path.join(pin_root, "cnm_redirect", "cnm_endpoints")):
        return None
    with RedirectOwner(pin_root) as owner:
        assert owner.picked_up
        return {str(e.address) for e in owner.endpoints()}


def test_a_controller_follows_pins_another_one_released(on: NetworkController, dirs) -> None:
    """Two controllers on one state directory (a CLI and an agent) hold the same map. The
    first's last network goes, so it removes the pins; the second, still holding the old
    map, must put its next entries where the pins are, not into the map nobody sees."""
    pin_root = on._accel.pin_root
    for other in _controller(dirs, "on"):
        assert _pinned_addresses(pin_root) == set()
        net = on.create_network("first", ipv4=subnet(10))
        (a, _), (b, _) = containers(on, net, 2, "r")
        assert other._accel.entries() and _pinned_addresses(pin_root) == {
            address(a),
            address(b),
        }
        # Entries of the other controller keep the pins: the first's release does nothing.
        net2 = other.create_network("second", ipv4=subnet(11))
        (c, _), (d, _) = containers(other, net2, 2, "s")
        on.delete_endpoints([a, b], force=True)
        net.delete()
        assert _pinned_addresses(pin_root) == {address(c), address(d)}
        other.delete_endpoints([c, d], force=True)
        # Now the map is empty: the first controller's next release removes the pins.
        net3 = on.create_network("third", ipv4=subnet(12))
        net3.delete()
        assert _pinned_addresses(pin_root) is None
        (e, ke), (f, _) = containers(other, net2, 2, "t")
        assert _pinned_addresses(pin_root) == {address(e), address(f)}
        before = other.ebpf_counters
        assert before is not None and before["endpoints"] == 2
        assert reaches(ke, address(f))
        after = other.ebpf_counters
        assert after is not None and after["redirected"] - before["redirected"] >= 2, after


def test_a_leave_whose_map_update_fails_still_retires_the_host_end(
    on: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = on.create_network("leak", ipv4=subnet(13))
    (a, _), _ = containers(on, net, 2, "l")
    port = host_name(a.id)

    def broken_remove(addresses: object) -> int:
        raise errors.KernelError(5, "map delete failed", operation="BPF endpoint map delete")

    monkeypatch.setattr(on._accel, "remove", broken_remove)
    with pytest.raises(errors.CNMError) as info:
        on.leave_many([(a, "l-c0")])
    assert "map delete failed" in str(info.value)
    monkeypatch.undo()
    # The host end was retired all the same: down, and deleted by the reaper.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/sys/class/net/{port}") and time.monotonic() < deadline:
        try:
            flags = int(Path(f"/sys/class/net/{port}/flags").read_text(), 16)
        except OSError:  # deleted while read
            continue
        assert not flags & 0x1, "the host end is still up"
        time.sleep(0.05)
    assert not os.path.exists(f"/sys/class/net/{port}"), "the host end leaked"


@pytest.mark.parametrize(
    "bad",
    [
        {"plugin_dirs": "x"},
        {"plugin_dirs": 5},
        {"run_dir": None},
        {"store": "mysql://nope"},
    ],
    ids=["plugin_dirs-str", "plugin_dirs-int", "run_dir", "store"],
)
def test_bad_arguments_with_ebpf_on_load_and_pin_nothing(dirs, bad: dict) -> None:
    pin_root = f"/sys/fs/bpf/cnm-bad-{os.getpid()}-{random.randrange(1 << 30)}"
    args = {"state_dir": dirs[0], "run_dir": dirs[1], "ebpf": "on", "bpf_pin_root": pin_root}
    with pytest.raises(errors.InvalidParameter):
        NetworkController(**{**args, **bad})
    assert not os.path.exists(pin_root)
    assert not os.path.exists(dirs[0]), "bad input made the state directory"


def test_a_failed_construction_undoes_pins_store_and_reaper(
    dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from cnm.control import controller as controller_module

    pin_root = f"/sys/fs/bpf/cnm-undo-{os.getpid()}-{random.randrange(1 << 30)}"
    # The store cannot be made (its directory is a file): nothing is loaded or pinned.
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(errors.CNMError):
        NetworkController(
            state_dir=str(blocker / "state"), run_dir=dirs[1], ebpf="on", bpf_pin_root=pin_root
        )
    assert not os.path.exists(pin_root)

    # A failure after the program was loaded: its pins go, the store and reaper stop.
    def failing_namespaces(*args: object, **kwargs: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(controller_module, "NamespaceStore", failing_namespaces)
    reapers = sum(t.name == "cnm-reaper" for t in threading.enumerate())
    with pytest.raises(OSError):
        NetworkController(state_dir=dirs[0], run_dir=dirs[1], ebpf="on", bpf_pin_root=pin_root)
    assert not os.path.exists(pin_root)
    assert sum(t.name == "cnm-reaper" for t in threading.enumerate()) == reapers
    monkeypatch.undo()
    # The store was closed: a new controller on the same state directory opens it.
    ctl = NetworkController(state_dir=dirs[0], run_dir=dirs[1], ebpf="on", bpf_pin_root=pin_root)
    try:
        assert ctl.ebpf == "on" and not ctl._accel._owner.picked_up
    finally:
        ctl._accel.release_if_idle()
        ctl.close()
    assert not os.path.exists(pin_root)


# --- past the bridge limit -----------------------------------------------------------------


def test_a_routed_network_holds_more_containers_than_a_bridge_has_ports(
    on: NetworkController,
) -> None:
    n = ROUTED_CONTAINERS
    started = time.monotonic()
    net = on.create_network("big", ipv4=subnet(9, prefix=19), options=ROUTED)
    eps = []
    for start in range(0, n, 1024):
        eps += net.create_endpoints([f"big{i}" for i in range(start, min(n, start + 1024))])
    keys: list[str] = []
    for start in range(0, n, 512):
        chunk = eps[start : start + 512]
        keys += on.join_many([(ep, f"big-c{start + i}") for i, ep in enumerate(chunk)])
    joined = time.monotonic()
    assert on.ebpf_counters["endpoints"] == n  # type: ignore[index]

    before = on.ebpf_counters["redirected"]  # type: ignore[index]
    rng = random.Random(7)
    pairs = [(0, n - 1), (n - 1, 1024), (1023, 1025)] + [
        tuple(rng.sample(range(n), 2)) for _ in range(7)
    ]
    for i, j in pairs:
        # The `ping` program: osl.ping's select() cannot take this many open descriptors.
        ok = ns_ping(keys[i], address(eps[j])) or ns_ping(keys[i], address(eps[j]), timeout=2)
        assert ok, f"container {i} cannot reach {j}"
    assert on.ebpf_counters["redirected"] - before >= 2 * len(pairs)  # type: ignore[index]
    pinged = time.monotonic()

    on.leave_many([(ep, f"big-c{i}") for i, ep in enumerate(eps)])
    on.delete_endpoints(eps)
    net.delete()
    print(
        f"\nrouted network of {n}: create+join {joined - started:.1f} s, "
        f"{len(pairs)} pings {pinged - joined:.1f} s, teardown {time.monotonic() - pinged:.1f} s"
    )
