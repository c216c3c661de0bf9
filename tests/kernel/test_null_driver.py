"""The null driver end to end: real sandboxes, the CNM lifecycle rules, bulk joins, rollback.

Sandboxes are checked with independent tools: /proc/self/mountinfo (what namespace is
mounted at a key), `nsenter --net=<key> ip -j link|addr` (what is inside), and the
directory run_dir/netns itself.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import subprocess
import sys

import pytest

from cnm.control import NetworkController, errors
from cnm.control.driverapi import JoinInfo, SandboxInfo
from cnm.control.drivers.null import NullDriver
from cnm.fastpath import netns

from .oracles import assert_null_sandbox, netns_dir, nsfs_mounts

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]

HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture
def run_dir(dirs: tuple[str, str]) -> str:
    return dirs[1]


# --- join ----------------------------------------------------------------------------------


def test_join_returns_the_key_of_a_real_sandbox(ctl, run_dir) -> None:
    net = ctl.create_network("n1", driver="null")
    ep = net.create_endpoint("e1")
    assert ep.sandbox is None
    key = ep.join("c1")

    sb = ctl.sandbox("c1")
    assert HEX64.fullmatch(sb.id)
    assert key == os.path.join(run_dir, "netns", sb.id) == sb.key
    assert netns_dir(run_dir) == [sb.id]
    assert_null_sandbox(key)
    assert ep.sandbox is not None and ep.sandbox.id == sb.id
    assert [e.id for e in sb.endpoints()] == [ep.id]
    assert sb.explicit is False


def test_a_container_on_two_networks_has_one_sandbox(ctl, run_dir) -> None:
    e1 = ctl.create_network("n1", driver="null").create_endpoint("e1")
    e2 = ctl.create_network("n2", driver="null").create_endpoint("e2")
    key = e1.join("c1")
    ident = assert_null_sandbox(key)
    assert e2.join("c1") == key
    assert assert_null_sandbox(key) == ident  # the same namespace, not a new one at that path
    assert len(ctl.sandboxes()) == 1
    assert netns_dir(run_dir) == [os.path.basename(key)]
    assert {e.id for e in ctl.sandbox("c1").endpoints()} == {e1.id, e2.id}
    # join_many with one container on two networks in a single call: one sandbox too.
    e3 = ctl.network("n1").create_endpoint("e3")
    e4 = ctl.network("n2").create_endpoint("e4")
    k3, k4 = ctl.join_many([(e3, "c2"), (e4, "c2")])
    assert k3 == k4 != key
    assert_null_sandbox(k3)
    assert len(ctl.sandboxes()) == 2


def test_two_endpoints_of_one_network_in_one_container_conflict(ctl, run_dir) -> None:
    net = ctl.create_network("n1", driver="null")
    a, b = net.create_endpoints(["a", "b"])
    key = a.join("c1")
    with pytest.raises(errors.Conflict):
        b.join("c1")
    assert b.sandbox is None and b.record.join_state == ""
    assert a.sandbox is not None
    assert netns_dir(run_dir) == [os.path.basename(key)]
    # The same rule inside one bulk call, and nothing of it is left behind.
    c, d = net.create_endpoints(["c", "d"])
    with pytest.raises(errors.Conflict):
        ctl.join_many([(c, "c2"), (d, "c2")])
    assert c.sandbox is None and d.sandbox is None
    assert [s.container_id for s in ctl.sandboxes()] == ["c1"]
    assert netns_dir(run_dir) == [os.path.basename(key)]


def test_joining_a_joined_endpoint_is_refused(ctl, run_dir) -> None:
    ep = ctl.create_network("n1", driver="null").create_endpoint("e1")
    key = ep.join("c1")
    with pytest.raises(errors.EndpointJoined):
        ep.join("c2")
    with pytest.raises(errors.EndpointJoined):
        ep.join("c1")
    assert [s.container_id for s in ctl.sandboxes()] == ["c1"]
    assert netns_dir(run_dir) == [os.path.basename(key)]
    assert ep.sandbox is not None and ep.sandbox.key == key


# --- leave and sandbox life ----------------------------------------------------------------


def test_the_implicit_sandbox_goes_with_its_last_endpoint(ctl, run_dir) -> None:
    e1 = ctl.create_network("n1", driver="null").create_endpoint("e1")
    e2 = ctl.create_network("n2", driver="null").create_endpoint("e2")
    key = e1.join("c1")
    e2.join("c1")
    e1.leave("c1")
    assert e1.sandbox is None
    assert_null_sandbox(key)  # e2 still holds it
    e2.leave("c1")
    assert e2.sandbox is None
    assert not os.path.lexists(key)
    assert nsfs_mounts(run_dir) == {}
    assert netns_dir(run_dir) == []
    assert ctl.sandboxes() == []
    with pytest.raises(errors.SandboxNotFound):
        ctl.sandbox("c1")
    # The endpoints themselves remain, ready to join again.
    assert {e.name for e in ctl.network("n1").endpoints()} == {"e1"}
    assert_null_sandbox(e1.join("c1"))


def test_an_explicit_sandbox_outlives_its_endpoints_until_deleted(ctl, run_dir) -> None:
    sb = ctl.create_sandbox("c2", hostname="web1", dns=["192.0.2.53"])
    assert HEX64.fullmatch(sb.id)
    assert sb.key == os.path.join(run_dir, "netns", sb.id)
    ident = assert_null_sandbox(sb.key)  # made at once, before any join
    e1 = ctl.create_network("n1", driver="null").create_endpoint("e1")
    e2 = ctl.create_network("n2", driver="null").create_endpoint("e2")
    assert e1.join(sb) == sb.key
    e1.leave("c2")
    assert assert_null_sandbox(sb.key) == ident
    again = ctl.sandbox("c2")
    assert (again.id, again.hostname, again.dns, again.explicit) == (
        sb.id,
        "web1",
        ["192.0.2.53"],
        True,
    )
    # delete() leaves every joined endpoint first, then removes namespace and record.
    assert e1.join("c2") == e2.join("c2") == sb.key
    sb.delete()
    assert e1.sandbox is None and e2.sandbox is None
    assert e1.record.join_state == "" and e2.record.join_state == ""
    assert not os.path.lexists(sb.key)
    assert nsfs_mounts(run_dir) == {}
    assert netns_dir(run_dir) == []
    assert ctl.sandboxes() == []
    assert {e.name for n in ctl.networks() for e in n.endpoints()} == {"e1", "e2"}


def test_deleting_an_implicit_sandbox_leaves_its_endpoints(ctl, run_dir) -> None:
    e1 = ctl.create_network("n1", driver="null").create_endpoint("e1")
    e2 = ctl.create_network("n2", driver="null").create_endpoint("e2")
    key = e1.join("c1")
    e2.join("c1")
    ctl.sandbox("c1").delete()
    assert e1.sandbox is None and e2.sandbox is None
    assert not os.path.lexists(key)
    assert nsfs_mounts(run_dir) == {}
    assert ctl.sandboxes() == []


def test_joining_a_deleted_sandbox_is_refused(ctl, run_dir) -> None:
    """A Sandbox handle names one sandbox: once it is deleted, joining it must fail, not
    quietly make a different, implicit sandbox for the same container (which drops the
    hostname and DNS settings the caller made the sandbox with)."""
    sb = ctl.create_sandbox("c2", hostname="web1", dns=["192.0.2.53"])
    sb.delete()
    ep = ctl.create_network("n1", driver="null").create_endpoint("e1")
    with pytest.raises(errors.SandboxNotFound):
        ep.join(sb)
    assert ep.sandbox is None
    assert ctl.sandboxes() == []
    assert netns_dir(run_dir) == []


def test_endpoint_delete_is_refused_while_joined_unless_forced(ctl, run_dir) -> None:
    net = ctl.create_network("n1", driver="null")
    ep = net.create_endpoint("e1")
    addr = ep.ipv4_address
    key = ep.join("c1")
    with pytest.raises(errors.EndpointJoined):
        ep.delete()
    assert ep.sandbox is not None
    assert_null_sandbox(key)
    with pytest.raises(errors.ActiveEndpoints):
        net.delete()
    ep.delete(force=True)
    assert net.endpoints() == []
    assert not os.path.lexists(key)
    assert nsfs_mounts(run_dir) == {}
    assert ctl.sandboxes() == []
    # The address went back to the pool: the next endpoint may have it again.
    again = net.create_endpoint("e2", ipv4_address=str(addr.ip))
    assert again.ipv4_address == addr
    again.delete()
    net.delete()
    assert ctl.networks() == []


def test_leave_of_an_endpoint_not_joined_there_is_refused(ctl, run_dir) -> None:
    e1 = ctl.create_network("n1", driver="null").create_endpoint("e1")
    e2 = ctl.create_network("n2", driver="null").create_endpoint("e2")
    e3 = ctl.network("n1").create_endpoint("e3")
    k1 = e1.join("c1")
    k2 = e2.join("c2")
    with pytest.raises(errors.EndpointNotJoined):
        e1.leave("c2")  # joined, but to another container
    with pytest.raises(errors.EndpointNotJoined):
        e3.leave("c1")  # not joined at all
    with pytest.raises(errors.EndpointNotJoined):
        ctl.leave_many([(e2, "c2"), (e1, "c2")])  # all or nothing: e2 stays joined
    with pytest.raises(errors.CNMError):
        e1.leave("nobody")
    assert e1.sandbox is not None and e1.sandbox.key == k1
    assert e2.sandbox is not None and e2.sandbox.key == k2
    assert e3.sandbox is None
    assert_null_sandbox(k1)
    assert_null_sandbox(k2)
    assert netns_dir(run_dir) == sorted(os.path.basename(k) for k in (k1, k2))


# --- bulk ----------------------------------------------------------------------------------


def _endpoint_shape(ctl: NetworkController, ep, cid: str | None) -> dict:
    d = ep.refresh().to_dict()
    net = ctl.network(d["network_id"])
    ip = ipaddress.ip_interface(d["ipv4_address"])
    assert d["mac_address"] == "02:42:" + ":".join(f"{b:02x}" for b in ip.ip.packed)
    assert d["sandbox_id"] == (ctl.sandbox(cid).id if cid else None)
    d["offset"] = int(ip.ip) - int(net.subnets[0].network_address)
    for k in ("id", "name", "network_id", "ipv4_address", "mac_address", "sandbox_id"):
        d[k] = bool(d[k])
    return d


def _sandbox_shape(ctl: NetworkController, cid: str, run_dir: str) -> dict:
    sb = ctl.sandbox(cid)
    d = sb.to_dict()
    assert d["key"] == os.path.join(run_dir, "netns", d["id"]) and HEX64.fullmatch(d["id"])
    assert d["container_id"] == cid
    assert len(d["endpoints"]) == 1
    for k in ("id", "key", "container_id", "endpoints"):
        del d[k]
    return d


def test_join_many_and_leave_many_match_the_loop(ctl, run_dir) -> None:
    n = 20
    one = ctl.create_network("one", driver="null")
    bulk = ctl.create_network("bulk", driver="null")
    eps1 = one.create_endpoints([f"e{i}" for i in range(n)])
    eps2 = bulk.create_endpoints([f"e{i}" for i in range(n)])
    c1 = [f"one-{i}" for i in range(n)]
    c2 = [f"bulk-{i}" for i in range(n)]

    keys1 = [ep.join(c) for ep, c in zip(eps1, c1, strict=True)]
    keys2 = ctl.join_many(list(zip(eps2, c2, strict=True)))

    assert len(set(keys1 + keys2)) == 2 * n
    idents = {assert_null_sandbox(k) for k in keys1 + keys2}
    assert len(idents) == 2 * n  # 40 distinct namespaces
    assert netns_dir(run_dir) == sorted(os.path.basename(k) for k in keys1 + keys2)
    for keys, cids in ((keys1, c1), (keys2, c2)):
        assert keys == [ctl.sandbox(c).key for c in cids]
    assert [_endpoint_shape(ctl, e, c) for e, c in zip(eps1, c1, strict=True)] == [
        _endpoint_shape(ctl, e, c) for e, c in zip(eps2, c2, strict=True)
    ]
    assert [_sandbox_shape(ctl, c, run_dir) for c in c1] == [
        _sandbox_shape(ctl, c, run_dir) for c in c2
    ]

    for ep, c in zip(eps1, c1, strict=True):
        ep.leave(c)
    ctl.leave_many(list(zip(eps2, c2, strict=True)))

    assert netns_dir(run_dir) == []
    assert nsfs_mounts(run_dir) == {}
    assert ctl.sandboxes() == []
    assert [_endpoint_shape(ctl, e, None) for e in eps1] == [
        _endpoint_shape(ctl, e, None) for e in eps2
    ]


# --- rollback of a failed join -------------------------------------------------------------


class FlakyDriver(NullDriver):
    """The null driver, failing its k-th join; it records what it was asked to do."""

    def __init__(self, name: str, fail_on: int, how: str = "raise") -> None:
        self.name = name
        self.fail_on = fail_on
        self.how = how
        self.joins: list[str] = []
        self.leaves: list[str] = []
        self.keys_seen_live: list[bool] = []

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo:
        self.joins.append(endpoint_id)
        self.keys_seen_live.append(sandbox.key in nsfs_mounts(sandbox.key))
        if len(self.joins) == self.fail_on:
            if self.how == "raise":
                raise RuntimeError("injected join failure")
            return JoinInfo(src_name="veth-nope")  # the controller cannot take this
        return super().join(network_id, endpoint_id, sandbox)

    def leave(self, network_id: str, endpoint_id: str) -> None:
        self.leaves.append(endpoint_id)


def _assert_nothing_joined(ctl: NetworkController, run_dir: str, eps, keep: set[str]) -> None:
    assert netns_dir(run_dir) == sorted(keep)
    assert sorted(nsfs_mounts(run_dir)) == sorted(os.path.join(run_dir, "netns", i) for i in keep)
    assert sorted(s.id for s in ctl.sandboxes()) == sorted(keep)
    for ep in eps:
        rec = ep.refresh().record
        assert (rec.join_state, rec.sandbox_id, rec.state) == ("", None, "ready")
        assert ep.sandbox is None


def test_a_failing_join_leaves_nothing_behind(ctl, run_dir) -> None:
    drv = FlakyDriver("flaky", fail_on=1)
    ctl.registry.register(drv)
    ep = ctl.create_network("f", driver="flaky").create_endpoint("e1")
    with pytest.raises(RuntimeError, match="injected"):
        ep.join("c1")
    assert drv.keys_seen_live == [True]  # the driver was handed a real sandbox...
    _assert_nothing_joined(ctl, run_dir, [ep], keep=set())  # ...which is gone again
    assert drv.leaves == []  # it never joined, so there was nothing to leave


def test_a_failing_join_into_an_existing_sandbox_keeps_that_sandbox(ctl, run_dir) -> None:
    drv = FlakyDriver("flaky", fail_on=1)
    ctl.registry.register(drv)
    good = ctl.create_network("n1", driver="null").create_endpoint("good")
    key = good.join("c1")
    ident = assert_null_sandbox(key)
    bad = ctl.create_network("f", driver="flaky").create_endpoint("bad")
    with pytest.raises(RuntimeError, match="injected"):
        bad.join("c1")
    assert assert_null_sandbox(key) == ident
    assert good.sandbox is not None and good.sandbox.key == key
    _assert_nothing_joined(ctl, run_dir, [bad], keep={os.path.basename(key)})


@pytest.mark.parametrize("how", ["raise", "interface"])
def test_join_many_failing_on_the_kth_rolls_back_the_earlier_ones(ctl, run_dir, how) -> None:
    k = 4
    drv = FlakyDriver("flaky", fail_on=k, how=how)
    ctl.registry.register(drv)
    existing = ctl.create_network("n1", driver="null").create_endpoint("x")
    key = existing.join("c0")
    eps = ctl.create_network("f", driver="flaky").create_endpoints([f"e{i}" for i in range(6)])
    pairs = [(ep, f"c{i}") for i, ep in enumerate(eps)]  # c0 already has a sandbox
    # "raise": the k-th driver join fails, the k-1 before it are left again.
    # "interface": every driver join succeeds, then the k-th interface (which does not
    # exist) cannot be configured in its sandbox: all of them are left again.
    with pytest.raises(errors.KernelError if how == "interface" else RuntimeError):
        ctl.join_many(pairs)
    asked = k if how == "raise" else len(eps)
    assert drv.keys_seen_live == [True] * asked
    assert drv.joins == [ep.id for ep in eps[:asked]]
    done = drv.joins[: k - 1] if how == "raise" else drv.joins
    assert drv.leaves == list(reversed(done))
    _assert_nothing_joined(ctl, run_dir, eps, keep={os.path.basename(key)})
    assert existing.sandbox is not None
    assert_null_sandbox(key)


def test_join_many_failing_to_make_a_namespace_rolls_back(ctl, run_dir, monkeypatch) -> None:
    eps = ctl.create_network("n1", driver="null").create_endpoints([f"e{i}" for i in range(4)])
    worker = netns.worker()
    real = worker.create
    made: list[str] = []

    def create(path: str, prepare=None, **kwargs) -> None:
        if len(made) == 2:
            raise OSError(errno.ENOSPC, "injected namespace failure")
        real(path, prepare, **kwargs)
        made.append(path)

    monkeypatch.setattr(worker, "create", create)
    with pytest.raises(errors.KernelError, match="injected"):
        ctl.join_many([(ep, f"c{i}") for i, ep in enumerate(eps)])
    assert len(made) == 2 and not any(os.path.lexists(k) for k in made)
    _assert_nothing_joined(ctl, run_dir, eps, keep=set())


# --- the demo ------------------------------------------------------------------------------


def test_cnm_demo_leaves_nothing_behind(dirs) -> None:
    state_dir, run_dir = dirs
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnm.control.cli",
            "--state-dir",
            state_dir,
            "--run-dir",
            run_dir,
            "demo",
            "--containers",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert netns_dir(run_dir) == []
    assert nsfs_mounts(run_dir) == {}
    with NetworkController(state_dir=state_dir, run_dir=run_dir) as ctl:
        assert ctl.networks() == []
        assert ctl.sandboxes() == []
        assert ctl.store.endpoints() == []
        assert ctl.store.fetchall("SELECT * FROM ipam_pools") == []
        assert ctl.store.fetchall("SELECT * FROM ipam_addresses") == []
