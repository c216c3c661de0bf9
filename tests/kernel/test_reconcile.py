"""Crash repair: a controller killed at a chosen point, then reconcile() on the same dirs.

Each crash runs in a child process (it inherits this session's throwaway namespaces) that
patches one step of the controller's path to do its real work, or not, and then
os._exit() at once: no rollback, no finally, no flush. A fresh controller in the test
process then reconciles. The result is checked with independent means: the SQLite file
read directly (no object left in an intermediate state, every IPAM address owned),
/proc/self/mountinfo and the run_dir/netns directory (no namespace without a sandbox),
and `nsenter --net=<key> ip -j link` for every sandbox key. A second reconcile is clean.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from cnm.control import NetworkController
from cnm.control.driverapi import JoinInfo, SandboxInfo
from cnm.control.drivers.null import NullDriver
from cnm.fastpath import netns

from .oracles import assert_null_sandbox, netns_dir, nsfs_mounts

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

CRASH = 86  # the child's exit status when it died at the chosen point

_CHILD = """
import os, sys
from cnm.control import NetworkController
from cnm.control.driverapi import JoinInfo, SandboxInfo
from cnm.control.drivers.null import NullDriver
from cnm.control.drivers.null import NullDriver
from cnm.control.osl.namespace import NamespaceStore
from cnm.fastpath.netns import NamespaceWorker

def _patch(cls, name, nth, after):
    real = getattr(cls, name)
    calls = [0]
    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] < nth:
            return real(*args, **kwargs)
        if after:
            real(*args, **kwargs)
        os._exit(%(crash)d)
    setattr(cls, name, step)

def crash_before(cls, name, nth=1):
    _patch(cls, name, nth, after=False)

def crash_after(cls, name, nth=1):
    _patch(cls, name, nth, after=True)

ctl = NetworkController(state_dir=sys.argv[1], run_dir=sys.argv[2])
"""


# --- independent oracles -----------------------------------------------------------------


def db_rows(state_dir: str, sql: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{os.path.join(state_dir, 'state.db')}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def assert_consistent(state_dir: str, run_dir: str) -> None:
    """The store and the kernel agree, judged from the SQLite file and the kernel alone."""
    nets = {
        i: (state, json.loads(data))
        for i, state, data in db_rows(state_dir, "SELECT id, state, data FROM networks")
    }
    eps = db_rows(
        state_dir, "SELECT id, network_id, ipv4, ipv6, sandbox_id, state, join_state FROM endpoints"
    )
    sbs = {
        i: (key, state)
        for i, key, state in db_rows(state_dir, "SELECT id, key, state FROM sandboxes")
    }

    assert all(state == "ready" for state, _ in nets.values()), nets
    assert all(state == "ready" for _, state in sbs.values()), sbs
    for ep_id, net_id, _, _, sb_id, state, join_state in eps:
        assert net_id in nets, f"endpoint {ep_id} has no network"
        assert state == "ready", (ep_id, state)
        assert join_state in ("", "joined"), (ep_id, join_state)
        assert (sb_id in sbs) if join_state == "joined" else sb_id is None, (ep_id, sb_id)

    # Namespaces: exactly the sandbox keys, each a live namespace with loopback up.
    keys = sorted(key for key, _ in sbs.values())
    assert sorted(os.path.join(run_dir, "netns", n) for n in netns_dir(run_dir)) == keys
    assert sorted(nsfs_mounts(run_dir)) == keys
    for key in keys:
        assert_null_sandbox(key, addresses=False)

    # IPAM: every pool is a network's, every address an endpoint's or a network's gateway.
    pools = {
        p["pool_id"]: (n, p) for n, (_, data) in nets.items() for p in data["ipv4"] + data["ipv6"]
    }
    assert {p for (p,) in db_rows(state_dir, "SELECT pool_id FROM ipam_pools")} == set(pools)
    owned = {
        (ep_id, ipaddress.ip_interface(a).ip) for ep_id, _, v4, v6, *_ in eps for a in (v4, v6) if a
    }
    for pool_id, blob, kind, owner in db_rows(
        state_dir, "SELECT pool_id, addr, kind, owner FROM ipam_addresses"
    ):
        net_id, pool = pools[pool_id]
        value = int.from_bytes(blob, "big")
        v4 = ipaddress.ip_network(pool["subnet"]).version == 4
        ip = ipaddress.IPv4Address(value) if v4 else ipaddress.IPv6Address(value)
        if kind == "gateway":
            assert (
                owner == net_id
                and pool["gateway"]
                and ipaddress.ip_interface(pool["gateway"]).ip == ip
            ), (pool_id, ip)
        else:
            assert (owner, ip) in owned, f"address {ip} of {pool_id} belongs to no endpoint"


def crash(dirs: tuple[str, str], tmp_path: Path, body: str) -> None:
    """Run `body` in a child controller that must die at its patched step."""
    script = _CHILD % {"crash": CRASH} + textwrap.dedent(body) + "\nsys.exit(3)\n"
    proc = subprocess.run(
        [sys.executable, "-c", script, *dirs],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == CRASH, f"the child did not crash where asked:\n{proc.stderr}"


def reconcile_twice(dirs: tuple[str, str]) -> Counter:
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        report = ctl.reconcile()
        assert report.errors == []
        kinds = Counter(report.kinds())
        assert_consistent(*dirs)
        second = ctl.reconcile()
        assert second.clean, second.to_dict()
    return kinds


# --- the crash table -----------------------------------------------------------------------


def _setup_nothing(ctl: NetworkController) -> None:
    pass


def _setup_network(ctl: NetworkController) -> None:
    ctl.create_network("n1", driver="null").create_endpoints([f"e{i}" for i in range(5)])


def _setup_joined(ctl: NetworkController) -> None:
    _setup_network(ctl)
    ctl.create_network("n2", driver="null").create_endpoint("f1")
    ctl.network("n1").endpoint("e0").join("c1")


def _setup_joined_twice(ctl: NetworkController) -> None:
    _setup_joined(ctl)
    ctl.network("n2").endpoint("f1").join("c1")


def _setup_explicit(ctl: NetworkController) -> None:
    _setup_network(ctl)
    sb = ctl.create_sandbox("c2", hostname="web", dns=["192.0.2.53"])
    ctl.network("n1").endpoint("e0").join(sb)


def _setup_dual_stack(ctl: NetworkController) -> None:
    ctl.create_network("n6", driver="null", enable_ipv6=True).create_endpoint("old")


def _setup_empty_network(ctl: NetworkController) -> None:
    ctl.create_network("n9", driver="null")


E0 = "ep = ctl.network('n1').endpoint('e0')\n"

SCENARIOS: list[tuple[str, Callable[[NetworkController], None], str, dict[str, int]]] = [
    (
        "join/after-driver-join",
        _setup_network,
        E0 + "crash_after(NullDriver, 'join')\nep.join('c1')",
        {"join_rolled_back": 1, "sandbox_create_rolled_back": 1},
    ),
    (
        "join/before-driver-join",
        _setup_network,
        E0 + "crash_before(NullDriver, 'join')\nep.join('c1')",
        {"join_rolled_back": 1, "sandbox_create_rolled_back": 1},
    ),
    (
        "join/after-namespace-create",
        _setup_network,
        E0 + "crash_after(NamespaceWorker, 'create')\nep.join('c1')",
        {"join_rolled_back": 1, "sandbox_create_rolled_back": 1},
    ),
    (
        "join/before-namespace-create",
        _setup_network,
        E0 + "crash_before(NamespaceWorker, 'create')\nep.join('c1')",
        {"join_rolled_back": 1, "sandbox_create_rolled_back": 1},
    ),
    (
        "join_many/3rd-driver-join",
        _setup_network,
        "crash_before(NullDriver, 'join', nth=3)\n"
        "ctl.join_many([(e, 'c' + e.name) for e in ctl.network('n1').endpoints()])",
        {"join_rolled_back": 5, "sandbox_create_rolled_back": 5},
    ),
    (
        "join_many/2nd-namespace-create",
        _setup_network,
        "crash_after(NamespaceWorker, 'create', nth=2)\n"
        "ctl.join_many([(e, 'c' + e.name) for e in ctl.network('n1').endpoints()])",
        {"join_rolled_back": 5, "sandbox_create_rolled_back": 5},
    ),
    (
        "join/existing-sandbox",
        _setup_joined,
        "crash_after(NullDriver, 'join')\nctl.network('n2').endpoint('f1').join('c1')",
        {"join_rolled_back": 1},
    ),
    (
        "leave/after-driver-leave",
        _setup_joined,
        E0 + "crash_after(NullDriver, 'leave')\nep.leave('c1')",
        {"leave_completed": 1, "empty_sandbox_removed": 1},
    ),
    (
        "leave/before-driver-leave",
        _setup_joined,
        E0 + "crash_before(NullDriver, 'leave')\nep.leave('c1')",
        {"leave_completed": 1, "empty_sandbox_removed": 1},
    ),
    (
        "leave/not-the-last-endpoint",
        _setup_joined_twice,
        E0 + "crash_after(NullDriver, 'leave')\nep.leave('c1')",
        {"leave_completed": 1},
    ),
    (
        "leave/before-namespace-delete",
        _setup_joined,
        E0 + "crash_before(NamespaceStore, 'delete')\nep.leave('c1')",
        {"sandbox_delete_completed": 1},
    ),
    (
        "leave/after-namespace-delete",
        _setup_joined,
        E0 + "crash_after(NamespaceStore, 'delete')\nep.leave('c1')",
        {"sandbox_delete_completed": 1},
    ),
    (
        "endpoint-create/before-driver",
        _setup_network,
        "crash_before(NullDriver, 'create_endpoint')\nctl.network('n1').create_endpoint('new')",
        {"endpoint_create_rolled_back": 1},
    ),
    (
        "endpoint-create-many/after-3rd-driver",
        _setup_network,
        "crash_after(NullDriver, 'create_endpoint', nth=3)\n"
        "ctl.network('n1').create_endpoints(['x0', 'x1', 'x2', 'x3'])",
        {"endpoint_create_rolled_back": 4},
    ),
    (
        "endpoint-create-dual-stack/after-driver",
        _setup_dual_stack,
        "crash_after(NullDriver, 'create_endpoint')\nctl.network('n6').create_endpoint('new')",
        {"endpoint_create_rolled_back": 1},
    ),
    (
        "endpoint-delete-dual-stack/before-driver",
        _setup_dual_stack,
        "crash_before(NullDriver, 'delete_endpoint')\nctl.network('n6').endpoint('old').delete()",
        {"endpoint_delete_completed": 1},
    ),
    (
        "endpoint-delete/after-driver",
        _setup_network,
        "crash_after(NullDriver, 'delete_endpoint')\nctl.network('n1').endpoint('e3').delete()",
        {"endpoint_delete_completed": 1},
    ),
    (
        "endpoint-delete-force/in-leave",
        _setup_joined,
        E0 + "crash_after(NullDriver, 'leave')\nep.delete(force=True)",
        {"leave_completed": 1, "empty_sandbox_removed": 1},
    ),
    (
        "endpoint-delete-force/after-driver-delete",
        _setup_joined,
        E0 + "crash_after(NullDriver, 'delete_endpoint')\nep.delete(force=True)",
        {"endpoint_delete_completed": 1},
    ),
    (
        "network-create/before-driver",
        _setup_nothing,
        "crash_before(NullDriver, 'create_network')\nctl.create_network('n1', driver='null')",
        {"network_create_rolled_back": 1},
    ),
    (
        "network-create/after-driver",
        _setup_network,
        "crash_after(NullDriver, 'create_network')\nctl.create_network('n2', driver='null')",
        {"network_create_rolled_back": 1},
    ),
    (
        "network-delete/after-driver",
        _setup_empty_network,
        "crash_after(NullDriver, 'delete_network')\nctl.network('n9').delete()",
        {"network_delete_completed": 1},
    ),
    (
        "create-sandbox/after-namespace-create",
        _setup_nothing,
        "crash_after(NamespaceStore, 'create')\nctl.create_sandbox('c2', hostname='h')",
        {"sandbox_create_rolled_back": 1},
    ),
    (
        "create-sandbox/before-namespace-create",
        _setup_nothing,
        "crash_before(NamespaceStore, 'create')\nctl.create_sandbox('c2', hostname='h')",
        {"sandbox_create_rolled_back": 1},
    ),
    (
        "sandbox-delete/in-leave",
        _setup_explicit,
        "crash_after(NullDriver, 'leave')\nctl.sandbox('c2').delete()",
        {"leave_completed": 1},
    ),
    (
        "sandbox-delete/after-namespace-delete",
        _setup_explicit,
        "crash_after(NamespaceStore, 'delete')\nctl.sandbox('c2').delete()",
        {"sandbox_delete_completed": 1},
    ),
]


# The null driver's joins are KernelOnlyJoin ones: recorded in the transaction that plans
# them, after the kernel work, with no intent. A crash before that commit leaves the store
# as before the join, and at most namespaces made for it, which reconcile removes as
# orphans. The join scenarios above run on the intent path (what other drivers' joins
# take) with the driver's flag turned off in the child, and on this path: per scenario,
# the repairs reconcile makes then.
INTENT = "NullDriver.kernel_only_joins = False\n"
INLINE_REPAIRS: dict[str, dict[str, int]] = {
    "join/after-driver-join": {"orphan_namespace_removed": 1},
    "join/before-driver-join": {"orphan_namespace_removed": 1},
    "join/after-namespace-create": {"orphan_namespace_removed": 1},
    "join/before-namespace-create": {},
    "join_many/3rd-driver-join": {"orphan_namespace_removed": 5},
    "join_many/2nd-namespace-create": {"orphan_namespace_removed": 2},
    "join/existing-sandbox": {},
}
CASES = [
    pytest.param(s, INTENT + b if i in INLINE_REPAIRS else b, e, id=i) for i, s, b, e in SCENARIOS
] + [
    pytest.param(s, b, INLINE_REPAIRS[i], id=f"{i}/inline")
    for i, s, b, _ in SCENARIOS
    if i in INLINE_REPAIRS
]


@pytest.mark.parametrize(("setup", "body", "expected"), CASES)
def test_reconcile_repairs_a_crash(dirs, tmp_path, setup, body, expected) -> None:
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        setup(ctl)
    assert_consistent(*dirs)
    crash(dirs, tmp_path, body)
    assert reconcile_twice(dirs) == Counter(expected)


def test_a_crash_inside_reconcile_is_repaired_by_the_next_one(dirs, tmp_path) -> None:
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        _setup_network(ctl)
    crash(
        dirs,
        tmp_path,
        INTENT + "crash_before(NullDriver, 'join', nth=3)\n"
        "ctl.join_many([(e, 'c' + e.name) for e in ctl.network('n1').endpoints()])",
    )
    # Reconcile itself dies after removing the second of the five half-made namespaces.
    crash(dirs, tmp_path, "crash_after(NamespaceStore, 'delete', nth=2)\nctl.reconcile()")
    assert reconcile_twice(dirs) == Counter({"sandbox_create_rolled_back": 4})


def test_after_repair_the_objects_work_again(dirs, tmp_path) -> None:
    """Repaired state is usable: the rolled-back join can be done again, and undone."""
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        _setup_network(ctl)
    crash(dirs, tmp_path, E0 + "crash_after(NullDriver, 'join')\nep.join('c1')")
    reconcile_twice(dirs)
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        ep = ctl.network("n1").endpoint("e0")
        key = ep.join("c1")
        assert_null_sandbox(key, addresses=False)
        ep.delete(force=True)
        ctl.delete_endpoints(ctl.network("n1").endpoints())
        ctl.network("n1").delete()  # refused if a half-made endpoint were still there
        assert [n.name for n in ctl.networks()] == []
    assert_consistent(*dirs)


@pytest.mark.parametrize("sandbox", ["new", "explicit"])
def test_a_bridge_join_killed_midway_leaves_only_what_reconcile_removes(
    dirs, tmp_path, sandbox: str
) -> None:
    """A bridge join (KernelOnlyJoin: no intent, one commit after the kernel work) killed
    once its veth pair and the sandbox side are made: the store says not joined, and
    reconcile removes the host end (its peer goes with it) and a namespace made for the
    join; the join can then be done again."""
    from cnm.control import IPAMConfig

    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        net = ctl.create_network("b1", ipv4=[IPAMConfig(subnet="10.77.0.0/24")])
        net.create_endpoint("e0")
        if sandbox == "explicit":
            ctl.create_sandbox("c1")
    crash(
        dirs,
        tmp_path,
        "from cnm.control.osl.interfaces import SandboxInterfaces\n"
        "crash_after(SandboxInterfaces, 'add')\n"
        "ctl.network('b1').endpoint('e0').join('c1')",
    )
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1]) as ctl:
        report = ctl.reconcile()
        assert report.errors == []
        expected = {"stray_host_veth_removed": 1}
        if sandbox == "new":
            expected["orphan_namespace_removed"] = 1
        if ctl.ebpf == "on":  # the BPF data path had its map entry made too
            expected["bpf_endpoint_removed"] = 1
        assert report.kinds() == expected, report.to_dict()
        assert ctl.reconcile().clean
        ep = ctl.network("b1").endpoint("e0")
        assert ep.record.join_state == "" and ep.record.sandbox_id is None
        if sandbox == "explicit":
            key = ctl.sandbox("c1").key
            assert netns.run_in(key, netns.link_names) == ["lo"]  # the peer went too
        key = ep.join("c1")
        assert sorted(netns.run_in(key, netns.link_names)) == ["eth0", "lo"]
        ep.delete(force=True)
        if sandbox == "explicit":
            ctl.sandbox("c1").delete()
        ctl.network("b1").delete()
    assert_consistent(*dirs)


# --- drift without a crash -----------------------------------------------------------------


def test_a_vanished_namespace_of_a_joined_sandbox_is_recreated(dirs, ctl) -> None:
    e1 = ctl.create_network("n1", driver="null").create_endpoint("e1")
    e2 = ctl.create_network("n2", driver="null").create_endpoint("e2")
    key = e1.join("c1")
    e2.join("c1")
    before = assert_null_sandbox(key, addresses=False)
    netns.delete(key)  # behind the controller's back
    assert not os.path.lexists(key)

    report = ctl.reconcile()
    assert report.errors == []
    assert report.kinds() == {"sandbox_namespace_recreated": 1}
    assert [r.object for r in report.repairs] == [key]
    assert assert_null_sandbox(key, addresses=False) != before  # a new namespace at the same key
    assert e1.sandbox is not None and e1.sandbox.key == key
    assert e2.sandbox is not None and e2.sandbox.key == key
    assert_consistent(*dirs)
    assert ctl.reconcile().clean


def test_an_explicit_sandbox_with_a_stale_file_gets_its_namespace_back(dirs, ctl) -> None:
    sb = ctl.create_sandbox("c2", hostname="web")
    netns.delete(sb.key)
    Path(sb.key).write_text("")  # what a reboot leaves: the file, not the mount
    assert sb.key not in nsfs_mounts(sb.key)

    report = ctl.reconcile()
    assert report.errors == []
    assert report.kinds() == {"sandbox_namespace_recreated": 1}
    assert_null_sandbox(sb.key, addresses=False)
    assert ctl.sandbox("c2").id == sb.id
    assert_consistent(*dirs)
    assert ctl.reconcile().clean


def test_a_stray_namespace_is_removed_and_real_sandboxes_kept(dirs, ctl) -> None:
    run_dir = dirs[1]
    ep = ctl.create_network("n1", driver="null").create_endpoint("e1")
    key = ep.join("c1")
    ident = assert_null_sandbox(key, addresses=False)
    stray = os.path.join(run_dir, "netns", "f" * 64)
    netns.create(stray)
    stale = os.path.join(run_dir, "netns", "stale-file")
    Path(stale).write_text("")

    report = ctl.reconcile()
    assert report.errors == []
    assert report.kinds() == {"orphan_namespace_removed": 2}
    assert sorted(r.object for r in report.repairs) == sorted([stray, stale])
    assert not os.path.lexists(stray) and not os.path.lexists(stale)
    assert netns_dir(run_dir) == [os.path.basename(key)]
    assert assert_null_sandbox(key, addresses=False) == ident
    assert_consistent(*dirs)
    assert ctl.reconcile().clean


def test_orphan_addresses_and_pools_are_released(dirs, ctl) -> None:
    from cnm.control.ipam.api import PoolRequest

    net = ctl.create_network("n1", driver="null")
    ep = net.create_endpoint("e1")
    ipam = ctl.ipam_driver("default")
    pool_id = net.record.ipv4[0].pool_id
    # As a crashed writer without a transaction would leave them.
    lost = ipam.request_address(pool_id, None, owner="0" * 64)
    orphan = ipam.request_pool(
        PoolRequest(address_space="LocalDefault", pool=None, sub_pool=None, options={}, v6=False)
    )
    ipam.request_address(orphan.pool_id, None, owner="1" * 64)

    report = ctl.reconcile()
    assert report.errors == []
    assert report.kinds() == {"orphan_address_released": 1, "orphan_pool_released": 1}
    assert {r.object for r in report.repairs} == {str(lost.ip), orphan.pool_id}
    assert ep.refresh().ipv4_address is not None
    assert_consistent(*dirs)
    assert ctl.reconcile().clean


# --- failures the controller could not undo itself -----------------------------------------


class StubbornDriver(NullDriver):
    """The null driver whose join fails on the k-th call and whose leave fails once."""

    name = "stubborn"
    # Its injected failures stand for state outside the kernel: joins take the intent path.
    kernel_only_joins = False

    def __init__(self, fail_join_on: int) -> None:
        self.fail_join_on = fail_join_on
        self.joins = 0
        self.leave_failures = 1

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo:
        self.joins += 1
        if self.joins == self.fail_join_on:
            raise RuntimeError("injected join failure")
        return super().join(network_id, endpoint_id, sandbox)

    def leave(self, network_id: str, endpoint_id: str) -> None:
        if self.leave_failures:
            self.leave_failures -= 1
            raise RuntimeError("injected leave failure")


def test_a_rollback_that_fails_is_finished_by_reconcile(dirs, ctl) -> None:
    ctl.registry.register(StubbornDriver(fail_join_on=3))
    eps = ctl.create_network("s", driver="stubborn").create_endpoints(["a", "b", "c", "d"])
    with pytest.raises(RuntimeError, match="injected join failure") as info:
        ctl.join_many([(ep, f"c-{ep.name}") for ep in eps])
    assert any("reconcile" in note for note in getattr(info.value, "__notes__", []))
    # The intents were kept for reconcile, but no namespace outlives the failed call.
    assert {ep.refresh().record.join_state for ep in eps} == {"joining"}
    assert nsfs_mounts(dirs[1]) == {}

    report = ctl.reconcile()
    assert report.errors == []
    assert report.kinds() == {"join_rolled_back": 4, "sandbox_create_rolled_back": 4}
    assert_consistent(*dirs)
    assert ctl.reconcile().clean


def test_a_leave_that_fails_is_finished_by_reconcile(dirs, ctl) -> None:
    drv = StubbornDriver(fail_join_on=0)
    ctl.registry.register(drv)
    ep = ctl.create_network("s", driver="stubborn").create_endpoint("a")
    drv.leave_failures = 0
    key = ep.join("c1")
    drv.leave_failures = 1
    with pytest.raises(RuntimeError, match="injected leave failure"):
        ep.leave("c1")
    assert ep.refresh().record.join_state == "leaving"
    # Still held by the endpoint that did not finish leaving.
    assert_null_sandbox(key, addresses=False)

    report = ctl.reconcile()
    assert report.errors == []
    assert report.kinds() == {"leave_completed": 1, "empty_sandbox_removed": 1}
    assert not os.path.lexists(key)
    assert_consistent(*dirs)
    assert ctl.reconcile().clean


def test_a_network_whose_driver_is_absent_does_not_stop_reconcile(dirs) -> None:
    """A driver that is not there now (a remote plugin not yet started, say) must not stop
    the repair of everything else; a healthy endpoint of its network needs no driver."""
    state_dir, run_dir = dirs
    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        ctl.registry.register(StubbornDriver(fail_join_on=0))
        ctl.create_network("plugged", driver="stubborn").create_endpoint("idle")
    stray = os.path.join(run_dir, "netns", "e" * 64)
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    netns.create(stray)

    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        assert "stubborn" not in ctl.drivers()
        report = ctl.reconcile()
        assert report.errors == []
        assert report.kinds() == {"orphan_namespace_removed": 1}
    assert not os.path.lexists(stray)
    assert_consistent(state_dir, run_dir)


def test_reconcile_removes_a_stray_symlink_without_touching_its_target(dirs, tmp_path) -> None:
    """Whatever sits in run_dir/netns is removed as an orphan; a symlink there must go
    without the mount it points at (another tool's namespace, say) being detached."""
    state_dir, run_dir = dirs
    elsewhere = str(tmp_path / "other-tool-netns")
    netns.create(elsewhere)
    ident = nsfs_mounts(elsewhere)[elsewhere]
    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        ctl.create_sandbox("c1")
        link = os.path.join(run_dir, "netns", "link")
        os.symlink(elsewhere, link)
        report = ctl.reconcile()
        assert report.errors == []
        assert report.kinds() == {"orphan_namespace_removed": 1}
    assert not os.path.lexists(link)
    assert nsfs_mounts(elsewhere).get(elsewhere) == ident, "reconcile unmounted the target"
    assert_consistent(state_dir, run_dir)


@pytest.mark.parametrize("inline", [False, True], ids=["intent", "inline"])
def test_reconcile_does_not_undo_a_join_another_process_is_still_doing(
    dirs, tmp_path, inline: bool
) -> None:
    """Several processes may share a state_dir (`cnm reconcile` next to a running
    `cnm plugin serve`). A join in flight in a live process is work in progress, not a
    crash left-over: reconciling must not tear down the sandbox under a join that then
    confirms and hands its caller a key with no namespace behind it.

    On the intent path the intent's live owner tells reconcile to leave it be; an inline
    join (KernelOnlyJoin) holds the store's write transaction from its plan to its commit,
    and reconcile, which runs in one, waits for it."""
    state_dir, run_dir = dirs
    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        _setup_network(ctl)
    body = """
        real_join = NullDriver.join
        def join(self, *args):
            info = real_join(self, *args)
            print("joining", flush=True)
            sys.stdin.readline()
            return info
        NullDriver.join = join
        try:
            key = ctl.network('n1').endpoint('e0').join('c1')
            print("key", key, flush=True)
        except Exception as exc:
            print("failed", type(exc).__name__, exc, flush=True)
        os._exit(0)
    """
    script = _CHILD % {"crash": CRASH} + ("" if inline else INTENT) + textwrap.dedent(body)
    child = subprocess.Popen(
        [sys.executable, "-c", script, state_dir, run_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    reports: list[object] = []

    def reconcile() -> None:
        with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
            reports.append(ctl.reconcile())

    thread = threading.Thread(target=reconcile)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "joining"
        thread.start()  # while the join is in flight
        thread.join(timeout=1.0 if inline else 60.0)
        if inline:
            assert thread.is_alive(), "reconcile ran while an inline join held the store"
        else:
            assert not thread.is_alive() and reports, "reconcile waited for the intent path"
        child.stdin.write("go\n")
        child.stdin.flush()
        outcome = child.stdout.readline().split()
        thread.join(timeout=60.0)
        assert not thread.is_alive() and reports
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)
    assert outcome[0] == "key", outcome
    assert outcome[1] in nsfs_mounts(run_dir), "join returned a key with no namespace"
    assert_consistent(state_dir, run_dir)
