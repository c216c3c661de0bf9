"""A sandbox's hosts / resolv.conf / hostname files follow its options and its joins."""

from __future__ import annotations

import os

import pytest

from cnm.control.osl.files import sandbox_dir

pytestmark = pytest.mark.privileged


def _read(run_dir: str, sid: str, name: str) -> str:
    with open(os.path.join(sandbox_dir(run_dir, sid), name)) as f:
        return f.read()


def test_files_follow_options_and_joins(ctl, dirs) -> None:
    run_dir = dirs[1]
    sb = ctl.create_sandbox(
        "c1",
        hostname="web1",
        dns=["192.0.2.53"],
        dns_search=["corp.example"],
        extra_hosts=["db:10.99.0.7"],
    )
    assert _read(run_dir, sb.id, "hostname") == "web1\n"
    resolv = _read(run_dir, sb.id, "resolv.conf")
    assert "nameserver 192.0.2.53" in resolv and "search corp.example" in resolv
    assert "10.99.0.7\tdb" in _read(run_dir, sb.id, "hosts")

    net = ctl.create_network("n1", driver="bridge")
    ep = net.create_endpoint("e1")
    ep.join(sb)
    assert f"{ep.ipv4_address.ip}\tweb1" in _read(run_dir, sb.id, "hosts")
    ep.leave(sb)
    hosts = _read(run_dir, sb.id, "hosts")
    assert str(ep.ipv4_address.ip) not in hosts and "localhost" in hosts
    sb.delete()
    assert not os.path.exists(sandbox_dir(run_dir, sb.id))
    ep.delete()
    net.delete()


def test_an_implicit_sandbox_takes_its_files_with_it(ctl, dirs) -> None:
    net = ctl.create_network("n1", driver="bridge")
    ep = net.create_endpoint("e1")
    ep.join("c2")
    sid = ep.sandbox.id
    assert os.path.exists(os.path.join(sandbox_dir(dirs[1], sid), "resolv.conf"))
    ep.leave("c2")
    assert not os.path.exists(sandbox_dir(dirs[1], sid))
    ep.delete()
    net.delete()


def test_reconcile_removes_files_nothing_owns(ctl, dirs) -> None:
    stray = sandbox_dir(dirs[1], "f" * 64)
    os.makedirs(stray)
    report = ctl.reconcile()
    assert report.kinds().get("orphan_sandbox_files_removed") == 1
    assert not os.path.exists(stray)
