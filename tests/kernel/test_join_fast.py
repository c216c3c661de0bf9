"""A join keeps network and sandbox records between joins (SQLiteStore.join_reads): two
controllers open on one state_dir at the same time still see each other's joins, leaves
and deletions at once, judged by the interfaces `ip` finds in the sandbox. And a refused
join changes nothing, in the order of its checks."""

from __future__ import annotations

import pytest

from cnm.control import IPAMConfig, NetworkController, errors

from .oracles import ns_links

pytestmark = [pytest.mark.privileged, pytest.mark.usefixtures("_unmount_leftovers")]


def test_two_controllers_at_once_see_each_others_joins(dirs: tuple[str, str]) -> None:
    with NetworkController(state_dir=dirs[0], run_dir=dirs[1], ebpf="off") as a:
        nets = [
            a.create_network(f"jf1{i}", ipv4=[IPAMConfig(subnet=f"10.96.{i}.0/24")])
            for i in range(3)
        ]
        e1, e2, e3 = (n.create_endpoint("e") for n in nets)
        sb = a.create_sandbox("jf1-c")
        e1.join(sb)  # a now keeps the networks' and the sandbox's records
        with NetworkController(state_dir=dirs[0], run_dir=dirs[1], ebpf="off") as b:
            assert b.network("jf10").endpoint("e").sandbox == sb
            b.network("jf11").endpoint("e").join("jf1-c")  # b sees eth0 taken: eth1
            e3.join(sb)  # a sees b's join: eth2
            assert {"eth0", "eth1", "eth2"} <= set(ns_links(sb.key))
            assert {e.id for e in a.sandbox("jf1-c").endpoints()} == {e1.id, e2.id, e3.id}
            b.sandbox("jf1-c").delete()  # b leaves all three and deletes it
        with pytest.raises(errors.SandboxNotFound):
            e1.join(sb)  # a's handle names a sandbox b deleted
        assert e1.refresh().to_dict()["join_state"] == ""
        key = e1.join("jf1-c")  # a new sandbox for the container
        assert key != sb.key and "eth0" in ns_links(key)
        a.sandbox("jf1-c").delete()
        a.delete_endpoints([e1, e2, e3])
        for n in nets:
            n.delete()


def test_a_refused_join_changes_nothing(ctl: NetworkController) -> None:
    net = ctl.create_network("jf2", ipv4=[IPAMConfig(subnet="10.96.1.0/24")])
    other = ctl.create_network("jf2b", ipv4=[IPAMConfig(subnet="10.96.2.0/24")])
    e1, e2 = net.create_endpoints(["e1", "e2"])
    (o1,) = other.create_endpoints(["o1"])
    sb = ctl.create_sandbox("jf2-c")
    gone = ctl.create_sandbox("jf2-gone")
    gone.delete()
    try:
        e1.join(sb)
        before = {e.name: e.refresh().to_dict() for e in (e1, e2, o1)}
        links = set(ns_links(sb.key))
        cases = [
            ([(e2, "jf2-d"), (e2, "jf2-d")], errors.InvalidParameter),  # twice in one call
            ([(e2, gone)], errors.SandboxNotFound),
            ([(e1, "jf2-d")], errors.EndpointJoined),
            ([(e2, sb)], errors.Conflict),  # the sandbox is on the network already
            ([(o1, "jf2-d"), (e2, sb)], errors.Conflict),  # all or nothing
        ]
        for pairs, error in cases:
            with pytest.raises(error):
                ctl.join_many(pairs)
            assert {e.name: e.refresh().to_dict() for e in (e1, e2, o1)} == before
            assert set(ns_links(sb.key)) == links
            assert [s.container_id for s in ctl.sandboxes()] == ["jf2-c"]
        # A deleted endpoint's handle comes before anything else is checked.
        ctl.delete_endpoints([e2])
        with pytest.raises(errors.EndpointNotFound):
            ctl.join_many([(e2, gone)])
        o1.join(sb)  # a good join still goes through after all the refusals
        assert {"eth0", "eth1"} <= set(ns_links(sb.key))
    finally:
        sb.delete()
        ctl.delete_endpoints([*net.endpoints(), *other.endpoints()])
        net.delete()
        other.delete()
