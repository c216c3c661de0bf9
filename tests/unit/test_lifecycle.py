"""The CNM lifecycle on the null driver, and the network driver contract, without joins.

Everything here is unprivileged: networks and endpoints of the null driver (and of an
in-process test driver) are store records only; nothing touches the kernel. Joins make
network namespaces and are covered by the privileged tests.

Note: this module deliberately does not use `from __future__ import annotations`, so the
test driver's options dataclass carries real type objects (`bool`, `int | None`), as a
driver module written that way would.
"""

import ipaddress
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control import controller as controller_mod
from cnm.control.driverapi import (
    Capability,
    DriverOptions,
    EndpointInfo,
    InterfaceInfo,
    JoinInfo,
    NetworkInfo,
    SandboxInfo,
    option,
)
from cnm.control.types import SandboxRecord

HEX64 = re.compile(r"[0-9a-f]{64}\Z")


# --- helpers ---------------------------------------------------------------------------


def ipam_tables(ctl: NetworkController) -> tuple[list[Any], list[Any]]:
    """The whole default-IPAM state, cursors included."""
    return (
        ctl.store.fetchall("SELECT * FROM ipam_pools ORDER BY pool_id"),
        ctl.store.fetchall("SELECT * FROM ipam_addresses ORDER BY pool_id, addr"),
    )


def pools(ctl: NetworkController) -> list[str]:
    return sorted(ctl.ipam_driver("default").pools())


def allocated(ctl: NetworkController, net: Any) -> list[tuple[str, str]]:
    """(address, kind) of every address allocated in the network's pools."""
    ipam = ctl.ipam_driver("default")
    out = []
    for p in (*net.record.ipv4, *net.record.ipv6):
        out += [(str(a), kind) for a, kind, _ in ipam.allocated(p.pool_id)]
    return out


def endpoint_rows(ctl: NetworkController) -> list[Any]:
    return ctl.store.fetchall("SELECT * FROM endpoints ORDER BY id")


def v4(subnet: str, **kw: Any) -> list[IPAMConfig]:
    return [IPAMConfig(subnet=subnet, **kw)]


def shared_first_char(ids: list[str]) -> str:
    counts = Counter(i[0] for i in ids)
    char, n = counts.most_common(1)[0]
    assert n >= 2  # 17 ids over 16 hex digits: guaranteed by pigeonhole
    return char


def shortest_unique_prefix(target: str, others: list[str]) -> str:
    for k in range(1, 65):
        if not any(o != target and o.startswith(target[:k]) for o in others):
            return target[:k]
    raise AssertionError("ids collide completely")


def sequential_ids(monkeypatch: pytest.MonkeyPatch, ids: list[str]) -> None:
    """Make the controller hand out exactly these ids, in order."""
    it: Iterator[str] = iter(ids)
    monkeypatch.setattr(controller_mod, "new_id", lambda: next(it))


def craft_sandbox(ctl: NetworkController, sid: str, container: str) -> SandboxRecord:
    """A sandbox record in the store only (no namespace): enough for look-ups."""
    rec = SandboxRecord(
        id=sid,
        container_id=container,
        key=ctl.namespaces.key(sid),
        explicit=True,
        hostname=None,
        dns=(),
        dns_search=(),
        extra_hosts=(),
        state="ready",
    )
    ctl.store.put_sandbox(rec)
    return rec


# --- networks --------------------------------------------------------------------------


def test_network_create_list_lookup_delete(ctl: NetworkController) -> None:
    assert ctl.networks() == []
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    assert net.name == "web"
    assert net.driver == "null"
    assert HEX64.match(net.id)
    assert net.to_dict()["state"] == "ready"
    assert ctl.networks() == [net]
    assert [n.name for n in ctl.networks()] == ["web"]
    assert ctl.network("web") == net
    assert ctl.network(net.id) == net
    assert ctl.network(net.id[:12]) == net
    assert pools(ctl) == ["LocalDefault/10.20.0.0/24"]

    net.delete()
    assert ctl.networks() == []
    with pytest.raises(errors.NetworkNotFound):
        ctl.network("web")
    with pytest.raises(errors.NetworkNotFound):
        ctl.network(net.id)
    assert pools(ctl) == []
    assert ipam_tables(ctl) == ([], [])

    # The name and the subnet are free again.
    again = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    assert again.id != net.id
    assert ctl.networks() == [again]


def test_networks_lists_every_network(ctl: NetworkController) -> None:
    a = ctl.create_network("a", driver="null", ipv4=v4("10.20.0.0/24"))
    b = ctl.create_network("b", driver="null", ipv4=v4("10.21.0.0/24"))
    c = ctl.create_network("c", driver="null")  # a free default pool
    assert {n.id for n in ctl.networks()} == {a.id, b.id, c.id}
    assert len({str(s) for n in ctl.networks() for s in n.subnets}) == 3
    b.delete()
    assert {n.id for n in ctl.networks()} == {a.id, c.id}


def test_network_delete_refused_while_it_has_endpoints(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    e1 = net.create_endpoint("ep1")
    e2 = net.create_endpoint("ep2")
    before = ipam_tables(ctl)
    with pytest.raises(errors.ActiveEndpoints) as info:
        net.delete()
    assert isinstance(info.value, errors.Conflict)
    assert info.value.network == "web"
    assert info.value.endpoints == ["ep1", "ep2"]
    assert "ep1" in str(info.value)
    assert ctl.network("web").to_dict()["state"] == "ready"
    assert ipam_tables(ctl) == before

    e1.delete()
    with pytest.raises(errors.ActiveEndpoints) as info:
        net.delete()
    assert info.value.endpoints == ["ep2"]
    e2.delete()
    net.delete()
    assert ctl.networks() == []
    assert pools(ctl) == []


def test_stale_network_handle_after_delete(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    net.delete()
    with pytest.raises(errors.NetworkNotFound):
        net.delete()
    with pytest.raises(errors.NetworkNotFound):
        net.create_endpoint("ep1")
    assert endpoint_rows(ctl) == []
    assert ipam_tables(ctl) == ([], [])


def test_network_names_are_unique(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    before = ipam_tables(ctl)
    for kwargs in ({}, {"ipv4": v4("10.21.0.0/24")}, {"ipam_driver": "null"}):
        with pytest.raises(errors.NameInUse) as info:
            ctl.create_network("web", driver="null", **kwargs)
        assert isinstance(info.value, errors.Conflict)
        assert info.value.name == "web"
        assert ctl.networks() == [net]
        assert ipam_tables(ctl) == before


def test_overlapping_subnets_between_networks_conflict(ctl: NetworkController) -> None:
    a = ctl.create_network("a", driver="null", ipv4=v4("10.20.0.0/16"))
    before = ipam_tables(ctl)
    for subnet in ("10.20.0.0/16", "10.20.5.0/24", "10.0.0.0/8"):
        with pytest.raises(errors.Conflict) as info:
            ctl.create_network("b", driver="null", ipv4=v4(subnet))
        assert isinstance(info.value, errors.PoolOverlap)
        assert subnet in str(info.value)
        assert ctl.networks() == [a]
        assert ipam_tables(ctl) == before
    # A network on a default pool never takes a subnet already in use...
    d = ctl.create_network("d", driver="null")
    assert not d.subnets[0].overlaps(ipaddress.ip_network("10.20.0.0/16"))
    # ...and an explicit request for a default network's subnet conflicts.
    with pytest.raises(errors.PoolOverlap):
        ctl.create_network("e", driver="null", ipv4=v4(str(d.subnets[0])))
    # IPv6 pools conflict the same way.
    ctl.create_network(
        "v6a", driver="null", ipv4=v4("10.30.0.0/24"), ipv6=v4("fd00:1::/64"), enable_ipv6=True
    )
    with pytest.raises(errors.PoolOverlap):
        ctl.create_network(
            "v6b", driver="null", ipv4=v4("10.31.0.0/24"), ipv6=v4("fd00:1::/48"), enable_ipv6=True
        )
    assert "v6b" not in [n.name for n in ctl.networks()]
    assert "LocalDefault/10.31.0.0/24" not in pools(ctl)
    # Once the first network is gone, its subnet is free.
    a.delete()
    ctl.create_network("b", driver="null", ipv4=v4("10.20.5.0/24"))


def test_drivers_lists_null_and_unknown_driver_is_not_found(ctl: NetworkController) -> None:
    assert "null" in ctl.drivers()
    with pytest.raises(errors.DriverNotFound) as info:
        ctl.create_network("web", driver="no-such-driver")
    assert isinstance(info.value, errors.NotFound)
    assert isinstance(info.value, LookupError)
    assert info.value.driver == "no-such-driver"
    with pytest.raises(errors.DriverNotFound):
        ctl.create_network("web", driver="null", ipam_driver="no-such-ipam")
    assert ctl.networks() == []
    assert ipam_tables(ctl) == ([], [])


# --- endpoints -------------------------------------------------------------------------


def test_endpoint_create_lookup_delete(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    ep = net.create_endpoint("ep1")
    assert ep.name == "ep1"
    assert HEX64.match(ep.id)
    assert ep.network == net
    assert ep.sandbox is None
    assert ep.to_dict()["state"] == "ready"
    assert net.endpoints() == [ep]
    assert net.endpoint("ep1") == ep
    assert net.endpoint(ep.id) == ep
    assert net.endpoint(ep.id[:10]) == ep
    assert ("10.20.0.2", "endpoint") in allocated(ctl, net)

    ep.delete()
    assert net.endpoints() == []
    with pytest.raises(errors.EndpointNotFound) as info:
        net.endpoint("ep1")
    assert info.value.endpoint == "ep1"
    assert info.value.network == "web"
    with pytest.raises(errors.EndpointNotFound):
        net.endpoint(ep.id)
    with pytest.raises(errors.EndpointNotFound):
        ep.delete()
    assert allocated(ctl, net) == [("10.20.0.1", "gateway")]
    net.delete()


def test_create_endpoints_batch(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    eps = net.create_endpoints(["a1", "a2", "a3"])
    assert [e.name for e in eps] == ["a1", "a2", "a3"]
    assert net.endpoints() == eps
    addrs = [e.ipv4_address for e in eps]
    assert len(set(addrs)) == 3
    assert all(a is not None and a.network == ipaddress.ip_network("10.20.0.0/24") for a in addrs)
    assert len({e.mac_address for e in eps}) == 3
    assert all(e.to_dict()["state"] == "ready" for e in eps)
    assert net.create_endpoints([]) == []
    assert net.endpoints() == eps


def test_create_endpoints_duplicate_in_batch_leaves_nothing(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    existing = net.create_endpoint("e0")
    before_rows, before_ipam = endpoint_rows(ctl), ipam_tables(ctl)
    with pytest.raises(errors.NameInUse) as info:
        net.create_endpoints(["a", "b", "a"])
    assert info.value.name == "a"
    assert endpoint_rows(ctl) == before_rows
    assert ipam_tables(ctl) == before_ipam
    assert net.endpoints() == [existing]


def test_create_endpoints_taken_name_leaves_nothing(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    existing = net.create_endpoint("e0")
    before_rows, before_ipam = endpoint_rows(ctl), ipam_tables(ctl)
    # The taken name comes last: the earlier names were already given addresses.
    with pytest.raises(errors.NameInUse) as info:
        net.create_endpoints(["a", "b", "c", "e0"])
    assert info.value.name == "e0"
    assert endpoint_rows(ctl) == before_rows
    assert ipam_tables(ctl) == before_ipam  # addresses and the allocation cursor
    assert net.endpoints() == [existing]
    # The batch can be retried once the clash is gone, and gets the same addresses.
    eps = net.create_endpoints(["a", "b", "c"])
    assert [str(e.ipv4_address) for e in eps] == ["10.20.0.3/24", "10.20.0.4/24", "10.20.0.5/24"]


def test_delete_endpoints(ctl: NetworkController) -> None:
    n1 = ctl.create_network("n1", driver="null", ipv4=v4("10.20.0.0/24"))
    n2 = ctl.create_network("n2", driver="null", ipv4=v4("10.21.0.0/24"))
    eps = n1.create_endpoints(["a", "b", "c"])
    other = n2.create_endpoint("a")
    keep = n1.create_endpoint("keep")
    ctl.delete_endpoints([*eps, other, eps[0]])  # a repeated endpoint is deleted once
    assert n1.endpoints() == [keep]
    assert n2.endpoints() == []
    assert sorted(allocated(ctl, n1)) == [("10.20.0.1", "gateway"), ("10.20.0.5", "endpoint")]
    assert allocated(ctl, n2) == [("10.21.0.1", "gateway")]
    with pytest.raises(errors.EndpointNotFound):
        ctl.delete_endpoints([eps[1]])
    ctl.delete_endpoints([])
    assert n1.endpoints() == [keep]
    n2.delete()


def test_endpoint_names_unique_per_network(ctl: NetworkController) -> None:
    n1 = ctl.create_network("n1", driver="null", ipv4=v4("10.20.0.0/24"))
    n2 = ctl.create_network("n2", driver="null", ipv4=v4("10.21.0.0/24"))
    a1 = n1.create_endpoint("same")
    a2 = n2.create_endpoint("same")  # the same name in another network is fine
    assert a1.id != a2.id
    assert n1.endpoint("same") == a1
    assert n2.endpoint("same") == a2
    before_rows, before_ipam = endpoint_rows(ctl), ipam_tables(ctl)
    with pytest.raises(errors.NameInUse) as info:
        n1.create_endpoint("same")
    assert isinstance(info.value, errors.Conflict)
    assert info.value.name == "same"
    with pytest.raises(errors.NameInUse):
        n2.create_endpoint("same", ipv4_address="10.21.0.77")
    assert endpoint_rows(ctl) == before_rows
    assert ipam_tables(ctl) == before_ipam
    # An endpoint is found only through its own network, by name or id.
    with pytest.raises(errors.EndpointNotFound):
        n1.endpoint(a2.id)


def test_ids_are_64_lowercase_hex(ctl: NetworkController) -> None:
    nets = [ctl.create_network(f"n{i}", driver="null", ipam_driver="null") for i in range(3)]
    eps = nets[0].create_endpoints([f"e{i}" for i in range(5)])
    ids = [o.id for o in (*nets, *eps)]
    assert all(HEX64.match(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    assert all(HEX64.match(r[0]) for r in ctl.store.fetchall("SELECT id FROM networks"))


# --- look-ups --------------------------------------------------------------------------


def test_network_lookup_by_name_id_and_prefix(ctl: NetworkController) -> None:
    a = ctl.create_network("alpha", driver="null", ipam_driver="null")
    assert ctl.network("alpha") == a
    assert ctl.network(a.id) == a
    for k in (1, 5, 12, 63):
        assert ctl.network(a.id[:k]) == a
    # An upper-case id is not the id.
    with pytest.raises(errors.NetworkNotFound):
        ctl.network(a.id.upper())
    # An exact name wins over an id prefix that happens to spell it.
    b = ctl.create_network(a.id[:8], driver="null", ipam_driver="null")
    assert ctl.network(a.id[:8]) == b
    assert ctl.network(a.id[:9]) == a
    assert ctl.network(b.id) == b


def test_ambiguous_network_prefix(ctl: NetworkController) -> None:
    nets = [ctl.create_network(f"n{i}", driver="null", ipam_driver="null") for i in range(17)]
    ids = [n.id for n in nets]
    char = shared_first_char(ids)
    sharing = sorted(i for i in ids if i.startswith(char))
    with pytest.raises(errors.AmbiguousReference) as info:
        ctl.network(char)
    assert isinstance(info.value, errors.Conflict)
    assert isinstance(info.value, ValueError)
    assert info.value.kind == "network"
    assert info.value.ref == char
    assert sorted(info.value.matches) == sharing
    for target in sharing:
        assert ctl.network(shortest_unique_prefix(target, ids)).id == target


def test_ambiguous_endpoint_prefix(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipam_driver="null")
    eps = net.create_endpoints([f"ep-{i}" for i in range(17)])  # names no prefix can spell
    ids = [e.id for e in eps]
    char = shared_first_char(ids)
    sharing = sorted(i for i in ids if i.startswith(char))
    with pytest.raises(errors.AmbiguousReference) as info:
        net.endpoint(char)
    assert info.value.kind == "endpoint"
    assert sorted(info.value.matches) == sharing
    for target in sharing:
        assert net.endpoint(shortest_unique_prefix(target, ids)).id == target


def test_endpoint_prefix_is_scoped_to_its_network(
    ctl: NetworkController, monkeypatch: pytest.MonkeyPatch
) -> None:
    n1_id, n2_id = "1" * 64, "2" * 64
    e1_id, e2_id = "ab" + "0" * 62, "ab" + "1" * 62
    sequential_ids(monkeypatch, [n1_id, n2_id, e1_id, e2_id])
    n1 = ctl.create_network("n1", driver="null", ipam_driver="null")
    n2 = ctl.create_network("n2", driver="null", ipam_driver="null")
    e1 = n1.create_endpoint("x")
    e2 = n2.create_endpoint("x")
    assert (n1.id, n2.id, e1.id, e2.id) == (n1_id, n2_id, e1_id, e2_id)
    # "ab" prefixes both endpoint ids, but only one per network: no ambiguity.
    assert n1.endpoint("ab") == e1
    assert n2.endpoint("ab") == e2
    with pytest.raises(errors.EndpointNotFound):
        n1.endpoint("ab1")


def test_sandbox_lookup_by_container_id_and_prefix(ctl: NetworkController) -> None:
    s1 = craft_sandbox(ctl, "ab" + "0" * 62, "c1")
    s2 = craft_sandbox(ctl, "ac" + "0" * 62, "c2")
    assert [s.id for s in ctl.sandboxes()] == [s1.id, s2.id]
    assert ctl.sandbox("c1").id == s1.id
    assert ctl.sandbox("c1").container_id == "c1"
    assert ctl.sandbox(s2.id).container_id == "c2"
    assert ctl.sandbox("ab").id == s1.id
    assert ctl.sandbox("ac").id == s2.id
    assert ctl.sandbox("c1").endpoints() == []
    with pytest.raises(errors.AmbiguousReference) as info:
        ctl.sandbox("a")
    assert info.value.kind == "sandbox"
    assert sorted(info.value.matches) == [s1.id, s2.id]
    with pytest.raises(errors.SandboxNotFound) as nf:
        ctl.sandbox("c3")
    assert nf.value.sandbox == "c3"
    with pytest.raises(errors.SandboxNotFound):
        ctl.sandbox("ad")


def test_create_sandbox_refused_for_a_container_that_has_one(ctl: NetworkController) -> None:
    craft_sandbox(ctl, "ab" + "0" * 62, "c1")
    before = ctl.store.fetchall("SELECT * FROM sandboxes")
    with pytest.raises(errors.NameInUse) as info:
        ctl.create_sandbox("c1")
    assert info.value.name == "c1"
    assert ctl.store.fetchall("SELECT * FROM sandboxes") == before
    assert not os.path.exists(ctl.namespaces.dir)  # the kernel was never asked


def test_not_found_errors(ctl: NetworkController) -> None:
    n1 = ctl.create_network("n1", driver="null", ipv4=v4("10.20.0.0/24"))
    n2 = ctl.create_network("n2", driver="null", ipv4=v4("10.21.0.0/24"))
    e2 = n2.create_endpoint("e2")
    cases: list[tuple[Any, type[errors.NotFound]]] = [
        (lambda: ctl.network("nope"), errors.NetworkNotFound),
        (lambda: ctl.network("0" * 64), errors.NetworkNotFound),
        (lambda: ctl.network("deadbeef"), errors.NetworkNotFound),
        (lambda: n1.endpoint("nope"), errors.EndpointNotFound),
        (lambda: n1.endpoint("e2"), errors.EndpointNotFound),
        (lambda: n1.endpoint(e2.id), errors.EndpointNotFound),
        (lambda: n1.endpoint(e2.id[:12]), errors.EndpointNotFound),
        (lambda: ctl.sandbox("nope"), errors.SandboxNotFound),
        (lambda: ctl.sandbox("0" * 64), errors.SandboxNotFound),
    ]
    for call, kind in cases:
        with pytest.raises(kind) as info:
            call()
        assert isinstance(info.value, errors.NotFound)
        assert isinstance(info.value, LookupError)
        assert isinstance(info.value, errors.CNMError)
    with pytest.raises(errors.NetworkNotFound) as nf:
        ctl.network("nope")
    assert nf.value.network == "nope"
    assert "nope" in str(nf.value)


def test_error_categories_derive_from_builtins() -> None:
    assert issubclass(errors.NotFound, LookupError)
    assert issubclass(errors.InvalidParameter, ValueError)
    assert issubclass(errors.Conflict, ValueError)
    assert issubclass(errors.Unavailable, RuntimeError)
    assert issubclass(errors.Unsupported, NotImplementedError)
    for cls in (
        errors.NetworkNotFound,
        errors.EndpointNotFound,
        errors.SandboxNotFound,
        errors.DriverNotFound,
        errors.AddressNotFound,
    ):
        assert issubclass(cls, errors.NotFound)
    for cls in (
        errors.NameInUse,
        errors.AmbiguousReference,
        errors.ActiveEndpoints,
        errors.EndpointJoined,
        errors.EndpointNotJoined,
        errors.AddressInUse,
        errors.PoolOverlap,
    ):
        assert issubclass(cls, errors.Conflict)
    assert issubclass(errors.PoolExhausted, errors.Unavailable)
    assert issubclass(errors.PluginError, errors.Unavailable)
    assert issubclass(errors.KernelError, OSError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.CNMError), name
    # Concrete errors carry the object they are about.
    assert errors.NetworkNotFound("web").network == "web"
    assert errors.AddressInUse("10.20.0.5").address == "10.20.0.5"
    assert errors.PoolExhausted("10.20.0.0/24").pool == "10.20.0.0/24"
    active = errors.ActiveEndpoints("web", ["ep1"])
    assert (active.network, active.endpoints) == ("web", ["ep1"])
    assert errors.KernelError(17, "exists").errno == 17
    plugin = errors.PluginError("p", "CreateNetwork", "boom")
    assert (plugin.plugin, plugin.method, plugin.message) == ("p", "CreateNetwork", "boom")


# --- addresses -------------------------------------------------------------------------


def test_endpoint_addresses_and_mac(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    ep = net.create_endpoint("ep1")
    assert isinstance(ep.ipv4_address, ipaddress.IPv4Interface)
    assert ep.ipv4_address == ipaddress.IPv4Interface("10.20.0.2/24")
    assert ep.ipv6_address is None
    assert ep.mac_address == "02:42:0a:14:00:02"

    static = net.create_endpoint("ep2", ipv4_address="10.20.0.50")
    assert static.ipv4_address == ipaddress.IPv4Interface("10.20.0.50/24")
    assert static.mac_address == "02:42:0a:14:00:32"
    # A CIDR form is accepted; the pool's prefix is what the endpoint gets.
    cidr = net.create_endpoint("ep3", ipv4_address="10.20.0.51/16")
    assert cidr.ipv4_address == ipaddress.IPv4Interface("10.20.0.51/24")

    mac = net.create_endpoint("ep4", mac_address="02-AA-BB-CC-DD-EE")
    assert mac.mac_address == "02:aa:bb:cc:dd:ee"
    assert mac.ipv4_address == ipaddress.IPv4Interface("10.20.0.3/24")

    # Looked up again, the endpoint reads the same from the store.
    assert net.endpoint("ep2").ipv4_address == static.ipv4_address
    assert net.endpoint("ep4").mac_address == "02:aa:bb:cc:dd:ee"


def test_static_address_in_use_is_refused(ctl: NetworkController) -> None:
    net = ctl.create_network("web", driver="null", ipv4=v4("10.20.0.0/24"))
    net.create_endpoint("ep1", ipv4_address="10.20.0.50")
    before_rows, before_ipam = endpoint_rows(ctl), ipam_tables(ctl)
    for addr in ("10.20.0.50", "10.20.0.1"):  # another endpoint's, the gateway's
        with pytest.raises(errors.AddressInUse) as info:
            net.create_endpoint("ep2", ipv4_address=addr)
        assert info.value.address == addr
        assert endpoint_rows(ctl) == before_rows
        assert ipam_tables(ctl) == before_ipam


def test_static_address_in_subnet_outside_ip_range_is_honoured(ctl: NetworkController) -> None:
    net = ctl.create_network(
        "web", driver="null", ipv4=v4("10.20.0.0/24", ip_range="10.20.0.128/25")
    )
    assert net.create_endpoint("auto").ipv4_address == ipaddress.IPv4Interface("10.20.0.128/24")
    ep = net.create_endpoint("static", ipv4_address="10.20.0.5")
    assert ep.ipv4_address == ipaddress.IPv4Interface("10.20.0.5/24")


def test_enable_ipv6_gives_ipv6_addresses(ctl: NetworkController) -> None:
    net = ctl.create_network(
        "v6", driver="null", ipv4=v4("10.20.0.0/24"), ipv6=v4("fd00:20::/64"), enable_ipv6=True
    )
    assert net.enable_ipv6
    ep = net.create_endpoint("ep1")
    assert isinstance(ep.ipv4_address, ipaddress.IPv4Interface)
    assert isinstance(ep.ipv6_address, ipaddress.IPv6Interface)
    assert ep.ipv6_address == ipaddress.IPv6Interface("fd00:20::2/64")
    assert ep.mac_address == "02:42:0a:14:00:02"
    static = net.create_endpoint("ep2", ipv6_address="fd00:20::99")
    assert static.ipv6_address == ipaddress.IPv6Interface("fd00:20::99/64")
    d = net.to_dict()
    assert d["ipv6"][0]["subnet"] == "fd00:20::/64"
    assert d["ipv6"][0]["gateway"] == "fd00:20::1/64"

    # Without explicit IPv6 pools, a free default (ULA) /64 is taken.
    auto = ctl.create_network("v6auto", driver="null", ipv4=v4("10.21.0.0/24"), enable_ipv6=True)
    subnet6 = ipaddress.ip_network(auto.to_dict()["ipv6"][0]["subnet"])
    assert subnet6.version == 6 and subnet6.prefixlen == 64
    ep6 = auto.create_endpoint("ep1").ipv6_address
    assert ep6 is not None and ep6.network == subnet6

    # Without enable_ipv6: no IPv6 pool, no IPv6 address.
    plain = ctl.create_network("plain", driver="null", ipv4=v4("10.22.0.0/24"))
    assert plain.to_dict()["ipv6"] == []
    assert plain.create_endpoint("ep1").ipv6_address is None


def test_explicit_ipam_config_is_reflected(ctl: NetworkController) -> None:
    net = ctl.create_network(
        "web",
        driver="null",
        ipv4=v4(
            "10.30.0.0/16",
            gateway="10.30.0.254",
            ip_range="10.30.5.0/24",
            aux_addresses={"router": "10.30.0.10", "reserved": "10.30.5.0"},
        ),
        internal=True,
        options={"com.docker.network.driver.mtu": "1400"},
        labels={"team": "web", "tier": "front"},
        ipam_options={"com.example.ipam": "x"},
    )
    d = net.to_dict()
    assert d["ipv4"] == [
        {
            "pool_id": "LocalDefault/10.30.0.0/16/10.30.5.0/24",
            "subnet": "10.30.0.0/16",
            "gateway": "10.30.0.254/16",
            "ip_range": "10.30.5.0/24",
            "aux_addresses": {"router": "10.30.0.10/16", "reserved": "10.30.5.0/16"},
        }
    ]
    assert d["internal"] is True
    assert d["options"] == {"com.docker.network.driver.mtu": "1400"}
    assert d["labels"] == {"team": "web", "tier": "front"}
    assert d["ipam_options"] == {"com.example.ipam": "x"}
    assert d["driver"] == "null" and d["ipam_driver"] == "default"
    assert net.subnets == [ipaddress.ip_network("10.30.0.0/16")]
    assert net.gateways == [ipaddress.ip_interface("10.30.0.254/16")]
    # The same record comes back from the store.
    assert ctl.network("web").to_dict() == d
    # Endpoints come from the range (whose first address, 10.30.5.0, is an ordinary host
    # of the /16), skipping the reserved aux address.
    ep = net.create_endpoint("ep1")
    assert ep.ipv4_address == ipaddress.IPv4Interface("10.30.5.1/16")
    assert sorted(allocated(ctl, net)) == [
        ("10.30.0.10", "aux"),
        ("10.30.0.254", "gateway"),
        ("10.30.5.0", "aux"),
        ("10.30.5.1", "endpoint"),
    ]


def test_null_ipam_gives_no_address(ctl: NetworkController) -> None:
    net = ctl.create_network("noaddr", driver="null", ipam_driver="null", enable_ipv6=True)
    d = net.to_dict()
    assert d["ipam_driver"] == "null"
    assert d["ipv4"] == [] and d["ipv6"] == []
    eps = [net.create_endpoint("ep1"), *net.create_endpoints(["ep2", "ep3"])]
    for ep in eps:
        assert ep.ipv4_address is None
        assert ep.ipv6_address is None
        mac = bytes.fromhex(ep.mac_address.replace(":", ""))
        assert len(mac) == 6 and mac[0] & 0x02 and not mac[0] & 0x01  # local unicast
    assert len({e.mac_address for e in eps}) == 3
    assert pools(ctl) == []
    with pytest.raises(errors.InvalidParameter, match="no address pool"):
        net.create_endpoint("ep4", ipv4_address="10.20.0.5")
    ctl.delete_endpoints(eps)
    net.delete()
    assert ctl.networks() == []


# --- the driver contract ---------------------------------------------------------------


class Boom(RuntimeError):
    """The test driver's own failure."""


@dataclass(frozen=True)
class RecOptions(DriverOptions):
    flag: bool = option("com.example.flag", default=False)
    count: int = option("com.example.count", default=0)
    limit: int | None = option("com.example.limit", default=None)
    mode: str = option("com.example.mode", default="a")

    def check(self) -> None:
        if self.mode not in ("a", "b"):
            raise errors.InvalidParameter(f"option 'com.example.mode': {self.mode!r} is not a or b")


class RecordingDriver:
    """An in-process driver that records every call and fails on request."""

    capability = Capability(data_scope="local", connectivity_scope="local")
    options_type = RecOptions

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.networks: dict[str, NetworkInfo] = {}
        self.endpoints: dict[str, EndpointInfo] = {}
        self.created: list[str] = []  # endpoint ids create_endpoint accepted
        self.deleted: list[str] = []  # endpoint ids delete_endpoint was called for
        self.attempts = 0
        self.fail_create_network = False
        self.fail_delete_network = False
        self.fail_endpoint_at: int | None = None  # fail the n-th create_endpoint (0-based)
        self.reply: Any = None  # callable(EndpointInfo) -> InterfaceInfo | None

    def create_network(self, network: NetworkInfo) -> None:
        if self.fail_create_network:
            raise Boom("create_network failed")
        self.networks[network.id] = network

    def delete_network(self, network_id: str) -> None:
        if self.fail_delete_network:
            raise Boom("delete_network failed")
        self.networks.pop(network_id, None)

    def create_endpoint(self, endpoint: EndpointInfo) -> InterfaceInfo | None:
        n = self.attempts
        self.attempts += 1
        if self.fail_endpoint_at is not None and n == self.fail_endpoint_at:
            raise Boom(f"create_endpoint {endpoint.name} failed")
        self.endpoints[endpoint.id] = endpoint
        self.created.append(endpoint.id)
        return self.reply(endpoint) if self.reply else None

    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None:
        self.deleted.append(endpoint_id)
        self.endpoints.pop(endpoint_id, None)

    def join(self, network_id: str, endpoint_id: str, sandbox: SandboxInfo) -> JoinInfo:
        raise AssertionError("no joins in unprivileged tests")

    def leave(self, network_id: str, endpoint_id: str) -> None:
        raise AssertionError("no joins in unprivileged tests")


@pytest.fixture
def drv(ctl: NetworkController) -> RecordingDriver:
    d = RecordingDriver()
    ctl.registry.register(d)
    return d


def test_custom_driver_is_registered(ctl: NetworkController, drv: RecordingDriver) -> None:
    assert "rec" in ctl.drivers()
    assert "null" in ctl.drivers()
    with pytest.raises(errors.NameInUse):
        ctl.registry.register(RecordingDriver("rec"))
    with pytest.raises(errors.InvalidParameter, match="Driver protocol"):
        ctl.registry.register(object())  # type: ignore[arg-type]
    net = ctl.create_network("web", driver="rec", ipv4=v4("10.20.0.0/24"))
    info = drv.networks[net.id]
    assert (info.id, info.name) == (net.id, "web")
    assert [p.subnet for p in info.ipv4] == ["10.20.0.0/24"]
    assert info.ipv4[0].gateway == "10.20.0.1/24"
    ep = net.create_endpoint("ep1", options={"k": "v"})
    einfo = drv.endpoints[ep.id]
    assert (einfo.name, einfo.network_id, dict(einfo.options)) == ("ep1", net.id, {"k": "v"})
    assert einfo.interface.ipv4_address == ipaddress.IPv4Interface("10.20.0.2/24")
    ep.delete()
    assert drv.deleted == [ep.id]
    net.delete()
    assert drv.networks == {}


def test_typed_options_reach_the_driver(ctl: NetworkController, drv: RecordingDriver) -> None:
    raw = {
        "com.example.flag": "yes",
        "com.example.count": "3",
        "com.example.mode": "b",
        "com.docker.network.driver.mtu": "1400",  # generic: accepted, not the driver's
        "com.docker.network.internal": "false",
        "com.docker.network.enable_ipv6": "false",
    }
    net = ctl.create_network("web", driver="rec", options=raw, ipam_driver="null")
    assert drv.networks[net.id].options == RecOptions(flag=True, count=3, mode="b")
    assert net.options == raw
    for text, value in (("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False)):
        opts = RecOptions.parse({"com.example.flag": text})
        assert opts.flag is value
    assert RecOptions.parse(None) == RecOptions()
    assert RecOptions.parse({"com.example.count": "-7"}).count == -7


def test_optional_typed_option_is_converted(ctl: NetworkController, drv: RecordingDriver) -> None:
    net = ctl.create_network(
        "web", driver="rec", options={"com.example.limit": "7"}, ipam_driver="null"
    )
    assert drv.networks[net.id].options.limit == 7
    with pytest.raises(errors.InvalidParameter, match=re.escape("com.example.limit")):
        ctl.create_network(
            "web2", driver="rec", options={"com.example.limit": "many"}, ipam_driver="null"
        )
    assert [n.name for n in ctl.networks()] == ["web"]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"com.example.nope": "1"}, "com.example.nope"),
        ({"com.docker.network.bridge.name": "br0"}, "com.docker.network.bridge.name"),
        ({"com.example.flag": "maybe"}, "com.example.flag"),
        ({"com.example.flag": ""}, "com.example.flag"),
        ({"com.example.count": "3.5"}, "com.example.count"),
        ({"com.example.count": "0x10"}, "com.example.count"),
        ({"com.example.count": "three"}, "com.example.count"),
        ({"com.example.mode": "c"}, "com.example.mode"),
    ],
)
def test_bad_driver_options_are_rejected(
    ctl: NetworkController, drv: RecordingDriver, options: dict[str, str], key: str
) -> None:
    with pytest.raises(errors.InvalidParameter) as info:
        ctl.create_network("web", driver="rec", options=options, ipv4=v4("10.20.0.0/24"))
    assert key in str(info.value)
    assert drv.networks == {}
    assert ctl.networks() == []
    assert ipam_tables(ctl) == ([], [])


def test_null_driver_accepts_only_generic_options(ctl: NetworkController) -> None:
    generic = {
        "com.docker.network.driver.mtu": "1500",
        "com.docker.network.internal": "true",
        "com.docker.network.enable_ipv6": "false",
    }
    net = ctl.create_network("web", driver="null", options=generic, ipam_driver="null")
    assert net.options == generic
    with pytest.raises(errors.InvalidParameter, match=re.escape("'com.example.flag'")):
        ctl.create_network("web2", driver="null", options={"com.example.flag": "true"})
    assert ctl.networks() == [net]


def test_driver_failing_create_network_leaves_nothing(
    ctl: NetworkController, drv: RecordingDriver
) -> None:
    drv.fail_create_network = True
    for kwargs in (
        {"ipv4": v4("10.20.0.0/24", gateway="10.20.0.254", aux_addresses={"r": "10.20.0.9"})},
        {"ipv4": v4("10.21.0.0/24"), "ipv6": v4("fd00:21::/64"), "enable_ipv6": True},
        {},  # default pools
    ):
        with pytest.raises(Boom):
            ctl.create_network("web", driver="rec", **kwargs)
        assert ctl.networks() == []
        assert ctl.store.network_by_name("web") is None
        assert ctl.store.fetchall("SELECT * FROM networks") == []
        assert ctl.ipam_driver("default").pools() == []
        assert ipam_tables(ctl) == ([], [])
    # Once the driver works, the same name and subnet can be used.
    drv.fail_create_network = False
    net = ctl.create_network("web", driver="rec", ipv4=v4("10.20.0.0/24"))
    assert ctl.networks() == [net]


def test_driver_failing_create_endpoint_leaves_nothing(
    ctl: NetworkController, drv: RecordingDriver
) -> None:
    net = ctl.create_network(
        "web", driver="rec", ipv4=v4("10.20.0.0/24"), ipv6=v4("fd00:20::/64"), enable_ipv6=True
    )
    gateways = allocated(ctl, net)
    drv.fail_endpoint_at = 0
    with pytest.raises(Boom):
        net.create_endpoint("ep1", ipv4_address="10.20.0.9", mac_address="02:00:00:00:00:09")
    assert net.endpoints() == []
    assert endpoint_rows(ctl) == []
    assert allocated(ctl, net) == gateways
    assert drv.created == []
    # The endpoint can be created once the driver works, with the same static address.
    drv.fail_endpoint_at = None
    ep = net.create_endpoint("ep1", ipv4_address="10.20.0.9")
    assert ep.ipv4_address == ipaddress.IPv4Interface("10.20.0.9/24")


def test_driver_failing_partway_through_a_batch_leaves_nothing(
    ctl: NetworkController, drv: RecordingDriver
) -> None:
    net = ctl.create_network("web", driver="rec", ipv4=v4("10.20.0.0/24"))
    keep = net.create_endpoint("keep")
    before = allocated(ctl, net)
    drv.created.clear()
    drv.attempts = 0
    drv.fail_endpoint_at = 2
    with pytest.raises(Boom):
        net.create_endpoints(["a1", "a2", "a3", "a4", "a5"])
    assert len(drv.created) == 2
    # delete_endpoint was called for every endpoint the driver had already created.
    assert set(drv.created) <= set(drv.deleted)
    assert set(drv.endpoints) == {keep.id}
    assert net.endpoints() == [keep]
    assert [r[0] for r in endpoint_rows(ctl)] == [keep.id]
    assert allocated(ctl, net) == before


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            lambda e: InterfaceInfo(ipv4_address=ipaddress.IPv4Interface("10.20.0.99/24")),
            id="ipv4-changed",
        ),
        pytest.param(
            lambda e: InterfaceInfo(ipv4_address=ipaddress.IPv4Interface("10.20.0.2/16")),
            id="ipv4-prefix-changed",
        ),
        pytest.param(
            lambda e: InterfaceInfo(ipv6_address=ipaddress.IPv6Interface("fd00:20::99/64")),
            id="ipv6-changed",
        ),
        pytest.param(lambda e: InterfaceInfo(mac_address="02:00:00:00:00:99"), id="mac-changed"),
    ],
)
def test_driver_changing_a_set_field_is_a_driver_error(
    ctl: NetworkController, drv: RecordingDriver, reply: Any
) -> None:
    net = ctl.create_network(
        "web", driver="rec", ipv4=v4("10.20.0.0/24"), ipv6=v4("fd00:20::/64"), enable_ipv6=True
    )
    before = allocated(ctl, net)
    drv.reply = reply
    with pytest.raises(errors.DriverError) as info:
        net.create_endpoint("ep1", mac_address="02:00:00:00:00:01")
    assert isinstance(info.value, errors.CNMError)
    assert info.value.driver == "rec"
    assert net.endpoints() == []
    assert endpoint_rows(ctl) == []
    assert allocated(ctl, net) == before
    assert drv.created and set(drv.created) <= set(drv.deleted)
    assert drv.endpoints == {}


def test_driver_setting_an_address_the_ipam_did_not_give_is_refused(
    ctl: NetworkController, drv: RecordingDriver
) -> None:
    net = ctl.create_network("web", driver="rec", ipam_driver="null")
    drv.reply = lambda e: InterfaceInfo(ipv4_address=ipaddress.IPv4Interface("10.9.0.2/24"))
    with pytest.raises(errors.DriverError):
        net.create_endpoint("ep1")
    assert net.endpoints() == []
    assert drv.endpoints == {}


def test_driver_may_fill_unset_fields(ctl: NetworkController, drv: RecordingDriver) -> None:
    net = ctl.create_network("web", driver="rec", ipv4=v4("10.20.0.0/24"))
    drv.reply = lambda e: InterfaceInfo(mac_address="02:00:00:00:00:99")
    ep = net.create_endpoint("ep1")
    assert ep.mac_address == "02:00:00:00:00:99"
    assert net.endpoint("ep1").mac_address == "02:00:00:00:00:99"
    # Echoing back exactly what was set is not a change.
    drv.reply = lambda e: e.interface
    ep2 = net.create_endpoint("ep2", mac_address="02:00:00:00:00:02")
    assert ep2.mac_address == "02:00:00:00:00:02"
    assert ep2.ipv4_address == ipaddress.IPv4Interface("10.20.0.3/24")


def test_driver_failing_delete_network_leaves_it_ready(
    ctl: NetworkController, drv: RecordingDriver
) -> None:
    net = ctl.create_network("web", driver="rec", ipv4=v4("10.20.0.0/24"))
    before_pools = ipam_tables(ctl)
    drv.fail_delete_network = True
    with pytest.raises(Boom):
        net.delete()
    again = ctl.network("web")
    assert again == net
    assert again.to_dict()["state"] == "ready"
    assert ipam_tables(ctl) == before_pools
    # Still usable: endpoints come and go.
    ep = again.create_endpoint("ep1")
    assert ep.ipv4_address == ipaddress.IPv4Interface("10.20.0.2/24")
    ep.delete()
    # And it can be deleted once the driver works.
    drv.fail_delete_network = False
    again.delete()
    assert ctl.networks() == []
    assert ipam_tables(ctl) == ([], [])
