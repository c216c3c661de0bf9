"""The netlink codecs: the native (Cython) one and the pure-Python one, side by side.

Random valid messages are generated from the declarations in messages.py (the header
format of each message type, the attribute policies, nested and link-kind dependent
policies), never from a hand-written list, so a new declaration is covered as soon as it
exists. Properties, for every available backend:

* decode(encode(batch)) == batch;
* the native encoder's bytes are the Python encoder's bytes, and the native decoder's
  values are the Python decoder's values (same types, same reprs);
* random, truncated and bit-flipped input makes each decoder return messages or raise
  DecodeError, never anything else, never a crash or a hang, and both decoders give the
  same outcome;
* invalid input to encode raises EncodeError;
* every request builder in rtnl.py encodes identically in both codecs and round-trips.

The native backend is skipped (with the reason) when it is not built, unless
CNM_REQUIRE_NATIVE=1, which makes its absence an error (CI sets it).
"""

from __future__ import annotations

import faulthandler
import functools
import ipaddress
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnm import fastpath
from cnm.fastpath import _pycodec, rtnl
from cnm.fastpath import messages as m
from cnm.fastpath.messages import Attr, DecodeError, EncodeError, Message

# --- backends ----------------------------------------------------------------------------

REQUIRE_NATIVE = os.environ.get("CNM_REQUIRE_NATIVE") == "1"
NATIVE_MISSING = "the native codec cnm.fastpath._codec is not built (pip install -e . with Cython)"
BACKENDS = ("python", "native")


def _native_module() -> ModuleType:
    """The native codec, or skip (fail under CNM_REQUIRE_NATIVE=1) when it is not built."""
    if not fastpath.native_available():
        if REQUIRE_NATIVE:
            pytest.fail(f"CNM_REQUIRE_NATIVE=1 but {NATIVE_MISSING}", pytrace=False)
        pytest.skip(NATIVE_MISSING)
    from cnm.fastpath import _codec

    return _codec


def _backend(name: str) -> ModuleType:
    return _pycodec if name == "python" else _native_module()


@pytest.fixture(scope="module", params=BACKENDS)
def codec(request: pytest.FixtureRequest) -> ModuleType:
    """Each backend in turn: every test taking `codec` runs against both."""
    return _backend(request.param)


@pytest.fixture(scope="module")
def native() -> ModuleType:
    """The native codec, for the tests that compare it with the Python one."""
    return _native_module()


@pytest.fixture(scope="module", autouse=True)
def hang_guard() -> Iterator[None]:
    """A decoder stuck in a C loop never returns to Python: a watchdog thread ends the run."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --- strategies, derived from the declarations -------------------------------------------

RTM_TYPES = sorted(
    value
    for name, value in vars(m).items()
    if name.startswith("RTM_") and isinstance(value, int) and value in m.HEADER_OF_TYPE
)
LINK_KINDS = sorted(
    name.split(":", 1)[1] for name in m.POLICIES if name.startswith("linkinfo:") and name[9:]
)
FIELD_RANGE = {"B": (0, 0xFF), "H": (0, 0xFFFF), "I": (0, 0xFFFFFFFF), "i": (-(2**31), 2**31 - 1)}
FIXED_RANGE = {
    m.U8: (0, 0xFF),
    m.U16: (0, 0xFFFF),
    m.U32: (0, 0xFFFFFFFF),
    m.S32: (-(2**31), 2**31 - 1),
    m.U64: (0, 2**64 - 1),
    m.BE16: (0, 0xFFFF),
}
MAX_DEPTH = 3  # NESTED / IFINFO levels in generated messages (link -> linkinfo -> veth ...)
MAX_ATTRS = 5
NESTED_WEIGHT = 8

assert RTM_TYPES and LINK_KINDS == ["bridge", "veth", "vxlan"]
assert all(set(fmt) <= {*FIELD_RANGE, "x"} for fmt in m.HEADER_OF_TYPE.values())
assert set(m.KIND_NAMES) == {*FIXED_RANGE, m.STR, m.BYTES, m.FLAG, m.NESTED, m.IFINFO}

U16S = st.integers(0, 0xFFFF)
U32S = st.integers(0, 0xFFFFFFFF)
TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=16
)  # no NUL (it ends a string), no lone surrogates; non-ASCII included
BLOBS = st.binary(max_size=40)


def header_values(fmt: str) -> st.SearchStrategy[tuple[int, ...]]:
    """A header tuple for a struct format: one in-range int per field; "x" is padding."""
    return st.tuples(*(st.integers(*FIELD_RANGE[c]) for c in fmt if c != "x"))


def undeclared_attrs(policy: m.Policy) -> st.SearchStrategy[Attr]:
    """Attribute types the policy does not declare: they travel as raw BYTES."""
    atypes = st.one_of(st.integers(0, 127), st.integers(128, 0x3FFF)).filter(
        lambda t: t not in policy
    )
    return st.builds(Attr, atypes, st.just(m.BYTES), BLOBS)


def value_of(kind: int, sub: str, depth: int) -> st.SearchStrategy[Any]:
    """A value laid out exactly as `kind` says (so that it decodes back as `kind`)."""
    if kind in FIXED_RANGE:
        return st.integers(*FIXED_RANGE[kind])
    if kind == m.STR:
        return TEXT
    if kind == m.BYTES:
        return BLOBS
    if kind == m.FLAG:
        return st.none()
    if kind == m.NESTED:
        return attr_lists(sub, depth + 1)
    if kind == m.IFINFO:
        return st.tuples(header_values(m.IFINFOMSG), attr_lists(sub, depth + 1))
    raise AssertionError(f"undeclared kind {kind}")


@functools.cache
def attr_lists(policy_name: str, depth: int) -> st.SearchStrategy[list[Attr]]:
    """A list of attributes drawn from a policy (declared and undeclared types)."""
    policy = m.POLICIES[policy_name]
    if policy_name == "linkinfo":
        return linkinfo_lists(depth)
    choices: list[st.SearchStrategy[Attr]] = [undeclared_attrs(policy)]
    for atype, (_, kind, sub) in policy.items():
        nested = kind in (m.NESTED, m.IFINFO)
        if nested and depth >= MAX_DEPTH:
            continue
        attr = st.builds(Attr, st.just(atype), st.just(kind), value_of(kind, sub, depth))
        # the few nested attributes, among many scalars, are drawn more often
        choices += [attr] * (NESTED_WEIGHT if nested else 1)
    return st.lists(st.one_of(choices), max_size=MAX_ATTRS)


@functools.cache
def linkinfo_lists(depth: int) -> st.SearchStrategy[list[Attr]]:
    """IFLA_LINKINFO: IFLA_INFO_KIND first, then IFLA_INFO_DATA from "linkinfo:<kind>"."""
    policy = m.POLICIES["linkinfo"]
    assert policy[m.IFLA_INFO_KIND][1] == m.STR
    assert policy[m.IFLA_INFO_DATA][1:] == (m.NESTED, "linkinfo:")
    others = [
        st.builds(Attr, st.just(atype), st.just(kind), value_of(kind, sub, depth))
        for atype, (_, kind, sub) in policy.items()
        if atype not in (m.IFLA_INFO_KIND, m.IFLA_INFO_DATA)
    ]
    extras = st.lists(st.one_of([*others, undeclared_attrs(policy)]), max_size=2)

    def for_kind(kind: str) -> st.SearchStrategy[list[Attr]]:
        data = st.lists(
            st.builds(
                Attr,
                st.just(m.IFLA_INFO_DATA),
                st.just(m.NESTED),
                attr_lists(f"linkinfo:{kind}", depth + 1),
            ),
            max_size=1,
        )

        def assemble(before: list[Attr], data: list[Attr], after: list[Attr]) -> list[Attr]:
            return [Attr(m.IFLA_INFO_KIND, m.STR, kind), *before, *data, *after]

        return st.builds(assemble, extras, data, extras)

    return st.sampled_from(LINK_KINDS).flatmap(for_kind)


def messages_of(mtype: int) -> st.SearchStrategy[Message]:
    return st.builds(
        Message,
        st.just(mtype),
        U16S,
        U32S,
        U32S,
        header_values(m.HEADER_OF_TYPE[mtype]),
        attr_lists(m.POLICY_OF_TYPE[mtype], 0),
    )


MESSAGES = st.sampled_from(RTM_TYPES).flatmap(messages_of)
BATCHES = st.lists(MESSAGES, max_size=4)
SMALL_BATCHES = st.lists(MESSAGES, min_size=1, max_size=2)


def _nla(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _nlmsg(mtype: int, flags: int, seq: int, pid: int, body: bytes) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, pid) + body
    return raw + b"\0" * (-len(raw) % 4)


# Well-framed attribute soup: real (nested) TLV framing, payloads of any size for any type,
# so every kind meets every size, and link kinds steer the "linkinfo:" resolution.
SOUP = st.recursive(
    st.one_of(st.binary(max_size=24), st.sampled_from([b"veth", b"bridge\0", b"vxlan\0", b""])),
    lambda inner: st.lists(
        st.tuples(st.one_of(st.integers(0, 40), st.integers(0, 0xFFFF)), inner), max_size=4
    ).map(lambda items: b"".join(_nla(t, p) for t, p in items)),
    max_leaves=12,
)


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Messages with a right length, any type and flags, a random header, attribute soup."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        mtype = draw(st.one_of(st.sampled_from(sorted({*m.HEADER_OF_TYPE, 1})), U16S))
        fmt = m.HEADER_OF_TYPE.get(mtype)
        size = m.HEADER_SIZE[fmt] if fmt else 0
        header = draw(st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=24)))
        body = header + draw(SOUP)
        out += _nlmsg(mtype, draw(U16S), draw(U32S), draw(U32S), body)
    return out


MAIN = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
QUICK = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- checks ------------------------------------------------------------------------------


def _check_decoded(msgs: object) -> None:
    """A decoder's result is a list of Message of ints and Attr, each value typed by kind."""
    assert type(msgs) is list
    pending: list[object] = []
    for msg in msgs:
        assert type(msg) is Message, msg
        assert all(type(v) is int for v in (msg.type, msg.flags, msg.seq, msg.pid))
        assert type(msg.header) is tuple and all(type(v) is int for v in msg.header)
        pending.append(msg.attrs)
    while pending:  # iterative: the nesting may be deep
        attrs = pending.pop()
        assert type(attrs) is list
        for attr in attrs:
            assert type(attr) is Attr, attr
            assert type(attr.type) is int and 0 <= attr.type <= 0x3FFF
            kind, value = attr.kind, attr.value
            if kind in FIXED_RANGE:
                lo, hi = FIXED_RANGE[kind]
                assert type(value) is int and lo <= value <= hi, attr
            elif kind == m.STR:
                assert type(value) is str and "\0" not in value, attr
            elif kind == m.BYTES:
                assert type(value) is bytes, attr
            elif kind == m.FLAG:
                assert value is None, attr
            elif kind == m.NESTED:
                pending.append(value)
            elif kind == m.IFINFO:
                assert type(value) is tuple and len(value) == 2, attr
                header, inner = value
                assert type(header) is tuple and len(header) == 5
                assert all(type(v) is int for v in header)
                pending.append(inner)
            else:
                raise AssertionError(f"decoded an undeclared kind: {attr!r}")


def _outcome(codec: ModuleType, data: bytes) -> tuple[Any, ...]:
    """("ok", messages) or ("DecodeError", offset); any other exception fails the test."""
    try:
        msgs = codec.decode(data)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data)
        return ("DecodeError", exc.offset)
    _check_decoded(msgs)
    return ("ok", msgs)


def _assert_same_outcome(native: ModuleType, data: bytes) -> None:
    ours, theirs = _outcome(native, data), _outcome(_pycodec, data)
    assert ours == theirs, f"native {ours!r} != python {theirs!r} for {data.hex()}"
    assert repr(ours) == repr(theirs)


# --- round trip and byte identity --------------------------------------------------------


@MAIN
@given(batch=BATCHES)
def test_round_trip(codec: ModuleType, batch: list[Message]) -> None:
    data = codec.encode(batch)
    assert type(data) is bytes and len(data) % 4 == 0
    decoded = codec.decode(data)
    _check_decoded(decoded)
    assert decoded == batch
    assert repr(decoded) == repr(batch)


@MAIN
@given(batch=BATCHES)
def test_native_encode_is_byte_identical(native: ModuleType, batch: list[Message]) -> None:
    assert native.encode(batch) == _pycodec.encode(batch)


@MAIN
@given(batch=BATCHES)
def test_native_decode_agrees(native: ModuleType, batch: list[Message]) -> None:
    data = _pycodec.encode(batch)
    assert native.decode(data) == _pycodec.decode(data) == batch
    assert repr(native.decode(data)) == repr(_pycodec.decode(data))


@QUICK
@given(batch=BATCHES)
def test_plain_tuples_encode_like_named_tuples(codec: ModuleType, batch: list[Message]) -> None:
    def plain(attrs: list[Attr]) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for atype, kind, value in attrs:
            if kind == m.NESTED:
                value = plain(value)
            elif kind == m.IFINFO:
                value = (value[0], plain(value[1]))
            out.append((atype, kind, value))
        return out

    tuples = [(t, f, s, p, h, plain(a)) for t, f, s, p, h, a in batch]
    assert codec.encode(tuples) == codec.encode(batch)


def test_known_layout(codec: ModuleType) -> None:
    """One message laid out by hand: both codecs could not agree on the same wrong bytes."""
    msg = Message(
        m.RTM_NEWLINK,
        m.NLM_F_REQUEST | m.NLM_F_ACK,
        7,
        0,
        (m.AF_UNSPEC, 0, 5, m.IFF_UP, m.IFF_UP),
        [
            Attr(m.IFLA_IFNAME, m.STR, "eth0"),
            Attr(m.IFLA_MTU, m.U32, 1400),
            Attr(
                m.IFLA_LINKINFO,
                m.NESTED,
                [
                    Attr(m.IFLA_INFO_KIND, m.STR, "vxlan"),
                    Attr(m.IFLA_INFO_DATA, m.NESTED, [Attr(m.IFLA_VXLAN_PORT, m.BE16, 4789)]),
                ],
            ),
        ],
    )
    body = struct.pack("=BxHiII", 0, 0, 5, 1, 1)
    body += _nla(m.IFLA_IFNAME, b"eth0\0") + _nla(m.IFLA_MTU, struct.pack("=I", 1400))
    data = _nla(m.IFLA_VXLAN_PORT, b"\x12\xb5")
    body += _nla(m.IFLA_LINKINFO, _nla(m.IFLA_INFO_KIND, b"vxlan\0") + _nla(m.IFLA_INFO_DATA, data))
    expected = _nlmsg(m.RTM_NEWLINK, 5, 7, 0, body)
    assert codec.encode([msg]) == expected
    assert codec.decode(expected) == [msg]


# --- NLMSG_ERROR with extended ack -------------------------------------------------------


def _ext_ack(error: int, text: str, *, capped: bool, seq: int, pid: int) -> bytes:
    """An NLMSG_ERROR as the kernel sends it: error, the request, NLMSGERR_ATTR_* TLVs."""
    request_body = b"\x11" * 16  # the echoed request's own payload (absent when capped)
    request = struct.pack(
        "=IHHII", 16 + len(request_body), m.RTM_NEWLINK, m.NLM_F_REQUEST | m.NLM_F_ACK, seq, pid
    )
    if not capped:
        request += request_body
    tlvs = _nla(m.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
    tlvs += _nla(m.NLMSGERR_ATTR_OFFS, struct.pack("=I", 20))
    flags = (m.NLM_F_CAPPED if capped else 0) | m.NLM_F_ACK_TLVS
    return _nlmsg(m.NLMSG_ERROR, flags, seq, 0, struct.pack("=i", error) + request + tlvs)


@MAIN
@given(error=st.integers(-4095, 0), text=TEXT, capped=st.booleans(), seq=U32S, pid=U32S)
def test_error_with_ext_ack(
    codec: ModuleType, error: int, text: str, capped: bool, seq: int, pid: int
) -> None:
    data = _ext_ack(error, text, capped=capped, seq=seq, pid=pid)
    flags = (m.NLM_F_CAPPED if capped else 0) | m.NLM_F_ACK_TLVS
    header = (error, 32, m.RTM_NEWLINK, m.NLM_F_REQUEST | m.NLM_F_ACK, seq, pid)
    attrs = [Attr(m.NLMSGERR_ATTR_MSG, m.STR, text), Attr(m.NLMSGERR_ATTR_OFFS, m.U32, 20)]
    expected = [Message(m.NLMSG_ERROR, flags, seq, 0, header, attrs)]
    assert codec.decode(data) == expected
    assert codec.decode(data)[0].header[0] == error
    assert codec.decode(data)[0].attrs[0].value == text
    if capped:  # the encoder lays the capped form out exactly as the kernel does
        assert codec.encode(expected) == data


def test_error_without_tlvs_has_no_attrs(codec: ModuleType) -> None:
    data = _ext_ack(-22, "ignored", capped=True, seq=1, pid=2)
    flags = struct.unpack_from("=H", data, 6)[0] & ~m.NLM_F_ACK_TLVS
    data = data[:6] + struct.pack("=H", flags) + data[8:]
    [msg] = codec.decode(data)
    assert msg.header[0] == -22 and msg.attrs == []


def test_done_and_unknown_types(codec: ModuleType) -> None:
    data = _nlmsg(m.NLMSG_DONE, m.NLM_F_MULTI, 3, 4, struct.pack("=i", 0))
    data += _nlmsg(m.NLMSG_NOOP, 0, 5, 6, b"abcdef")
    assert codec.decode(data) == [
        Message(m.NLMSG_DONE, m.NLM_F_MULTI, 3, 4, (0,), []),
        Message(m.NLMSG_NOOP, 0, 5, 6, (), [Attr(0, m.BYTES, b"abcdef")]),
    ]


def test_done_with_error_and_ext_ack(codec: ModuleType) -> None:
    """A dump failing part-way: NLMSG_DONE with -errno, then attributes of its policy."""
    body = struct.pack("=i", -95) + _nla(m.NLMSGERR_ATTR_MSG, b"dump failed\0")
    data = _nlmsg(m.NLMSG_DONE, m.NLM_F_MULTI, 3, 0, body)
    entry = m.POLICIES[m.POLICY_OF_TYPE[m.NLMSG_DONE]].get(m.NLMSGERR_ATTR_MSG)
    if entry is not None and entry[1] == m.STR:
        attr = Attr(m.NLMSGERR_ATTR_MSG, m.STR, "dump failed")
    else:
        attr = Attr(m.NLMSGERR_ATTR_MSG, m.BYTES, b"dump failed\0")
    expected = [Message(m.NLMSG_DONE, m.NLM_F_MULTI, 3, 0, (-95,), [attr])]
    assert codec.decode(data) == expected
    assert codec.encode(expected) == data


# --- robustness: random, truncated, bit-flipped input ------------------------------------


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(codec: ModuleType, data: bytes) -> None:
    _outcome(codec, data)


@FUZZ
@given(data=framed_garbage())
def test_framed_garbage(codec: ModuleType, data: bytes) -> None:
    _outcome(codec, data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), framed_garbage()))
def test_decoders_agree_on_garbage(native: ModuleType, data: bytes) -> None:
    _assert_same_outcome(native, data)


@SLOW
@given(batch=SMALL_BATCHES)
def test_truncations(codec: ModuleType, batch: list[Message]) -> None:
    data = _pycodec.encode(batch)
    for n in range(len(data)):
        _outcome(codec, data[:n])


@SLOW
@given(batch=SMALL_BATCHES)
def test_decoders_agree_on_truncations(native: ModuleType, batch: list[Message]) -> None:
    data = _pycodec.encode(batch)
    for n in range(len(data)):
        _assert_same_outcome(native, data[:n])


def _flip(data: bytes, bits: list[int]) -> bytes:
    buf = bytearray(data)
    for bit in bits:
        bit %= len(buf) * 8
        buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


BITS = st.lists(st.integers(0, 2**20), min_size=1, max_size=6)


@FUZZ
@given(batch=SMALL_BATCHES, bits=BITS)
def test_bit_flips(codec: ModuleType, batch: list[Message], bits: list[int]) -> None:
    _outcome(codec, _flip(_pycodec.encode(batch), bits))


@FUZZ
@given(batch=SMALL_BATCHES, bits=BITS)
def test_decoders_agree_on_bit_flips(
    native: ModuleType, batch: list[Message], bits: list[int]
) -> None:
    _assert_same_outcome(native, _flip(_pycodec.encode(batch), bits))


def _deep_links(depth: int) -> bytes:
    """One RTM_NEWLINK whose veth peer holds a veth peer ... `depth` levels down."""
    inner = b""
    for _ in range(depth):
        peer = _nla(m.VETH_INFO_PEER, struct.pack("=BxHiII", 0, 0, 0, 0, 0) + inner)
        info = _nla(m.IFLA_INFO_KIND, b"veth") + _nla(m.IFLA_INFO_DATA, peer)
        inner = _nla(m.IFLA_LINKINFO, info)
    assert len(inner) <= 0xFFFF  # still a legal attribute length
    return _nlmsg(m.RTM_NEWLINK, 0, 0, 0, struct.pack("=BxHiII", 0, 0, 0, 0, 0) + inner)


@pytest.mark.parametrize("depth", [50, 1000])
def test_deep_nesting(codec: ModuleType, depth: int) -> None:
    """Legal TLV framing nested as deep as 16-bit lengths allow: messages or DecodeError."""
    data = _deep_links(depth)
    _outcome(codec, data)
    for n in (len(data) - 1, len(data) // 2):
        _outcome(codec, data[:n])


@pytest.mark.parametrize("depth", [50, 1000])
def test_decoders_agree_on_deep_nesting(native: ModuleType, depth: int) -> None:
    _assert_same_outcome(native, _deep_links(depth))


# --- invalid input to encode -------------------------------------------------------------

IFINFO0 = (m.AF_UNSPEC, 0, 0, 0, 0)


def _link(*attrs: Any, header: Any = IFINFO0, **fields: Any) -> list[Any]:
    msg = Message(m.RTM_NEWLINK, m.NLM_F_REQUEST, 0, 0, header, list(attrs))
    return [msg._replace(**fields)]


INVALID: dict[str, list[Any]] = {
    "u8 256": _link(Attr(m.IFLA_OPERSTATE, m.U8, 256)),
    "u8 -1": _link(Attr(m.IFLA_OPERSTATE, m.U8, -1)),
    "u16 65536": _link(Attr(1, m.U16, 0x10000)),
    "u32 -1": _link(Attr(m.IFLA_MTU, m.U32, -1)),
    "u32 2**32": _link(Attr(m.IFLA_MTU, m.U32, 2**32)),
    "u32 float": _link(Attr(m.IFLA_MTU, m.U32, 1.0)),
    "u32 None": _link(Attr(m.IFLA_MTU, m.U32, None)),
    "s32 2**31": _link(Attr(m.IFLA_LINK_NETNSID, m.S32, 2**31)),
    "u64 2**64": _link(Attr(1, m.U64, 2**64)),
    "be16 -1": _link(Attr(1, m.BE16, -1)),
    "str for bytes": _link(Attr(m.IFLA_ADDRESS, m.BYTES, "00:11:22:33:44:55")),
    "int for bytes": _link(Attr(m.IFLA_ADDRESS, m.BYTES, 6)),
    "list for bytes": _link(Attr(m.IFLA_ADDRESS, m.BYTES, [1, 2])),
    "None for bytes": _link(Attr(m.IFLA_ADDRESS, m.BYTES, None)),
    "int for str": _link(Attr(m.IFLA_IFNAME, m.STR, 5)),
    "bytes for str": _link(Attr(m.IFLA_IFNAME, m.STR, b"eth0")),
    "lone surrogate in str": _link(Attr(m.IFLA_IFNAME, m.STR, "eth\ud800")),
    "int for nested": _link(Attr(m.IFLA_LINKINFO, m.NESTED, 5)),
    "None for nested": _link(Attr(m.IFLA_LINKINFO, m.NESTED, None)),
    "str for nested": _link(Attr(m.IFLA_LINKINFO, m.NESTED, "veth")),
    "ints in nested": _link(Attr(m.IFLA_LINKINFO, m.NESTED, [1, 2])),
    "int for ifinfo": _link(Attr(m.VETH_INFO_PEER, m.IFINFO, 5)),
    "short ifinfo header": _link(Attr(m.VETH_INFO_PEER, m.IFINFO, ((0, 0), []))),
    "None ifinfo header": _link(Attr(m.VETH_INFO_PEER, m.IFINFO, (None, []))),
    "None ifinfo attrs": _link(Attr(m.VETH_INFO_PEER, m.IFINFO, (IFINFO0, None))),
    "unknown kind": _link(Attr(1, 99, b"")),
    "str kind": _link(Attr(1, "bytes", b"")),
    "attribute type 65536": _link(Attr(0x10000, m.BYTES, b"")),
    "attribute type -1": _link(Attr(-1, m.BYTES, b"")),
    "attribute type str": _link(Attr("IFLA_MTU", m.U32, 1)),
    "attribute not a triple": _link((m.IFLA_MTU, m.U32)),
    "attribute over 64 KiB": _link(Attr(m.IFLA_ADDRESS, m.BYTES, b"x" * 0xFFFC)),
    "unknown message type": _link(type=99),
    "NLMSG_NOOP has no layout": _link(type=m.NLMSG_NOOP, header=()),
    "header too short": _link(header=IFINFO0[:-1]),
    "header too long": _link(header=(*IFINFO0, 0)),
    "header field 256 for B": _link(header=(256, 0, 0, 0, 0)),
    "header field 2**31 for i": _link(header=(0, 0, 2**31, 0, 0)),
    "header field str": _link(header=("0", 0, 0, 0, 0)),
    "flags 65536": _link(flags=0x10000),
    "flags -1": _link(flags=-1),
    "seq 2**32": _link(seq=2**32),
    "pid -1": _link(pid=-1),
}


@pytest.mark.parametrize("batch", INVALID.values(), ids=INVALID.keys())
def test_encode_rejects(codec: ModuleType, batch: list[Any]) -> None:
    with pytest.raises(EncodeError):
        codec.encode(batch)


def test_encode_limits_are_exact(codec: ModuleType) -> None:
    """The largest legal values still encode: the rejections above are not off by one."""
    batch = _link(
        Attr(m.IFLA_OPERSTATE, m.U8, 255),
        Attr(m.IFLA_MTU, m.U32, 2**32 - 1),
        Attr(m.IFLA_LINK_NETNSID, m.S32, -(2**31)),
        Attr(0x3FFF, m.BYTES, b""),
        Attr(m.IFLA_ADDRESS, m.BYTES, b"x" * 0xFFFB),
        header=(255, 0xFFFF, -(2**31), 2**32 - 1, 0),
        flags=0xFFFF,
        seq=2**32 - 1,
    )
    assert codec.decode(codec.encode(batch)) == batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_rejects_unbounded_nesting(backend: str) -> None:
    """Nesting too deep to lay out is an EncodeError, not a crash (run apart: it may segfault)."""
    _backend(backend)
    module = "_pycodec" if backend == "python" else "_codec"
    script = textwrap.dedent(
        f"""
        from cnm.fastpath import {module} as codec, messages as m
        value = []
        for _ in range(200_000):  # 800 kB of attribute headers: far over 64 KiB
            value = [m.Attr(1, m.NESTED, value)]
        msg = m.Message(m.RTM_NEWLINK, 1, 0, 0, (0, 0, 0, 0, 0), [m.Attr(18, m.NESTED, value)])
        try:
            codec.encode([msg])
        except m.EncodeError:
            print("EncodeError")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-600:]}"
    assert proc.stdout.strip() == "EncodeError", proc.stderr[-600:]


# --- the request builders ----------------------------------------------------------------

V4 = ipaddress.IPv4Address("10.0.0.2")
V6 = ipaddress.IPv6Address("fd00::2")
BUILT: dict[str, Message] = {
    "veth": rtnl.veth(
        rtnl.VethSpec(
            "veth0",
            "eth0",
            9,
            ifindex=12,
            peer_ifindex=3,
            master=4,
            mtu=1450,
            mac="02:42:ac:11:00:02",
            peer_mac="02:42:ac:11:00:03",
            group=7,
        )
    ),
    "veth minimal down": rtnl.veth(rtnl.VethSpec("v1", "p1", 5, up=False)),
    "bridge": rtnl.bridge("br0", mtu=1500, mac="02:00:00:00:00:01", ageing_time=30000, group=2),
    "bridge minimal": rtnl.bridge("br1", up=False),
    "vxlan v4": rtnl.vxlan(
        rtnl.VxlanSpec("vx0", vni=42, local=V4, ttl=64, ageing=300, dev=2, mtu=1450, master=3)
    ),
    "vxlan v6 learning": rtnl.vxlan(rtnl.VxlanSpec("vx1", vni=0xFFFFFF, local=V6, learning=True)),
    "vxlan external": rtnl.vxlan(rtnl.VxlanSpec("vx2", external=True, port=65535)),
    "link_set all": rtnl.link_set(
        3, up=True, name="eth1", mtu=9000, mac="aa-bb-cc-dd-ee-ff", master=0, group=1, netns_fd=8
    ),
    "link_set down": rtnl.link_set(3, up=False),
    "link_set nothing": rtnl.link_set(3),
    "link_get": rtnl.link_get("eth0"),
    "link_del index": rtnl.link_del(4),
    "link_del name": rtnl.link_del(name="veth0"),
    "group_del": rtnl.group_del(7),
    "addr_add v4": rtnl.addr_add(2, ipaddress.IPv4Interface("10.0.0.2/24")),
    "addr_add v4 /31": rtnl.addr_add(2, ipaddress.IPv4Interface("10.0.0.2/31")),
    "addr_add v6": rtnl.addr_add(2, ipaddress.IPv6Interface("fd00::2/64")),
    "addr_add v6 dad": rtnl.addr_add(2, ipaddress.IPv6Interface("fd00::2/64"), nodad=False),
    "addr_del v4": rtnl.addr_del(2, ipaddress.IPv4Interface("10.0.0.2/24")),
    "addr_del v6": rtnl.addr_del(2, ipaddress.IPv6Interface("fd00::2/64")),
    "route_add default v4": rtnl.route_add(ipaddress.IPv4Network("0.0.0.0/0"), gateway=V4),
    "route_add connected v6": rtnl.route_add(ipaddress.IPv6Network("fd00:1::/64"), oif=3),
    "route_add table": rtnl.route_add(
        ipaddress.IPv4Network("10.1.0.0/16"), gateway=V4, oif=2, table=1000
    ),
    "route_del v4": rtnl.route_del(ipaddress.IPv4Network("10.1.0.0/16"), gateway=V4),
    "route_del v6": rtnl.route_del(ipaddress.IPv6Network("::/0"), gateway=V6, table=300),
    "neigh_add v4": rtnl.neigh_add(3, V4, "02:42:ac:11:00:02"),
    "neigh_add v6": rtnl.neigh_add(3, V6, "02:42:ac:11:00:02", replace=False),
    "neigh_del v4": rtnl.neigh_del(3, V4),
    "neigh_del v6": rtnl.neigh_del(3, V6),
    "fdb_add": rtnl.fdb_add(5, "02:42:ac:11:00:02", V4, vni=42),
    "fdb_add v6 no replace": rtnl.fdb_add(5, "02:42:ac:11:00:02", V6, replace=False),
    "fdb_del": rtnl.fdb_del(5, "02:42:ac:11:00:02", V4, vni=42),
    "fdb_del mac only": rtnl.fdb_del(5, "02:42:ac:11:00:02"),
    "dump_links": rtnl.dump_links(),
    "dump_addrs": rtnl.dump_addrs(m.AF_INET),
    "dump_routes": rtnl.dump_routes(m.AF_INET6),
    "dump_neighbours": rtnl.dump_neighbours(m.AF_BRIDGE),
}


@pytest.mark.parametrize("msg", BUILT.values(), ids=BUILT.keys())
def test_builder_round_trips(codec: ModuleType, msg: Message) -> None:
    decoded = codec.decode(codec.encode([msg]))
    assert decoded == [msg]
    assert repr(decoded) == repr([msg])


@pytest.mark.parametrize("msg", BUILT.values(), ids=BUILT.keys())
def test_builder_encodes_identically(native: ModuleType, msg: Message) -> None:
    assert native.encode([msg]) == _pycodec.encode([msg])


def test_builders_batch(codec: ModuleType) -> None:
    batch = [msg._replace(seq=seq) for seq, msg in enumerate(BUILT.values(), 1)]
    data = codec.encode(batch)
    assert data == _pycodec.encode(batch)
    assert codec.decode(data) == batch


def test_builder_truncations_and_flips(native: ModuleType) -> None:
    data = _pycodec.encode(list(BUILT.values()))
    for n in range(len(data)):
        _assert_same_outcome(native, data[:n])
    for bit in range(0, len(data) * 8, 7):
        _assert_same_outcome(native, _flip(data, [bit]))


def test_builder_truncations_python() -> None:
    data = _pycodec.encode(list(BUILT.values()))
    for n in range(len(data)):
        _outcome(_pycodec, data[:n])


# --- backend selection -------------------------------------------------------------------


def test_python_backend_is_pycodec(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fastpath.codec("python") is _pycodec
    monkeypatch.setenv("CNM_FASTPATH", "python")
    assert fastpath.codec() is _pycodec
    assert fastpath.BACKEND == "python"


def test_native_backend_is_codec(native: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.__name__ == "cnm.fastpath._codec"
    assert fastpath.codec("native") is native
    assert fastpath.codec("auto") is native
    monkeypatch.setenv("CNM_FASTPATH", "native")
    assert fastpath.codec() is native
    assert fastpath.BACKEND == "native"
    assert native.__file__ is not None and not native.__file__.endswith(".py")
