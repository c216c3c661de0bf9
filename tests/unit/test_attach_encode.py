"""fastpath.attach: a join's two batches, laid out by one native call each.

The native codec's encode_veth_join / encode_link_config give, byte for byte, what the
transport sends for the generic builders' requests (attach.host_end_requests,
link_config_requests: numbered from the first sequence number, the ACK on the last
request only), for every optional part; bad input is an EncodeError. (On the kernel:
tests/kernel/test_attach.py.)
"""

from __future__ import annotations

import ipaddress
import itertools
import os

import pytest

from cnm import fastpath
from cnm.fastpath import _pycodec, attach, bulk
from cnm.fastpath import messages as m
from cnm.fastpath.messages import EncodeError, Message

if fastpath.native_available():
    from cnm.fastpath import _codec
elif os.environ.get("CNM_REQUIRE_NATIVE") == "1":
    pytest.fail("CNM_REQUIRE_NATIVE=1 but cnm.fastpath._codec is not built", pytrace=False)
else:
    pytest.skip("the native codec is not built", allow_module_level=True)


def _sent(requests: list[Message], first: int) -> bytes:
    """What NetlinkSocket.execute sends for one chunk of `requests`."""
    last = len(requests) - 1
    return _pycodec.encode(
        [
            r._replace(seq=first + k, flags=r.flags | m.NLM_F_REQUEST | (m.NLM_F_ACK * (k == last)))
            for k, r in enumerate(requests)
        ]
    )


HOST_ENDS = [
    attach.HostEnd(
        name=name,
        peer_name=peer,
        master=master,
        mtu=mtu,
        group=group,
        queues=queues,
        hairpin=hairpin,
        isolated=isolated,
    )
    for (name, peer), master, mtu, group, queues, hairpin, isolated in itertools.product(
        [("veth0a1b2c3", "eth0"), ("v", "eth10"), ("vethé", "e")],
        [None, 7],
        [None, 1450],
        [None, 0x636E6D02],
        [None, 1],
        [False, True],
        [False, True],
    )
]


def test_host_end_bytes_are_the_builders_bytes() -> None:
    for end, first in itertools.product(HOST_ENDS, (1, 4000, 0x7FFFFFF0)):
        got = _codec.encode_veth_join(
            first,
            end.name,
            end.peer_name,
            9,
            end.master,
            end.mtu,
            end.group,
            end.queues,
            end.hairpin,
            end.isolated,
        )
        assert got == _sent(attach.host_end_requests(end, 9), first), (end, first)


V4 = ipaddress.ip_interface("10.210.3.7/16")
V4_30 = ipaddress.ip_interface("192.168.9.6/30")
V4_31 = ipaddress.ip_interface("192.168.9.6/31")
V4_32 = ipaddress.ip_interface("192.168.9.6/32")
V6 = ipaddress.ip_interface("fd00:1::7/64")
GW4 = ipaddress.ip_address("10.210.0.1")
GW6 = ipaddress.ip_address("fd00:1::1")

CONFIGS = [
    attach.LinkConfig(index=index, mtu=mtu, addresses=addrs, mac=mac, routes=routes)
    for index, mtu, addrs, mac, routes in itertools.product(
        [2, 70000],
        [None, 9000],
        [(), (V4,), (V4, V6), (V4_30, V4_31, V4_32), (V6,)],
        [None, "02:42:0a:d2:03:07", "02-42-0A-D2-03-07"],
        [
            (),
            attach.default_routes(GW4, None),
            attach.default_routes(GW4, GW6),
            attach.default_routes(None, GW6),
            (
                (ipaddress.ip_network("10.211.0.0/17"), GW4),
                (ipaddress.ip_network("10.212.0.0/16"), None),
                (ipaddress.ip_network("fd00:2::/64"), GW6),
            ),
        ],
    )
]


def test_link_config_bytes_are_the_builders_bytes() -> None:
    for cfg, first in itertools.product(CONFIGS, (1, 77, 0x7FFFFFF0)):
        addrs = [(a.ip.packed, a.network.prefixlen) for a in cfg.addresses]
        routes = [
            (d.network_address.packed, d.prefixlen, None if g is None else g.packed)
            for d, g in cfg.routes
        ]
        got = _codec.encode_link_config(first, cfg.index, cfg.mtu, addrs, cfg.mac, routes)
        assert got == _sent(attach.link_config_requests(cfg), first), (cfg, first)


def test_default_routes_are_the_gateways_defaults() -> None:
    assert attach.default_routes(GW4, GW6) == ((bulk.DEFAULT_V4, GW4), (bulk.DEFAULT_V6, GW6))
    assert attach.default_routes(None, None) == ()


@pytest.mark.parametrize(
    "args",
    [
        (1, "v", "eth0", 9, -1, None, None, None, False, False),  # master out of range
        (1, 5, "eth0", 9, None, None, None, None, False, False),  # name not a str
        (1, "v", None, 9, None, None, None, None, False, False),  # peer name missing
        (1, "v", "eth0", "9", None, None, None, None, False, False),  # fd not an int
        (1, "v" * 70000, "eth0", 9, None, None, None, None, False, False),  # over 65535
        (1, "v\udc80", "eth0", 9, None, None, None, None, False, False),  # lone surrogate
    ],
)
def test_bad_host_end_is_an_encode_error(args: tuple) -> None:
    with pytest.raises(EncodeError):
        _codec.encode_veth_join(*args)


@pytest.mark.parametrize(
    "args",
    [
        (1, 2, None, [(b"\x0a\x00\x00", 16)], None, []),  # 3-byte address
        (1, 2, None, [], "not a mac", []),
        (1, 2, -5, [], None, []),  # MTU out of range
        (1, 2, None, [], None, [(b"", 0, None)]),  # a route with neither
        (1, "2", None, [], None, []),  # index not an int
        (1, 2, None, [("10.0.0.1", 8)], None, []),  # address not packed
        (1, 2, None, [(b"\x0a\x00\x00\x01", 33)], None, []),  # prefix past 32
        (1, 2, None, [(b"\x0a\x00\x00\x01", -1)], None, []),  # negative prefix
        (1, 2, None, [], None, [(b"\x0a\x00\x00\x00", 40, b"\x0a\x00\x00\x01")]),
    ],
)
def test_bad_link_config_is_an_encode_error(args: tuple) -> None:
    with pytest.raises(EncodeError):
        _codec.encode_link_config(*args)
