"""Every public entry point rejects bad input with InvalidParameter, and changes nothing.

Each case runs against a controller that already holds networks, endpoints, a sandbox
record and IPAM state; after the rejected call all of it must read exactly as before,
and the message must say what was wrong. Sandbox input is checked before the kernel is
touched, so those cases are unprivileged too (a crafted sandbox record stands in for a
real one; no namespace is ever made).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from cnm.control import IPAMConfig, NetworkController, errors
from cnm.control.endpoint import Endpoint
from cnm.control.network import Network
from cnm.control.types import SandboxRecord

# --- the populated controller and its snapshot -----------------------------------------


@dataclass
class World:
    ctl: NetworkController
    base: Network  # 10.20.0.0/24, endpoint "e1"
    dual: Network  # 10.21.0.0/24 + fd00:21::/64, endpoint "e1"
    ep: Endpoint  # base's "e1"


@pytest.fixture
def world(ctl: NetworkController) -> World:
    base = ctl.create_network("base", driver="null", ipv4=[IPAMConfig(subnet="10.20.0.0/24")])
    ep = base.create_endpoint("e1")
    dual = ctl.create_network(
        "dual",
        driver="null",
        ipv4=[IPAMConfig(subnet="10.21.0.0/24")],
        ipv6=[IPAMConfig(subnet="fd00:21::/64")],
        enable_ipv6=True,
    )
    dual.create_endpoint("e1")
    sid = "ab" + "0" * 62
    ctl.store.put_sandbox(
        SandboxRecord(
            id=sid,
            container_id="c-existing",
            key=ctl.namespaces.key(sid),
            explicit=True,
            hostname="h",
            dns=(),
            dns_search=(),
            extra_hosts=(),
            state="ready",
        )
    )
    return World(ctl, base, dual, ep)


def snapshot(ctl: NetworkController) -> dict[str, Any]:
    nets = ctl.networks()
    ipam = ctl.ipam_driver("default")
    return {
        "networks": [n.to_dict() for n in nets],
        "endpoints": [e.to_dict() for n in nets for e in n.endpoints()],
        "sandboxes": [s.to_dict() for s in ctl.sandboxes()],
        "pools": sorted(ipam.pools()),
        "ipam_pools": ctl.store.fetchall("SELECT * FROM ipam_pools ORDER BY pool_id"),
        "ipam_addresses": ctl.store.fetchall("SELECT * FROM ipam_addresses ORDER BY pool_id, addr"),
        "drivers": ctl.drivers(),
        "netns_dir": os.path.exists(ctl.namespaces.dir),
    }


def assert_rejected(w: World, call: Callable[[World], object], pattern: str) -> None:
    before = snapshot(w.ctl)
    assert before["networks"] and before["endpoints"] and before["sandboxes"]
    with pytest.raises(errors.InvalidParameter) as info:
        call(w)
    assert isinstance(info.value, ValueError)
    assert re.search(pattern, str(info.value)), f"{pattern!r} not in {str(info.value)!r}"
    assert snapshot(w.ctl) == before


def case(id_: str, call: Callable[[World], object], pattern: str) -> Any:
    return pytest.param(call, pattern, id=id_)


# --- names -------------------------------------------------------------------------------

BAD_NAMES: list[tuple[str, object, str]] = [
    ("empty", "", r"name must be a non-empty string"),
    ("too-long", "x" * 129, r"longer than 128"),
    ("space", "a b", r"invalid \w+ name 'a b'"),
    ("dotdot-slash", "../x", r"invalid \w+ name '\.\./x'"),
    ("leading-dash", "-x", r"invalid \w+ name '-x'"),
    ("leading-dot", ".x", r"invalid \w+ name '\.x'"),
    ("slash", "x/y", r"invalid \w+ name 'x/y'"),
    ("newline", "x\n", r"invalid \w+ name"),
    ("unicode", "caf\u00e9", r"invalid \w+ name"),
    ("none", None, r"name must be a non-empty string, got None"),
    ("int", 5, r"name must be a non-empty string, got 5"),
    ("bytes", b"web", r"name must be a non-empty string, got b'web'"),
]


@pytest.mark.parametrize(("name", "pattern"), [pytest.param(n, p, id=i) for i, n, p in BAD_NAMES])
def test_bad_network_name(world: World, name: object, pattern: str) -> None:
    assert_rejected(world, lambda w: w.ctl.create_network(name, driver="null"), pattern)  # type: ignore[arg-type]
    assert_rejected(world, lambda w: w.ctl.create_network(name, driver="null"), "network")  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "pattern"), [pytest.param(n, p, id=i) for i, n, p in BAD_NAMES])
def test_bad_endpoint_name(world: World, name: object, pattern: str) -> None:
    assert_rejected(world, lambda w: w.base.create_endpoint(name), pattern)  # type: ignore[arg-type]
    assert_rejected(world, lambda w: w.base.create_endpoint(name), "endpoint")  # type: ignore[arg-type]
    # One bad name anywhere in a batch rejects the whole batch.
    assert_rejected(world, lambda w: w.base.create_endpoints(["ok1", "ok2", name]), pattern)  # type: ignore[list-item]


@pytest.mark.parametrize(("name", "pattern"), [pytest.param(n, p, id=i) for i, n, p in BAD_NAMES])
def test_bad_container_name(world: World, name: object, pattern: str) -> None:
    assert_rejected(world, lambda w: w.ctl.create_sandbox(name), pattern)  # type: ignore[arg-type]
    assert_rejected(world, lambda w: w.ctl.create_sandbox(name), "container")  # type: ignore[arg-type]
    # join and leave check the container before touching the store or the kernel.
    assert_rejected(world, lambda w: w.ep.join(name), pattern)  # type: ignore[arg-type]
    assert_rejected(world, lambda w: w.ep.leave(name), pattern)  # type: ignore[arg-type]
    assert_rejected(world, lambda w: w.ctl.join_many([(w.ep, name)]), pattern)  # type: ignore[list-item]
    assert_rejected(world, lambda w: w.ctl.leave_many([(w.ep, name)]), pattern)  # type: ignore[list-item]


def test_longest_name_is_accepted(ctl: NetworkController) -> None:
    name = "a" + "b" * 126 + "c"
    assert len(name) == 128
    net = ctl.create_network(name, driver="null", ipam_driver="null")
    assert ctl.network(name) == net
    assert net.create_endpoint(name).name == name
    net2 = ctl.create_network("x_y.z-0", driver="null", ipam_driver="null")
    assert net2.name == "x_y.z-0"


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        case("network-empty", lambda w: w.ctl.network(""), r"network reference"),
        case("network-none", lambda w: w.ctl.network(None), r"network reference"),
        case("network-int", lambda w: w.ctl.network(5), r"network reference"),
        case("endpoint-empty", lambda w: w.base.endpoint(""), r"endpoint reference"),
        case("endpoint-none", lambda w: w.base.endpoint(None), r"endpoint reference"),
        case("sandbox-empty", lambda w: w.ctl.sandbox(""), r"sandbox reference"),
        case("sandbox-list", lambda w: w.ctl.sandbox(["c"]), r"sandbox reference"),
    ],
)
def test_bad_lookup_reference(world: World, call: Any, pattern: str) -> None:
    assert_rejected(world, call, pattern)


# --- create_network ------------------------------------------------------------------------


def net_with(**kwargs: Any) -> Callable[[World], object]:
    kwargs.setdefault("driver", "null")
    return lambda w: w.ctl.create_network("new", **kwargs)


def pool(subnet: str | None = None, **kwargs: Any) -> list[IPAMConfig]:
    return [IPAMConfig(subnet=subnet, **kwargs)]


NET_CASES = [
    # driver, flags, maps
    case("driver-int", net_with(driver=5), r"driver must be a string"),
    case("enable_ipv6-str", net_with(enable_ipv6="yes"), r"enable_ipv6 must be a bool"),
    case("internal-int", net_with(internal=1), r"internal must be a bool"),
    case("option-value-int", net_with(options={"k": 1}), r"options: value of 'k' must be a str"),
    case("option-value-none", net_with(options={"k": None}), r"value of 'k' must be a string"),
    case("option-key-int", net_with(options={1: "v"}), r"options: keys must be non-empty str"),
    case("option-key-empty", net_with(options={"": "v"}), r"options: keys must be non-empty"),
    case("options-not-mapping", net_with(options="k=v"), r"options must be a mapping"),
    case("options-list", net_with(options=[("k", "v")]), r"options must be a mapping"),
    case("unknown-option", net_with(options={"com.x.y": "1"}), r"unknown option 'com\.x\.y'"),
    case("label-value-int", net_with(labels={"team": 1}), r"labels: value of 'team'"),
    case("label-key-int", net_with(labels={1: "x"}), r"labels: keys must be non-empty str"),
    case("labels-not-mapping", net_with(labels=["team"]), r"labels must be a mapping"),
    case("ipam-option-int", net_with(ipam_options={"k": 2}), r"ipam_options: value of 'k'"),
    # pool lists
    case("ipv4-single-config", net_with(ipv4=IPAMConfig()), r"ipv4 must be a list of IPAMConfig"),
    case("ipv4-int", net_with(ipv4=5), r"ipv4 must be a list of IPAMConfig"),
    case(
        "ipv4-dict-entry",
        net_with(ipv4=[{"subnet": "10.50.0.0/24"}]),
        r"ipv4 entries must be IPAMConfig",
    ),
    case("ipv4-str", net_with(ipv4="10.50.0.0/24"), r"ipv4"),
    case(
        "several-default-pools",
        net_with(ipv4=[IPAMConfig(), IPAMConfig(subnet="10.50.0.0/24")]),
        r"several pools need explicit subnets",
    ),
    case(
        "pools-overlap-in-request",
        net_with(ipv4=[IPAMConfig(subnet="10.50.0.0/16"), IPAMConfig(subnet="10.50.1.0/24")]),
        r"10\.50\.0\.0/16 and 10\.50\.1\.0/24 overlap",
    ),
    # subnets
    case(
        "subnet-host-bits",
        net_with(ipv4=pool("10.50.0.1/24")),
        r"invalid subnet '10\.50\.0\.1/24'.*host bits",
    ),
    case("subnet-garbage", net_with(ipv4=pool("banana")), r"invalid subnet 'banana'"),
    case("subnet-no-prefix-garbage", net_with(ipv4=pool("10.50.0/24")), r"invalid subnet"),
    case("subnet-bad-prefix", net_with(ipv4=pool("10.50.0.0/33")), r"invalid subnet"),
    case("subnet-int", net_with(ipv4=pool(5)), r"invalid subnet 5"),
    case(
        "subnet-v6-in-ipv4",
        net_with(ipv4=pool("fd00:50::/64")),
        r"subnet fd00:50::/64 is not an IPv4 network",
    ),
    case(
        "subnet-v4-in-ipv6",
        net_with(ipv6=pool("10.50.0.0/24"), enable_ipv6=True),
        r"subnet 10\.50\.0\.0/24 is not an IPv6 network",
    ),
    case("subnet-too-small", net_with(ipv4=pool("10.50.0.0/31")), r"too small"),
    case(
        "ipv6-without-enable",
        net_with(ipv6=pool("fd00:50::/64")),
        r"IPv6 pools were given but enable_ipv6 is False",
    ),
    case(
        "null-ipam-with-pools",
        net_with(ipv4=pool("10.50.0.0/24"), ipam_driver="null"),
        r"null IPAM driver takes no address pools",
    ),
    # gateway
    case(
        "gateway-outside",
        net_with(ipv4=pool("10.50.0.0/24", gateway="10.51.0.1")),
        r"gateway 10\.51\.0\.1 is outside subnet 10\.50\.0\.0/24",
    ),
    case(
        "gateway-network-address",
        net_with(ipv4=pool("10.50.0.0/24", gateway="10.50.0.0")),
        r"gateway 10\.50\.0\.0 is the network address",
    ),
    case(
        "gateway-broadcast",
        net_with(ipv4=pool("10.50.0.0/24", gateway="10.50.0.255")),
        r"gateway 10\.50\.0\.255 is the broadcast address",
    ),
    case(
        "gateway-garbage",
        net_with(ipv4=pool("10.50.0.0/24", gateway="banana")),
        r"invalid gateway 'banana'",
    ),
    case(
        "gateway-wrong-family",
        net_with(ipv4=pool("10.50.0.0/24", gateway="fd00::1")),
        r"gateway fd00::1 is not an IPv4 address",
    ),
    case(
        "gateway-v6-outside",
        net_with(ipv6=pool("fd00:50::/64", gateway="fd00:51::1"), enable_ipv6=True),
        r"gateway fd00:51::1 is outside subnet fd00:50::/64",
    ),
    case(
        "gateway-without-subnet",
        net_with(ipv4=pool(gateway="10.50.0.1")),
        r"need an explicit subnet",
    ),
    # ip_range
    case(
        "ip_range-outside",
        net_with(ipv4=pool("10.50.0.0/24", ip_range="10.51.0.0/25")),
        r"ip_range 10\.51\.0\.0/25 is outside subnet 10\.50\.0\.0/24",
    ),
    case(
        "ip_range-larger-than-subnet",
        net_with(ipv4=pool("10.50.0.0/24", ip_range="10.50.0.0/16")),
        r"ip_range 10\.50\.0\.0/16 is outside subnet",
    ),
    case(
        "ip_range-host-bits",
        net_with(ipv4=pool("10.50.0.0/24", ip_range="10.50.0.1/25")),
        r"invalid ip_range '10\.50\.0\.1/25'",
    ),
    case(
        "ip_range-wrong-family",
        net_with(ipv4=pool("10.50.0.0/24", ip_range="fd00::/120")),
        r"ip_range fd00::/120 is not an IPv4 network",
    ),
    case(
        "ip_range-without-subnet",
        net_with(ipv4=pool(ip_range="10.50.0.0/25")),
        r"need an explicit subnet",
    ),
    case(
        "ip_range-no-host",
        net_with(ipv4=pool("10.50.0.0/24", ip_range="10.50.0.0/32")),
        r"no assignable address",
    ),
    # aux addresses
    case(
        "aux-outside",
        net_with(ipv4=pool("10.50.0.0/24", aux_addresses={"r": "10.51.0.5"})),
        r"aux address 'r' \(10\.51\.0\.5\) is outside subnet 10\.50\.0\.0/24",
    ),
    case(
        "aux-garbage",
        net_with(ipv4=pool("10.50.0.0/24", aux_addresses={"r": "banana"})),
        r"invalid aux address 'r' 'banana'",
    ),
    case(
        "aux-wrong-family",
        net_with(ipv4=pool("10.50.0.0/24", aux_addresses={"r": "fd00::5"})),
        r"aux address 'r' fd00::5 is not an IPv4 address",
    ),
    case(
        "aux-value-int",
        net_with(ipv4=pool("10.50.0.0/24", aux_addresses={"r": 5})),
        r"aux_addresses: value of 'r' must be a string",
    ),
    case(
        "aux-network-address",
        net_with(ipv4=pool("10.50.0.0/24", aux_addresses={"r": "10.50.0.0"})),
        r"10\.50\.0\.0 is the network or broadcast address",
    ),
    case(
        "aux-without-subnet",
        net_with(ipv4=pool(aux_addresses={"r": "10.50.0.5"})),
        r"need an explicit subnet",
    ),
]


@pytest.mark.parametrize(("call", "pattern"), NET_CASES)
def test_bad_create_network(world: World, call: Any, pattern: str) -> None:
    assert_rejected(world, call, pattern)
    assert "new" not in [n.name for n in world.ctl.networks()]


def test_bad_create_network_changes_nothing_in_ipv6(world: World) -> None:
    # The v4 pool is valid and would be taken first; the bad v6 aux must undo it.
    assert_rejected(
        world,
        net_with(
            ipv4=pool("10.50.0.0/24"),
            ipv6=pool("fd00:50::/64", aux_addresses={"r": "fd00:50::"}),
            enable_ipv6=True,
        ),
        r"fd00:50:: is the network or broadcast address",
    )


# --- create_endpoint -----------------------------------------------------------------------


def ep_with(net: str = "base", **kwargs: Any) -> Callable[[World], object]:
    return lambda w: getattr(w, net).create_endpoint("new", **kwargs)


EP_CASES = [
    case("v4-garbage", ep_with(ipv4_address="banana"), r"invalid ipv4_address 'banana'"),
    case("v4-int", ep_with(ipv4_address=5), r"invalid ipv4_address 5"),
    case("v4-wrong-family", ep_with(ipv4_address="fd00::5"), r"fd00::5 is not an IPv4 address"),
    case(
        "v4-outside-pools",
        ep_with(ipv4_address="10.99.0.5"),
        r"address 10\.99\.0\.5 is outside the pools of network 'base'",
    ),
    case(
        "v4-other-networks-pool",
        ep_with(ipv4_address="10.21.0.50"),
        r"address 10\.21\.0\.50 is outside the pools of network 'base'",
    ),
    case(
        "v4-network-address",
        ep_with(ipv4_address="10.20.0.0"),
        r"10\.20\.0\.0 is the network or broadcast address",
    ),
    case(
        "v4-broadcast",
        ep_with(ipv4_address="10.20.0.255"),
        r"10\.20\.0\.255 is the network or broadcast address",
    ),
    case(
        "v6-on-v4-only-network",
        ep_with(ipv6_address="fd00:21::5"),
        r"network 'base' has no IPv6 pool",
    ),
    case(
        "v6-garbage",
        ep_with("dual", ipv6_address="banana"),
        r"invalid ipv6_address 'banana'",
    ),
    case(
        "v6-wrong-family",
        ep_with("dual", ipv6_address="10.21.0.5"),
        r"10\.21\.0\.5 is not an IPv6 address",
    ),
    case(
        "v6-outside-pools",
        ep_with("dual", ipv6_address="fd00:99::5"),
        r"address fd00:99::5 is outside the pools of network 'dual'",
    ),
    case(
        "v4-ok-v6-outside",  # the v4 address is taken first, then undone
        ep_with("dual", ipv4_address="10.21.0.50", ipv6_address="fd00:99::5"),
        r"fd00:99::5 is outside the pools",
    ),
    case("mac-garbage", ep_with(mac_address="banana"), r"invalid MAC address 'banana'"),
    case("mac-five-octets", ep_with(mac_address="02:42:ac:11:00"), r"invalid MAC address '02:42"),
    case(
        "mac-seven-octets",
        ep_with(mac_address="02:42:ac:11:00:02:03"),
        r"invalid MAC address",
    ),
    case("mac-dotted", ep_with(mac_address="0242.ac11.0002"), r"invalid MAC address"),
    case("mac-no-separators", ep_with(mac_address="0242ac110002"), r"invalid MAC address"),
    case("mac-bad-hex", ep_with(mac_address="02:42:ac:11:00:zz"), r"invalid MAC address"),
    case("mac-int", ep_with(mac_address=5), r"invalid MAC address 5"),
    case(
        "mac-multicast",
        ep_with(mac_address="01:00:5e:00:00:01"),
        r"MAC address '01:00:5e:00:00:01' is multicast",
    ),
    case(
        "mac-broadcast",
        ep_with(mac_address="ff:ff:ff:ff:ff:ff"),
        r"MAC address 'ff:ff:ff:ff:ff:ff' is multicast",
    ),
    case(
        "mac-all-zero",
        ep_with(mac_address="00:00:00:00:00:00"),
        r"MAC address 00:00:00:00:00:00 is not usable",
    ),
    case(
        "option-value-int",
        ep_with(options={"k": 1}),
        r"endpoint options: value of 'k' must be a string",
    ),
    case("options-not-mapping", ep_with(options="k=v"), r"endpoint options must be a mapping"),
]


@pytest.mark.parametrize(("call", "pattern"), EP_CASES)
def test_bad_create_endpoint(world: World, call: Any, pattern: str) -> None:
    assert_rejected(world, call, pattern)


@pytest.mark.parametrize(
    "names",
    [
        pytest.param("abc", id="a-bare-string"),
        pytest.param(5, id="int"),
        pytest.param(None, id="none"),
    ],
)
def test_create_endpoints_needs_a_list_of_names(world: World, names: object) -> None:
    # A bare string would otherwise be taken as one endpoint per character.
    assert_rejected(world, lambda w: w.base.create_endpoints(names), r"names|list|endpoint")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "items",
    [
        pytest.param(["e1"], id="a-name"),
        pytest.param([None], id="none-in-list"),
    ],
)
def test_delete_endpoints_needs_endpoints(world: World, items: list[object]) -> None:
    assert_rejected(world, lambda w: w.ctl.delete_endpoints(items), r"expected an Endpoint")  # type: ignore[arg-type]
    # A bad item after a good one: the good one is not deleted either.
    assert_rejected(
        world,
        lambda w: w.ctl.delete_endpoints([w.ep, *items]),  # type: ignore[list-item]
        r"expected an Endpoint",
    )


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        case("delete_endpoints-one-endpoint", lambda w: w.ctl.delete_endpoints(w.ep), r"Endpoint"),
        case(
            "delete_endpoints-none",
            lambda w: w.ctl.delete_endpoints(None),
            r"endpoints must be a list",
        ),
        case("join_many-none", lambda w: w.ctl.join_many(None), r"pairs|list"),
        case("join_many-not-pairs", lambda w: w.ctl.join_many([w.ep]), r"pair"),
        case("leave_many-int", lambda w: w.ctl.leave_many(5), r"pairs|list"),
    ],
)
def test_batch_calls_need_lists(world: World, call: Any, pattern: str) -> None:
    assert_rejected(world, call, pattern)


# --- create_sandbox (rejected before any kernel work) -------------------------------------


def sb_with(**kwargs: Any) -> Callable[[World], object]:
    return lambda w: w.ctl.create_sandbox("c-new", **kwargs)


SB_CASES = [
    case("hostname-leading-dash", sb_with(hostname="-host"), r"invalid hostname '-host'"),
    case("hostname-underscore", sb_with(hostname="my_host"), r"invalid hostname 'my_host'"),
    case("hostname-space", sb_with(hostname="my host"), r"invalid hostname 'my host'"),
    case("hostname-empty", sb_with(hostname=""), r"invalid hostname ''"),
    case("hostname-long-label", sb_with(hostname="a" * 64), r"invalid hostname"),
    case("hostname-too-long", sb_with(hostname=".".join(["a" * 60] * 5)), r"invalid hostname"),
    case("hostname-empty-label", sb_with(hostname="a..b"), r"invalid hostname 'a\.\.b'"),
    case("hostname-int", sb_with(hostname=5), r"invalid hostname 5"),
    case("dns-str", sb_with(dns="8.8.8.8"), r"dns must be a list of strings"),
    case("dns-none", sb_with(dns=None), r"dns must be a list of strings"),
    case("dns-int-entry", sb_with(dns=[8]), r"dns must be a list of strings"),
    case("dns-garbage", sb_with(dns=["banana"]), r"invalid dns server 'banana'"),
    case("dns-second-bad", sb_with(dns=["8.8.8.8", "1.2.3"]), r"invalid dns server '1\.2\.3'"),
    case("dns_search-str", sb_with(dns_search="example.com"), r"dns_search must be a list"),
    case("dns_search-bad", sb_with(dns_search=["-bad.com"]), r"invalid DNS search domain"),
    case("dns_search-space", sb_with(dns_search=["a b"]), r"invalid DNS search domain 'a b'"),
    case("dns_search-int", sb_with(dns_search=[1]), r"dns_search must be a list of strings"),
    case("extra_hosts-str", sb_with(extra_hosts="h:1.2.3.4"), r"extra_hosts must be a list"),
    case("extra_hosts-no-colon", sb_with(extra_hosts=["host"]), r"invalid extra host 'host'"),
    case(
        "extra_hosts-bad-address",
        sb_with(extra_hosts=["host:banana"]),
        r"invalid extra host 'host' address 'banana'",
    ),
    case(
        "extra_hosts-empty-address",
        sb_with(extra_hosts=["host:"]),
        r"invalid extra host 'host' address ''",
    ),
    case(
        "extra_hosts-bad-name",
        sb_with(extra_hosts=["bad host:1.2.3.4"]),
        r"invalid extra host 'bad host:1\.2\.3\.4'",
    ),
    case("extra_hosts-int", sb_with(extra_hosts=[5]), r"extra_hosts must be a list of strings"),
]


@pytest.mark.parametrize(("call", "pattern"), SB_CASES)
def test_bad_create_sandbox(world: World, call: Any, pattern: str) -> None:
    assert_rejected(world, call, pattern)
    with pytest.raises(errors.SandboxNotFound):
        world.ctl.sandbox("c-new")


# --- the controller and the driver registry -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        pytest.param({"fastpath": "bogus"}, r"fastpath must be one of .*'bogus'", id="fastpath"),
        pytest.param({"fastpath": 3}, r"fastpath must be one of", id="fastpath-int"),
        pytest.param({"ebpf": "bogus"}, r"ebpf must be 'auto', 'on' or 'off'", id="ebpf"),
        pytest.param({"ebpf": True}, r"ebpf must be", id="ebpf-bool"),
        pytest.param({"store": "notetcd"}, r"store must be None or 'etcd://", id="store"),
        pytest.param({"store": "etcd://"}, r"store must be None or 'etcd://", id="store-no-host"),
        pytest.param({"store": 5}, r"store must be None", id="store-int"),
        pytest.param({"plugin_dirs": "/x"}, r"plugin_dirs must be a list", id="plugin_dirs-str"),
        pytest.param({"plugin_dirs": [5]}, r"plugin_dirs must be a list", id="plugin_dirs-int"),
    ],
)
def test_bad_controller_arguments(
    world: World, tmp_path: Any, kwargs: dict[str, Any], pattern: str
) -> None:
    # On a fresh state_dir: nothing is created.
    state, run = str(tmp_path / "fresh-state"), str(tmp_path / "fresh-run")
    with pytest.raises(errors.InvalidParameter, match=pattern):
        NetworkController(state_dir=state, run_dir=run, **kwargs)
    assert not os.path.exists(state)
    assert not os.path.exists(run)
    # On the state_dir of a live controller: its state is untouched.
    assert_rejected(
        world,
        lambda w: NetworkController(state_dir=w.ctl.state_dir, run_dir=w.ctl.run_dir, **kwargs),
        pattern,
    )


class _NotADriver:
    name = "nodriver"


class _BadlyNamedDriver:
    name = "a b"
    capability = None
    options_type = None

    def create_network(self, network: Any) -> None: ...
    def delete_network(self, network_id: str) -> None: ...
    def create_endpoint(self, endpoint: Any) -> None: ...
    def delete_endpoint(self, network_id: str, endpoint_id: str) -> None: ...
    def join(self, network_id: str, endpoint_id: str, sandbox: Any) -> Any: ...
    def leave(self, network_id: str, endpoint_id: str) -> None: ...


@pytest.mark.parametrize(
    ("driver", "pattern"),
    [
        pytest.param(object(), r"does not implement the Driver protocol", id="object"),
        pytest.param(_NotADriver(), r"does not implement the Driver protocol", id="partial"),
        pytest.param(_BadlyNamedDriver(), r"invalid driver name 'a b'", id="bad-name"),
    ],
)
def test_bad_driver_registration(world: World, driver: object, pattern: str) -> None:
    assert_rejected(world, lambda w: w.ctl.registry.register(driver), pattern)  # type: ignore[arg-type]
