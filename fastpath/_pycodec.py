"""The pure-Python netlink codec, driven by the declarations in messages.py.

`encode(messages) -> bytes` lays out a batch of messages; `decode(data) -> list[Message]`
parses a stream of them. The native codec (_codec.pyx) implements the same two functions
from the same tables and must produce identical bytes and identical decoded values.

Decoding rules shared by both: attribute types are read without the NLA_F_NESTED and
NLA_F_NET_BYTEORDER flag bits; an attribute whose size does not match its declared kind,
or that is not declared at all, decodes as raw BYTES; a message type with no declared
header decodes with header () and its whole payload as one BYTES attribute of type 0;
anything that overruns its container raises DecodeError.
"""

from __future__ import annotations

import functools
import gc
import struct
from collections.abc import Sequence

from .messages import (
    AF_INET,
    AF_INET6,
    BE16,
    BYTES,
    FLAG,
    HEADER_OF_TYPE,
    IFINFO,
    IFINFOMSG,
    IFLA_INFO_KIND,
    MAX_NESTING,
    NDA_DST,
    NDA_LLADDR,
    NDMSG,
    NESTED,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSG_ERROR,
    NLMSGHDR,
    POLICIES,
    POLICY_OF_TYPE,
    S32,
    STR,
    U8,
    U16,
    U32,
    U64,
    Attr,
    DecodeError,
    EncodeError,
    Message,
)

_NLMSGHDR = struct.Struct("=" + NLMSGHDR)
_NLA = struct.Struct("=HH")
_HEADERS = {fmt: struct.Struct("=" + fmt) for fmt in set(HEADER_OF_TYPE.values())}
_IFINFO = _HEADERS[IFINFOMSG]
_FIXED = {
    U8: struct.Struct("=B"),
    U16: struct.Struct("=H"),
    U32: struct.Struct("=I"),
    S32: struct.Struct("=i"),
    U64: struct.Struct("=Q"),
    BE16: struct.Struct("!H"),
}
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
NLA_TYPE_MASK = 0x3FFF


def _encode_attrs(out: bytearray, attrs: Sequence[Attr], depth: int = 0) -> None:
    if depth > MAX_NESTING:
        raise EncodeError(f"attributes nested deeper than {MAX_NESTING} levels")
    for attr in attrs:
        start = len(out)
        try:
            atype, kind, value = attr
            out += b"\0\0\0\0"
            fixed = _FIXED.get(kind)
            if fixed is not None:
                out += fixed.pack(value)
            elif kind == STR:
                out += value.encode("utf-8", "surrogateescape") + b"\0"
            elif kind == BYTES:
                out += value
            elif kind == NESTED:
                _encode_attrs(out, value, depth + 1)
            elif kind == IFINFO:
                header, inner = value
                out += _IFINFO.pack(*header)
                _encode_attrs(out, inner, depth + 1)
            elif kind != FLAG:
                raise EncodeError(f"attribute {atype}: unknown kind {kind}")
            length = len(out) - start
            if length > 0xFFFF:
                raise EncodeError(f"attribute {atype} is {length} bytes, over 65535")
            _NLA.pack_into(out, start, length, atype)
        except EncodeError:
            raise
        except (struct.error, TypeError, AttributeError, ValueError) as exc:
            raise EncodeError(f"attribute {attr!r:.60}: {exc}") from None
        out += _PAD[length & 3]


def encode(messages: Sequence[Message]) -> bytes:
    """Lay out a batch of messages back to back, as one sendmsg buffer."""
    out = bytearray()
    try:
        for msg in messages:
            mtype, flags, seq, pid, header, attrs = msg
            start = len(out)
            out += b"\0" * 16
            fmt = HEADER_OF_TYPE.get(mtype)
            if fmt is None:
                raise EncodeError(f"message type {mtype} has no declared layout")
            out += _HEADERS[fmt].pack(*header)
            _encode_attrs(out, attrs)
            _NLMSGHDR.pack_into(out, start, len(out) - start, mtype, flags, seq, pid)
    except EncodeError:
        raise
    except (struct.error, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot lay out message: {exc}") from None
    return bytes(out)


# --- neighbour batches ------------------------------------------------------------------


def _lladdr(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        return mac
    try:
        return bytes.fromhex(mac.replace(":", "").replace("-", ""))
    except (AttributeError, ValueError) as exc:
        raise EncodeError(f"link-layer address {mac!r:.40}: {exc}") from None


def encode_neighbours(
    template: tuple[int, int, int, int, int, int, bool],
    entries: Sequence[tuple[str | bytes | None, object]],
    first_seq: int,
    last_flags: int = 0,
) -> bytes:
    """Neighbour / FDB requests of one shape, one per entry, laid out exactly as
    `encode` lays out the equivalent Messages (see rtnl.NeighBatch), without building
    them. template = (type, flags, family (0: from each address), ifindex, state,
    ndm_flags, lladdr first); entry k = (link-layer address or None, address: bytes or
    anything with .packed), sequence number first_seq + k; the last one gets
    `last_flags` too (e.g. NLM_F_ACK)."""
    mtype, flags, family, index, state, ntf, lladdr_first = template
    out = bytearray()
    last = len(entries) - 1
    shapes: dict[tuple[int, int | None], struct.Struct] = {}
    try:
        for k, (mac, addr) in enumerate(entries):
            dst = addr if isinstance(addr, bytes) else addr.packed  # type: ignore[attr-defined]
            fam = family or (AF_INET if len(dst) == 4 else AF_INET6)
            seq_flags = flags | (last_flags if k == last else 0)
            ll = None if mac is None else _lladdr(mac)
            d_attr = (4 + len(dst), NDA_DST, dst)
            if ll is None:
                attrs: tuple = d_attr
            elif lladdr_first:
                attrs = (4 + len(ll), NDA_LLADDR, ll, *d_attr)
            else:
                attrs = (*d_attr, 4 + len(ll), NDA_LLADDR, ll)
            key = (len(dst), None if ll is None else len(ll))
            shape = shapes.get(key)
            if shape is None:
                shape = shapes[key] = _neigh_shape(bool(lladdr_first), *key)
            out += shape.pack(
                shape.size, mtype, seq_flags, first_seq + k, 0, fam, index, state, ntf, 0, *attrs
            )
    except EncodeError:
        raise
    except (struct.error, TypeError, ValueError, AttributeError) as exc:
        raise EncodeError(f"cannot lay out neighbour request: {exc}") from None
    return bytes(out)


@functools.lru_cache(maxsize=64)
def _neigh_shape(lladdr_first: bool, dst_len: int, ll_len: int | None) -> struct.Struct:
    """One neighbour message laid out as a single struct: nlmsghdr, ndmsg, then each
    attribute's header, value and padding (one pack per message)."""
    if dst_len > 0xFFFF - 4 or (ll_len or 0) > 0xFFFF - 4:
        raise EncodeError("a neighbour attribute is over 65535 bytes")
    dst = f"HH{dst_len}s{-dst_len % 4}x"
    if ll_len is None:
        attrs = dst
    else:
        ll = f"HH{ll_len}s{-ll_len % 4}x"
        attrs = ll + dst if lladdr_first else dst + ll
    return struct.Struct("=" + NLMSGHDR + NDMSG + attrs)


def _decode_attrs(data: bytes, off: int, end: int, policy_name: str, depth: int = 0) -> list[Attr]:
    if depth > MAX_NESTING:
        raise DecodeError(off, f"attributes nested deeper than {MAX_NESTING} levels")
    policy = POLICIES.get(policy_name, {})
    attrs: list[Attr] = []
    info_kind = ""
    while end - off >= 4:
        length, atype = _NLA.unpack_from(data, off)
        if length < 4 or off + length > end:
            raise DecodeError(off, f"attribute length {length} overruns its container")
        atype &= NLA_TYPE_MASK
        vstart = off + 4
        vend = off + length
        size = vend - vstart
        entry = policy.get(atype)
        kind = entry[1] if entry is not None else BYTES
        fixed = _FIXED.get(kind)
        if fixed is not None:
            if size == fixed.size:
                value: object = fixed.unpack_from(data, vstart)[0]
            else:
                kind, value = BYTES, data[vstart:vend]
        elif kind == STR:
            raw = data[vstart:vend]
            nul = raw.find(b"\0")
            value = (raw if nul < 0 else raw[:nul]).decode("utf-8", "surrogateescape")
            if atype == IFLA_INFO_KIND and policy_name == "linkinfo":
                info_kind = value  # type: ignore[assignment]
        elif kind == NESTED:
            sub = entry[2] if entry is not None else ""
            if sub == "linkinfo:":
                sub = f"linkinfo:{info_kind}"
            value = _decode_attrs(data, vstart, vend, sub, depth + 1)
        elif kind == IFINFO:
            if size < _IFINFO.size:
                kind, value = BYTES, data[vstart:vend]
            else:
                value = (
                    _IFINFO.unpack_from(data, vstart),
                    _decode_attrs(
                        data, vstart + _IFINFO.size, vend, entry[2] if entry else "", depth + 1
                    ),
                )
        elif kind == FLAG:
            value = None
            if size:
                kind, value = BYTES, data[vstart:vend]
        else:
            value = data[vstart:vend]
        attrs.append(Attr(atype, kind, value))
        off += (length + 3) & ~3
    return attrs


def decode(data: bytes) -> list[Message]:
    """Parse a stream of netlink messages; DecodeError on anything malformed.

    The cyclic garbage collector is paused while the result is built (as the native
    codec does): decoding makes many small objects that cannot form cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _decode(data)
    finally:
        if was_enabled:
            gc.enable()


def _decode(data: bytes) -> list[Message]:
    data = bytes(data)
    out: list[Message] = []
    off = 0
    total = len(data)
    while off < total:
        if total - off < 16:
            raise DecodeError(off, f"{total - off} bytes left, too short for a header")
        length, mtype, flags, seq, pid = _NLMSGHDR.unpack_from(data, off)
        if length < 16 or off + length > total:
            raise DecodeError(off, f"message length {length} does not fit")
        end = off + length
        body = off + 16
        fmt = HEADER_OF_TYPE.get(mtype)
        if fmt is None:
            out.append(Message(mtype, flags, seq, pid, (), [Attr(0, BYTES, data[body:end])]))
        else:
            hs = _HEADERS[fmt]
            if end - body < hs.size:
                raise DecodeError(off, f"message type {mtype} is shorter than its header")
            header = hs.unpack_from(data, body)
            attr_start = body + hs.size
            if mtype == NLMSG_ERROR:
                if not flags & NLM_F_CAPPED:
                    attr_start = body + 4 + max(header[1], 16)  # the echoed request
                attrs = (
                    _decode_attrs(data, attr_start, end, "nlmsgerr")
                    if flags & NLM_F_ACK_TLVS and attr_start <= end
                    else []
                )
            else:
                attrs = _decode_attrs(data, attr_start, end, POLICY_OF_TYPE.get(mtype, ""))
            out.append(Message(mtype, flags, seq, pid, header, attrs))
        off += (length + 3) & ~3
    return out
