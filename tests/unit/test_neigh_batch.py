"""rtnl.NeighBatch and the codecs' encode_neighbours: one-pass neighbour / FDB batches.

Both codecs lay out a NeighBatch byte for byte as the pure-Python `encode` lays out the
equivalent Messages from the ordinary builders (rtnl.fdb_add, neigh_del, ...), with the
sequence numbers and the last message's extra flags the transport asks for; bad input is
an EncodeError in both. (Kernel behaviour: tests/kernel/test_neigh_batch.py.)
"""

from __future__ import annotations

import ipaddress
import os
from types import ModuleType

import pytest

from cnm import fastpath
from cnm.fastpath import _pycodec, rtnl
from cnm.fastpath import messages as m
from cnm.fastpath.messages import EncodeError

KINDS = ("fdb_add", "fdb_del", "neigh_add", "neigh_del")


def _codecs() -> list[ModuleType]:
    out: list[ModuleType] = [_pycodec]
    if fastpath.native_available():
        from cnm.fastpath import _codec

        out.append(_codec)
    elif os.environ.get("CNM_REQUIRE_NATIVE") == "1":
        pytest.fail("CNM_REQUIRE_NATIVE=1 but cnm.fastpath._codec is not built")
    return out


@pytest.fixture(params=_codecs(), ids=lambda c: c.__name__.rsplit(".", 1)[1])
def codec(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def _entries(n: int = 600) -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    out: list = []
    for i in range(n):
        mac = f"02:42:0a:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        addr = (
            ipaddress.ip_address(0x0A800000 + i) if i % 3 else ipaddress.ip_address(f"fd00::{i:x}")
        )
        out.append((mac.upper() if i % 7 == 0 else mac, addr))
    out.append(("02-42-0a-00-00-01", ipaddress.ip_address("10.1.2.3")))  # dashes
    out.append(("02420a000002", ipaddress.ip_address("10.1.2.4")))  # bare hex
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_batch_bytes_are_the_builders_bytes(codec: ModuleType, kind: str) -> None:
    batch = rtnl.NeighBatch(kind, 7, _entries())
    first = 4000
    got = codec.encode_neighbours(batch.template(), batch.wire_entries(), first, m.NLM_F_ACK)
    n = len(batch)
    want = _pycodec.encode(
        [
            batch.message(k)._replace(
                seq=first + k, flags=batch.message(k).flags | (m.NLM_F_ACK if k == n - 1 else 0)
            )
            for k in range(n)
        ]
    )
    assert got == want
    # ... and they decode to the builders' messages.
    decoded = _pycodec.decode(got)
    assert [(d.type, d.header) for d in decoded[:3]] == [
        (batch.message(k).type, batch.message(k).header) for k in range(3)
    ]


def test_raw_bytes_entries_and_empty_batch(codec: ModuleType) -> None:
    raw = rtnl.NeighBatch("fdb_add", 3, [(b"\x02\x00\x00\x00\x00\x01", b"\xc6\x12\x00\x01")])
    ref = rtnl.NeighBatch("fdb_add", 3, [("02:00:00:00:00:01", ipaddress.ip_address("198.18.0.1"))])
    enc = codec.encode_neighbours
    assert enc(raw.template(), raw.entries, 1) == enc(ref.template(), ref.entries, 1)
    assert enc(raw.template(), [], 1) == b""


@pytest.mark.parametrize(
    "entry",
    [
        ("zz:42:0a:00:00:01", ipaddress.ip_address("10.0.0.1")),
        ("02:42:0a:00:00:0", ipaddress.ip_address("10.0.0.1")),
        (42, ipaddress.ip_address("10.0.0.1")),
        ("02:42:0a:00:00:01", "10.0.0.1"),
        ("02:42:0a:00:00:01", None),
    ],
)
def test_bad_entries_are_encode_errors(codec: ModuleType, entry: tuple) -> None:
    batch = rtnl.NeighBatch("neigh_add", 1, [entry])
    with pytest.raises(EncodeError):
        codec.encode_neighbours(batch.template(), batch.entries, 1)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        rtnl.NeighBatch("route_add", 1, [])
