# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native netlink codec: the same encode/decode as _pycodec.py, at C speed.

Driven by the same declarations (messages.py); tests prove the bytes and the decoded
values are identical to the pure-Python codec's.
"""

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_CheckExact
from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_Check
from cpython.unicode cimport PyUnicode_DecodeUTF8


cdef extern from *:
    """
    /* A tuple subclass instance (Attr, Message) filled in place: what tuple.__new__
       does for a subclass, without building an argument tuple and calling it. */
    static PyObject* cnm_make3(PyTypeObject* t, PyObject* a, PyObject* b, PyObject* c) {
        PyObject* o = t->tp_alloc(t, 3);
        if (!o) return NULL;
        Py_INCREF(a); PyTuple_SET_ITEM(o, 0, a);
        Py_INCREF(b); PyTuple_SET_ITEM(o, 1, b);
        Py_INCREF(c); PyTuple_SET_ITEM(o, 2, c);
        /* An Attr of atoms (int, str, bytes, None) can never be part of a cycle: keep it
           out of the collector's sight, as CPython does lazily for such tuples. */
        if (!PyObject_IS_GC(c)) PyObject_GC_UnTrack(o);
        return o;
    }
    static PyObject* cnm_make6(PyTypeObject* t, PyObject* a, PyObject* b, PyObject* c,
                               PyObject* d, PyObject* e, PyObject* f) {
        PyObject* o = t->tp_alloc(t, 6);
        if (!o) return NULL;
        Py_INCREF(a); PyTuple_SET_ITEM(o, 0, a);
        Py_INCREF(b); PyTuple_SET_ITEM(o, 1, b);
        Py_INCREF(c); PyTuple_SET_ITEM(o, 2, c);
        Py_INCREF(d); PyTuple_SET_ITEM(o, 3, d);
        Py_INCREF(e); PyTuple_SET_ITEM(o, 4, e);
        Py_INCREF(f); PyTuple_SET_ITEM(o, 5, f);
        return o;
    }
    """
    object cnm_make3(PyTypeObject* t, object a, object b, object c)
    object cnm_make6(PyTypeObject* t, object a, object b, object c, object d, object e,
                     object f)


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    void PyObject_GC_UnTrack(object o)
    int PyGC_Disable()
    int PyGC_Enable()

from . import messages as _m
from .messages import Attr, DecodeError, EncodeError, Message

# Kinds, checked against the declarations at import.
DEF K_U8 = 1
DEF K_U16 = 2
DEF K_U32 = 3
DEF K_S32 = 4
DEF K_U64 = 5
DEF K_BE16 = 6
DEF K_STR = 7
DEF K_BYTES = 8
DEF K_FLAG = 9
DEF K_NESTED = 10
DEF K_IFINFO = 11

assert (_m.U8, _m.U16, _m.U32, _m.S32, _m.U64, _m.BE16, _m.STR, _m.BYTES, _m.FLAG,
        _m.NESTED, _m.IFINFO) == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)

cdef dict _HEADER_OF_TYPE = {t: f.encode() for t, f in _m.HEADER_OF_TYPE.items()}
cdef dict _HEADER_SIZE = {t: _m.HEADER_SIZE[f] for t, f in _m.HEADER_OF_TYPE.items()}
cdef bytes _IFINFO_FMT = _m.IFINFOMSG.encode()
cdef Py_ssize_t _IFINFO_SIZE = _m.HEADER_SIZE[_m.IFINFOMSG]
DEF MAX_ATTR = 128


cdef class _Policy:
    """One attribute policy as C arrays: kind and nested policy per attribute type."""
    cdef int kind[MAX_ATTR]
    cdef list sub
    cdef str name
    cdef bint is_linkinfo

    def __init__(self, str name):
        cdef int i
        self.name = name
        self.is_linkinfo = name == "linkinfo"
        self.sub = [None] * MAX_ATTR
        for i in range(MAX_ATTR):
            self.kind[i] = K_BYTES
        for atype, (_, kind, subname) in _m.POLICIES.get(name, {}).items():
            if atype >= MAX_ATTR:
                raise ValueError(f"policy {name}: attribute type {atype} >= {MAX_ATTR}")
            self.kind[atype] = kind
            self.sub[atype] = subname


cdef dict _POLICIES = {name: _Policy(name) for name in _m.POLICIES}
cdef _Policy _EMPTY = _POLICIES[""]
cdef dict _POLICY_OF_TYPE = {t: _POLICIES[n] for t, n in _m.POLICY_OF_TYPE.items()}
cdef _Policy _NLMSGERR_POLICY = _POLICIES["nlmsgerr"]

# Per message type (all rtnetlink types are < 128): header format, its size, the policy.
DEF MAX_TYPE = 128
cdef list _TYPE_FMT = [None] * MAX_TYPE
cdef Py_ssize_t _TYPE_HSIZE[MAX_TYPE]
cdef list _TYPE_POLICY = [_EMPTY] * MAX_TYPE
for _t, _f in _m.HEADER_OF_TYPE.items():
    _TYPE_FMT[_t] = _f.encode()
    _TYPE_HSIZE[_t] = _m.HEADER_SIZE[_f]
    _TYPE_POLICY[_t] = _POLICIES[_m.POLICY_OF_TYPE.get(_t, "")]
cdef int _NLMSG_ERROR = _m.NLMSG_ERROR
cdef int _NLM_F_CAPPED = _m.NLM_F_CAPPED
cdef int _NLM_F_ACK_TLVS = _m.NLM_F_ACK_TLVS
cdef int _IFLA_INFO_KIND = _m.IFLA_INFO_KIND
cdef PyTypeObject* _ATTR_T = <PyTypeObject*>Attr
cdef PyTypeObject* _MESSAGE_T = <PyTypeObject*>Message




# --- encoding --------------------------------------------------------------------------

cdef struct Buf:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef int _reserve(Buf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap
    cdef unsigned char* p
    if b.len + need <= b.cap:
        return 0
    cap = b.cap * 2
    if cap < b.len + need + 256:
        cap = b.len + need + 256
    p = <unsigned char*>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int _put(Buf* b, const void* src, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.data + b.len, src, n)
    b.len += n
    return 0


cdef inline int _zeros(Buf* b, Py_ssize_t n) except -1:
    _reserve(b, n)
    memset(b.data + b.len, 0, n)
    b.len += n
    return 0


cdef int _put_fixed(Buf* b, int kind, object value) except -1:
    cdef uint8_t u8
    cdef uint16_t u16
    cdef uint32_t u32
    cdef int32_t s32
    cdef uint64_t u64
    if not isinstance(value, int):
        raise EncodeError(f"{value!r} is not an integer")
    try:
        if kind == K_U8:
            u8 = value
            _put(b, &u8, 1)
        elif kind == K_U16:
            u16 = value
            _put(b, &u16, 2)
        elif kind == K_U32:
            u32 = value
            _put(b, &u32, 4)
        elif kind == K_S32:
            s32 = value
            _put(b, &s32, 4)
        elif kind == K_U64:
            u64 = value
            _put(b, &u64, 8)
        else:  # K_BE16
            u16 = value
            u16 = ((u16 & 0xFF) << 8) | (u16 >> 8)
            _put(b, &u16, 2)
    except OverflowError as exc:
        raise EncodeError(f"{value!r} out of range: {exc}") from None
    return 0


cdef int _put_header(Buf* b, bytes fmt, object values) except -1:
    cdef Py_ssize_t i, j = 0
    cdef char c
    cdef tuple vals = tuple(values)
    for i in range(len(fmt)):
        c = fmt[i]
        if c == b"x":
            _zeros(b, 1)
            continue
        if j >= len(vals):
            raise EncodeError(f"header {values!r} has too few fields")
        if c == b"B":
            _put_fixed(b, K_U8, vals[j])
        elif c == b"H":
            _put_fixed(b, K_U16, vals[j])
        elif c == b"I":
            _put_fixed(b, K_U32, vals[j])
        elif c == b"i":
            _put_fixed(b, K_S32, vals[j])
        j += 1
    if j != len(vals):
        raise EncodeError(f"header {values!r} has too many fields")
    return 0


cdef int _MAX_NESTING = _m.MAX_NESTING


cdef int _put_attrs(Buf* b, object attrs, int depth=0) except -1:
    cdef Py_ssize_t start, length
    cdef uint16_t hdr[2]
    cdef const unsigned char[::1] view
    cdef int kind
    cdef Py_ssize_t size
    cdef const char* utf8
    if depth > _MAX_NESTING:
        raise EncodeError(f"attributes nested deeper than {_MAX_NESTING} levels")
    for attr in attrs:
        try:
            if PyTuple_Check(attr) and PyTuple_GET_SIZE(attr) == 3:  # Attr, or a plain tuple
                atype = <object>PyTuple_GET_ITEM(attr, 0)
                value = <object>PyTuple_GET_ITEM(attr, 2)
                kind = <object>PyTuple_GET_ITEM(attr, 1)
            else:
                atype, kind_obj, value = attr
                kind = kind_obj
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"attribute {attr!r}: {exc}") from None
        start = b.len
        _zeros(b, 4)
        if K_U8 <= kind <= K_BE16:
            _put_fixed(b, kind, value)
        elif kind == K_STR:
            if PyUnicode_Check(value):
                try:
                    utf8 = PyUnicode_AsUTF8AndSize(value, &size)
                    _put(b, utf8, size)
                except UnicodeEncodeError:  # lone surrogates: the escaped bytes, as _pycodec
                    try:
                        data = value.encode("utf-8", "surrogateescape")
                    except UnicodeEncodeError as exc:
                        raise EncodeError(f"attribute {atype} (kind {kind}): {exc}") from None
                    _put(b, <const char*>data, len(data))
            else:
                raise EncodeError(f"attribute {atype} (kind {kind}): not a str: {value!r}")
            _zeros(b, 1)
        elif kind == K_BYTES and PyBytes_CheckExact(value):
            _put(b, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))
        elif kind == K_BYTES:
            if value is None or isinstance(value, str) or isinstance(value, int):
                raise EncodeError(f"attribute {atype} (kind {kind}): not bytes: {value!r}")
            try:
                view = value
            except (TypeError, ValueError, BufferError) as exc:
                raise EncodeError(f"attribute {atype} (kind {kind}): {exc}") from None
            if view.shape[0]:
                _put(b, &view[0], view.shape[0])
        elif kind == K_NESTED:
            if not PyList_CheckExact(value):
                try:
                    iter(value)
                except TypeError as exc:
                    raise EncodeError(f"attribute {atype} (kind {kind}): {exc}") from None
            _put_attrs(b, value, depth + 1)
        elif kind == K_IFINFO:
            try:
                header, inner = value
                _put_header(b, _IFINFO_FMT, header)
                _put_attrs(b, inner, depth + 1)
            except (TypeError, ValueError) as exc:
                if isinstance(exc, EncodeError):
                    raise
                raise EncodeError(f"attribute {atype} (kind {kind}): {exc}") from None
        elif kind != K_FLAG:
            raise EncodeError(f"attribute {atype}: unknown kind {kind}")
        length = b.len - start
        if length > 0xFFFF:
            raise EncodeError(f"attribute {atype} is {length} bytes, over 65535")
        hdr[0] = <uint16_t>length
        try:
            hdr[1] = atype
        except (OverflowError, TypeError) as exc:
            raise EncodeError(f"attribute type {atype!r}: {exc}") from None
        memcpy(b.data + start, hdr, 4)
        _zeros(b, (4 - (length & 3)) & 3)
    return 0


def encode(messages):
    """Lay out a batch of messages back to back, as one sendmsg buffer."""
    cdef Buf b
    cdef Py_ssize_t start
    cdef uint32_t nlhdr32[4]
    cdef uint16_t* nlhdr16
    b.data = NULL
    b.len = 0
    b.cap = 0
    try:
        try:
            _reserve(&b, 4096)
            for msg in messages:
                if PyTuple_Check(msg) and PyTuple_GET_SIZE(msg) == 6:  # Message, or a plain tuple
                    mtype = <object>PyTuple_GET_ITEM(msg, 0)
                    flags = <object>PyTuple_GET_ITEM(msg, 1)
                    seq = <object>PyTuple_GET_ITEM(msg, 2)
                    pid = <object>PyTuple_GET_ITEM(msg, 3)
                    header = <object>PyTuple_GET_ITEM(msg, 4)
                    attrs = <object>PyTuple_GET_ITEM(msg, 5)
                else:
                    mtype, flags, seq, pid, header, attrs = msg
                fmt = _HEADER_OF_TYPE.get(mtype)
                if fmt is None:
                    raise EncodeError(f"message type {mtype} has no declared layout")
                start = b.len
                _zeros(&b, 16)
                _put_header(&b, fmt, header)
                _put_attrs(&b, attrs)
                try:
                    nlhdr32[0] = <uint32_t>(b.len - start)
                    nlhdr16 = <uint16_t*>&nlhdr32[1]
                    nlhdr16[0] = mtype
                    nlhdr16[1] = flags
                    nlhdr32[2] = seq
                    nlhdr32[3] = pid
                except (OverflowError, TypeError) as exc:
                    raise EncodeError(f"message type {mtype}: {exc}") from None
                memcpy(b.data + start, nlhdr32, 16)
        except EncodeError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"cannot lay out message: {exc}") from None
        return b.data[:b.len]
    finally:
        free(b.data)


# --- neighbour batches -----------------------------------------------------------------

cdef int _NDA_DST = _m.NDA_DST
cdef int _NDA_LLADDR = _m.NDA_LLADDR
cdef int _AF_INET = _m.AF_INET
cdef int _AF_INET6 = _m.AF_INET6
assert _m.NLMSGHDR + _m.NDMSG == "IHHIIBxxxiHBB"


cdef inline int _hexval(char c):
    if 48 <= c <= 57:  # 0-9
        return c - 48
    if 97 <= c <= 102:  # a-f
        return c - 87
    if 65 <= c <= 70:  # A-F
        return c - 55
    return -1


cdef bytes _lladdr(object mac):
    """A MAC as bytes: "xx:xx:xx:xx:xx:xx" parsed here, anything else as _pycodec does."""
    cdef unsigned char raw[6]
    cdef int i, hi, lo
    cdef const char* text
    cdef Py_ssize_t size = 0
    if PyBytes_CheckExact(mac):
        return <bytes>mac
    if PyUnicode_Check(mac):
        text = PyUnicode_AsUTF8AndSize(mac, &size)
        if size == 17:
            for i in range(6):
                hi = _hexval(text[3 * i])
                lo = _hexval(text[3 * i + 1])
                if hi < 0 or lo < 0 or (i < 5 and text[3 * i + 2] != 58):  # ':'
                    break
                raw[i] = <unsigned char>(hi * 16 + lo)
            else:
                return PyBytes_FromStringAndSize(<char*>raw, 6)
    from . import _pycodec
    return _pycodec._lladdr(mac)


cdef inline int _put_nla(Buf* b, int atype, bytes value) except -1:
    cdef uint16_t hdr[2]
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    if n > 0xFFFF - 4:
        raise EncodeError(f"attribute {atype} is {n + 4} bytes, over 65535")
    hdr[0] = <uint16_t>(n + 4)
    hdr[1] = <uint16_t>atype
    _put(b, hdr, 4)
    _put(b, PyBytes_AS_STRING(value), n)
    _zeros(b, (4 - (n & 3)) & 3)
    return 0


def encode_neighbours(template, entries, first_seq, last_flags=0):
    """Neighbour / FDB requests of one shape, one per entry: the same bytes as
    _pycodec.encode_neighbours (see there), at C speed."""
    cdef Buf b
    cdef Py_ssize_t start, k, count
    cdef uint32_t nlhdr32[4]
    cdef uint16_t* nlhdr16
    cdef unsigned char nd[12]
    cdef uint32_t seq0, flags0, lastf
    cdef int fam
    cdef int32_t ifindex
    cdef uint16_t state
    cdef bytes dst, ll
    mtype, flags, family, index, nd_state, ntf, lladdr_first = template
    cdef bint ll_first = bool(lladdr_first)
    b.data = NULL
    b.len = 0
    b.cap = 0
    try:
        try:
            seq0 = first_seq
            flags0 = flags
            lastf = last_flags
            ifindex = index
            state = nd_state
            count = len(entries)
            _reserve(&b, 64 * count + 64)
            for k in range(count):
                mac, addr = entries[k]
                dst = addr if PyBytes_CheckExact(addr) else addr.packed
                fam = family
                if fam == 0:
                    fam = _AF_INET if PyBytes_GET_SIZE(dst) == 4 else _AF_INET6
                start = b.len
                _zeros(&b, 16)
                memset(nd, 0, 12)
                nd[0] = <uint8_t>fam
                memcpy(nd + 4, &ifindex, 4)
                memcpy(nd + 8, &state, 2)
                nd[10] = <uint8_t>ntf
                _put(&b, nd, 12)
                if mac is not None:
                    ll = _lladdr(mac)
                    if ll_first:
                        _put_nla(&b, _NDA_LLADDR, ll)
                        _put_nla(&b, _NDA_DST, dst)
                    else:
                        _put_nla(&b, _NDA_DST, dst)
                        _put_nla(&b, _NDA_LLADDR, ll)
                else:
                    _put_nla(&b, _NDA_DST, dst)
                nlhdr32[0] = <uint32_t>(b.len - start)
                nlhdr16 = <uint16_t*>&nlhdr32[1]
                nlhdr16[0] = mtype
                nlhdr16[1] = flags0 | (lastf if k == count - 1 else 0)
                nlhdr32[2] = seq0 + <uint32_t>k
                nlhdr32[3] = 0
                memcpy(b.data + start, nlhdr32, 16)
        except EncodeError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise EncodeError(f"cannot lay out neighbour request: {exc}") from None
        return b.data[:b.len]
    finally:
        free(b.data)


# --- one container's attach: the host end's batch and the container end's ------------
# The same bytes as the generic builders (rtnl.veth + rtnl.bridge_port; rtnl.link_set,
# addr_add, route_add) laid out by encode() with the transport's sequence numbers and
# flags (fastpath/attach.py builds those as the reference; tests compare), without a
# Message or Attr object per request: a sequential join's two batches.

cdef int _RTM_NEWLINK = _m.RTM_NEWLINK
cdef int _RTM_NEWADDR = _m.RTM_NEWADDR
cdef int _RTM_NEWROUTE = _m.RTM_NEWROUTE
cdef uint32_t _F_REQUEST = _m.NLM_F_REQUEST
cdef uint32_t _F_CREATE = _m.NLM_F_REQUEST | _m.NLM_F_CREATE | _m.NLM_F_EXCL
cdef uint32_t _F_ACK = _m.NLM_F_ACK


cdef inline Py_ssize_t _msg_begin(Buf* b) except -1:
    cdef Py_ssize_t start = b.len
    _zeros(b, 16)
    return start


cdef inline int _msg_end(Buf* b, Py_ssize_t start, int mtype, uint32_t flags, uint32_t seq) except -1:
    cdef uint32_t nlhdr32[4]
    cdef uint16_t* nlhdr16 = <uint16_t*>&nlhdr32[1]
    nlhdr32[0] = <uint32_t>(b.len - start)
    nlhdr16[0] = <uint16_t>mtype
    nlhdr16[1] = <uint16_t>flags
    nlhdr32[2] = seq
    nlhdr32[3] = 0
    memcpy(b.data + start, nlhdr32, 16)
    return 0


cdef inline int _ifinfo_hdr(Buf* b, int32_t index, uint32_t flags, uint32_t change) except -1:
    cdef unsigned char h[16]
    memset(h, 0, 16)
    memcpy(h + 4, &index, 4)
    memcpy(h + 8, &flags, 4)
    memcpy(h + 12, &change, 4)
    return _put(b, h, 16)


cdef inline int _nla_raw(Buf* b, int atype, const void* p, Py_ssize_t n) except -1:
    cdef uint16_t hdr[2]
    if n > 0xFFFF - 4:
        raise EncodeError(f"attribute {atype} is {n + 4} bytes, over 65535")
    hdr[0] = <uint16_t>(n + 4)
    hdr[1] = <uint16_t>atype
    _put(b, hdr, 4)
    _put(b, p, n)
    _zeros(b, (4 - (n & 3)) & 3)
    return 0


cdef inline int _nla_u32(Buf* b, int atype, object value) except -1:
    cdef uint32_t v
    try:
        v = value
    except (OverflowError, TypeError) as exc:
        raise EncodeError(f"attribute {atype}: {value!r}: {exc}") from None
    return _nla_raw(b, atype, &v, 4)


cdef inline int _nla_u8(Buf* b, int atype, uint8_t v) except -1:
    return _nla_raw(b, atype, &v, 1)


cdef int _nla_str(Buf* b, int atype, object value) except -1:
    cdef Py_ssize_t size
    cdef const char* utf8
    cdef Py_ssize_t start = b.len
    cdef uint16_t hdr[2]
    if not PyUnicode_Check(value):
        raise EncodeError(f"attribute {atype}: not a str: {value!r}")
    utf8 = PyUnicode_AsUTF8AndSize(value, &size)
    if size + 5 > 0xFFFF:
        raise EncodeError(f"attribute {atype} is {size + 5} bytes, over 65535")
    hdr[0] = <uint16_t>(size + 5)
    hdr[1] = <uint16_t>atype
    _put(b, hdr, 4)
    _put(b, utf8, size)
    _zeros(b, 1)
    _zeros(b, (4 - ((size + 5) & 3)) & 3)
    return 0


cdef inline Py_ssize_t _nest_begin(Buf* b) except -1:
    cdef Py_ssize_t start = b.len
    _zeros(b, 4)
    return start


cdef inline int _nest_end(Buf* b, Py_ssize_t start, int atype) except -1:
    cdef uint16_t hdr[2]
    cdef Py_ssize_t length = b.len - start
    if length > 0xFFFF:
        raise EncodeError(f"attribute {atype} is {length} bytes, over 65535")
    hdr[0] = <uint16_t>length
    hdr[1] = <uint16_t>atype
    memcpy(b.data + start, hdr, 4)
    return 0


def encode_veth_join(first_seq, name, peer_name, peer_fd, master, mtu, group, queues,
                     hairpin, isolated):
    """The host end's batch of a join: the veth pair (host end `name` up, on `master`,
    in `group`; the peer `peer_name` made inside the namespace of `peer_fd`; `mtu` and
    `queues` on both ends; None leaves a setting out), then, when `hairpin` or
    `isolated`, the bridge-port settings; sequence numbers from `first_seq`, the ACK
    asked on the last request."""
    cdef Buf b
    cdef Py_ssize_t msg, linkinfo, data, peer
    cdef uint32_t seq = first_seq
    cdef bint port = bool(hairpin) or bool(isolated)
    b.data = NULL
    b.len = 0
    b.cap = 0
    try:
        _reserve(&b, 512)
        msg = _msg_begin(&b)
        _ifinfo_hdr(&b, 0, _m.IFF_UP, _m.IFF_UP)
        _nla_str(&b, _m.IFLA_IFNAME, name)
        if mtu is not None:
            _nla_u32(&b, _m.IFLA_MTU, mtu)
        if master is not None:
            _nla_u32(&b, _m.IFLA_MASTER, master)
        if group is not None:
            _nla_u32(&b, _m.IFLA_GROUP, group)
        if queues is not None:
            _nla_u32(&b, _m.IFLA_NUM_TX_QUEUES, queues)
            _nla_u32(&b, _m.IFLA_NUM_RX_QUEUES, queues)
        linkinfo = _nest_begin(&b)
        _nla_str(&b, _m.IFLA_INFO_KIND, "veth")
        data = _nest_begin(&b)
        peer = _nest_begin(&b)
        _ifinfo_hdr(&b, 0, 0, 0)
        _nla_str(&b, _m.IFLA_IFNAME, peer_name)
        if mtu is not None:
            _nla_u32(&b, _m.IFLA_MTU, mtu)
        _nla_u32(&b, _m.IFLA_NET_NS_FD, peer_fd)
        if queues is not None:
            _nla_u32(&b, _m.IFLA_NUM_TX_QUEUES, queues)
            _nla_u32(&b, _m.IFLA_NUM_RX_QUEUES, queues)
        _nest_end(&b, peer, _m.VETH_INFO_PEER)
        _nest_end(&b, data, _m.IFLA_INFO_DATA)
        _nest_end(&b, linkinfo, _m.IFLA_LINKINFO)
        _msg_end(&b, msg, _RTM_NEWLINK, _F_CREATE | (0 if port else _F_ACK), seq)
        if port:
            msg = _msg_begin(&b)
            _ifinfo_hdr(&b, 0, 0, 0)
            _nla_str(&b, _m.IFLA_IFNAME, name)
            linkinfo = _nest_begin(&b)
            data = _nest_begin(&b)
            if hairpin:
                _nla_u8(&b, _m.IFLA_BRPORT_MODE, 1)
            if isolated:
                _nla_u8(&b, _m.IFLA_BRPORT_ISOLATED, 1)
            _nest_end(&b, data, _m.IFLA_INFO_SLAVE_DATA)
            _nest_end(&b, linkinfo, _m.IFLA_LINKINFO)
            _msg_end(&b, msg, _RTM_NEWLINK, _F_REQUEST | _F_ACK, seq + 1)
        return b.data[:b.len]
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot lay out the veth pair: {exc}") from None
    finally:
        free(b.data)


def encode_link_config(first_seq, index, mtu, addresses, mac, routes):
    """The container end's batch of a join, for link `index` made under its final name:
    its MTU (None: left alone), each address of `addresses` ((packed address, prefix
    length); no DAD for IPv6, the broadcast address for IPv4 shorter than /31), up with
    `mac` (None: the kernel's), then each route of `routes` ((packed destination, prefix
    length, packed gateway or None)) through it; sequence numbers from `first_seq`, the
    ACK asked on the last request."""
    cdef Buf b
    cdef Py_ssize_t msg, n, total, k = 0
    cdef uint32_t seq = first_seq
    cdef int32_t idx
    cdef unsigned char ifa[8]
    cdef unsigned char rtm[12]
    cdef unsigned char brd[4]
    cdef uint32_t host, addr_be
    cdef int prefixlen
    cdef bytes packed, gw, dst, ll
    try:
        idx = index
    except (OverflowError, TypeError) as exc:
        raise EncodeError(f"link index {index!r}: {exc}") from None
    total = (1 if mtu is not None else 0) + len(addresses) + 1 + len(routes)
    b.data = NULL
    b.len = 0
    b.cap = 0
    try:
        _reserve(&b, 128 * total + 64)
        if mtu is not None:
            msg = _msg_begin(&b)
            _ifinfo_hdr(&b, idx, 0, 0)
            _nla_u32(&b, _m.IFLA_MTU, mtu)
            k += 1
            _msg_end(&b, msg, _RTM_NEWLINK, _F_REQUEST | (_F_ACK if k == total else 0), seq)
            seq += 1
        for packed, prefixlen in addresses:
            n = PyBytes_GET_SIZE(packed)
            if n != 4 and n != 16:
                raise EncodeError(f"address of {n} bytes")
            if not 0 <= prefixlen <= 8 * n:
                raise EncodeError(f"prefix length {prefixlen} for a {8 * n}-bit address")
            msg = _msg_begin(&b)
            memset(ifa, 0, 8)
            ifa[0] = <uint8_t>(_AF_INET if n == 4 else _AF_INET6)
            ifa[1] = <uint8_t>prefixlen
            ifa[2] = <uint8_t>(0 if n == 4 else _m.IFA_F_NODAD)
            memcpy(ifa + 4, &idx, 4)
            _put(&b, ifa, 8)
            _nla_raw(&b, _m.IFA_LOCAL, PyBytes_AS_STRING(packed), n)
            _nla_raw(&b, _m.IFA_ADDRESS, PyBytes_AS_STRING(packed), n)
            if n == 4 and prefixlen < 31:
                memcpy(&addr_be, PyBytes_AS_STRING(packed), 4)
                host = 0xFFFFFFFF >> prefixlen
                # The host bits all set, in network byte order.
                brd[0] = (<unsigned char*>&addr_be)[0] | <unsigned char>(host >> 24)
                brd[1] = (<unsigned char*>&addr_be)[1] | <unsigned char>(host >> 16)
                brd[2] = (<unsigned char*>&addr_be)[2] | <unsigned char>(host >> 8)
                brd[3] = (<unsigned char*>&addr_be)[3] | <unsigned char>host
                _nla_raw(&b, _m.IFA_BROADCAST, brd, 4)
            k += 1
            _msg_end(&b, msg, _RTM_NEWADDR, _F_CREATE | (_F_ACK if k == total else 0), seq)
            seq += 1
        msg = _msg_begin(&b)
        _ifinfo_hdr(&b, idx, _m.IFF_UP, _m.IFF_UP)
        if mac is not None:
            ll = _lladdr(mac)
            _nla_raw(&b, _m.IFLA_ADDRESS, PyBytes_AS_STRING(ll), PyBytes_GET_SIZE(ll))
        k += 1
        _msg_end(&b, msg, _RTM_NEWLINK, _F_REQUEST | (_F_ACK if k == total else 0), seq)
        seq += 1
        for dst, prefixlen, gw in routes:
            n = PyBytes_GET_SIZE(dst) if prefixlen else (4 if gw is None else PyBytes_GET_SIZE(gw))
            if gw is None and not prefixlen:
                raise EncodeError("a route needs a destination or a gateway")
            if not 0 <= prefixlen <= 8 * n or (n != 4 and n != 16):
                raise EncodeError(f"route prefix length {prefixlen} for a {8 * n}-bit family")
            msg = _msg_begin(&b)
            memset(rtm, 0, 12)
            rtm[0] = <uint8_t>(_AF_INET if n == 4 else _AF_INET6)
            rtm[1] = <uint8_t>prefixlen
            rtm[4] = <uint8_t>_m.RT_TABLE_MAIN
            rtm[5] = <uint8_t>_m.RTPROT_STATIC
            rtm[6] = <uint8_t>(_m.RT_SCOPE_LINK if gw is None else _m.RT_SCOPE_UNIVERSE)
            rtm[7] = <uint8_t>_m.RTN_UNICAST
            _put(&b, rtm, 12)
            if prefixlen:
                _nla_raw(&b, _m.RTA_DST, PyBytes_AS_STRING(dst), PyBytes_GET_SIZE(dst))
            if gw is not None:
                _nla_raw(&b, _m.RTA_GATEWAY, PyBytes_AS_STRING(gw), PyBytes_GET_SIZE(gw))
            _nla_raw(&b, _m.RTA_OIF, &idx, 4)
            k += 1
            _msg_end(&b, msg, _RTM_NEWROUTE, _F_CREATE | (_F_ACK if k == total else 0), seq)
            seq += 1
        return b.data[:b.len]
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot lay out the link's configuration: {exc}") from None
    finally:
        free(b.data)


# --- decoding --------------------------------------------------------------------------

cdef inline uint16_t _u16(const unsigned char* p):
    return (<const uint16_t*>p)[0]


cdef inline uint32_t _u32(const unsigned char* p):
    return (<const uint32_t*>p)[0]


cdef dict _HEADER_FIELDS = {}


cdef tuple _get_header(const unsigned char* p, bytes fmt):
    cdef Py_ssize_t i, n = 0, off = 0
    cdef char c
    cdef object v  # a Python int: the tuple takes a reference to it
    nfields = _HEADER_FIELDS.get(fmt)
    if nfields is None:
        nfields = _HEADER_FIELDS[fmt] = len(fmt) - fmt.count(b"x")
    cdef tuple out = PyTuple_New(nfields)
    for i in range(len(fmt)):
        c = fmt[i]
        if c == b"x":
            off += 1
            continue
        if c == b"B":
            v = p[off]
            off += 1
        elif c == b"H":
            v = _u16(p + off)
            off += 2
        elif c == b"I":
            v = _u32(p + off)
            off += 4
        else:  # "i"
            v = (<const int32_t*>(p + off))[0]
            off += 4
        Py_INCREF(v)
        PyTuple_SET_ITEM(out, n, v)
        n += 1
    PyObject_GC_UnTrack(out)  # ints only: never part of a cycle
    return out


cdef _Policy _sub_policy(_Policy policy, int atype, str info_kind):
    subname = policy.sub[atype]
    if subname is None:
        return _EMPTY
    if subname == "linkinfo:":
        subname = "linkinfo:" + info_kind
    return _POLICIES.get(subname, _EMPTY)


cdef list _get_attrs(bytes data, const unsigned char* base, Py_ssize_t off, Py_ssize_t end,
                     _Policy policy, int depth=0):
    cdef list attrs = []
    cdef Py_ssize_t length, vstart, vend, size, nul
    cdef int atype, kind
    cdef const unsigned char* v
    cdef bint is_linkinfo = policy.is_linkinfo
    cdef str info_kind = ""
    if depth > _MAX_NESTING:
        raise DecodeError(off, f"attributes nested deeper than {_MAX_NESTING} levels")
    while end - off >= 4:
        length = _u16(base + off)
        atype = _u16(base + off + 2) & 0x3FFF
        if length < 4 or off + length > end:
            raise DecodeError(off, f"attribute length {length} overruns its container")
        vstart = off + 4
        vend = off + length
        size = vend - vstart
        v = base + vstart
        kind = policy.kind[atype] if atype < MAX_ATTR else K_BYTES
        if kind == K_U32 and size == 4:
            value = _u32(v)
        elif kind == K_STR:
            nul = 0
            while nul < size and v[nul] != 0:
                nul += 1
            value = PyUnicode_DecodeUTF8(<const char*>v, nul, "surrogateescape")
            if is_linkinfo and atype == _IFLA_INFO_KIND:
                info_kind = value
        elif kind == K_U8 and size == 1:
            value = v[0]
        elif kind == K_U16 and size == 2:
            value = _u16(v)
        elif kind == K_S32 and size == 4:
            value = (<const int32_t*>v)[0]
        elif kind == K_U64 and size == 8:
            value = (<const uint64_t*>v)[0]
        elif kind == K_BE16 and size == 2:
            value = (v[0] << 8) | v[1]
        elif kind == K_NESTED:
            value = _get_attrs(data, base, vstart, vend, _sub_policy(policy, atype, info_kind),
                               depth + 1)
        elif kind == K_IFINFO and size >= _IFINFO_SIZE:
            value = (_get_header(v, _IFINFO_FMT),
                     _get_attrs(data, base, vstart + _IFINFO_SIZE, vend,
                                _sub_policy(policy, atype, info_kind), depth + 1))
        elif kind == K_FLAG and size == 0:
            value = None
        else:
            kind = K_BYTES
            value = PyBytes_FromStringAndSize(<const char*>v, size)
        attrs.append(cnm_make3(_ATTR_T, atype, kind, value))
        off += (length + 3) & ~3
    return attrs


def decode(data):
    """Parse a stream of netlink messages; DecodeError on anything malformed.

    The cyclic garbage collector is paused while the result is built: decoding makes
    many small objects that cannot form cycles, and scanning them as they are born is
    wasted work (the collector runs as usual afterwards).
    """
    cdef int was_enabled = PyGC_Disable()
    try:
        return _decode(data)
    finally:
        if was_enabled:
            PyGC_Enable()


cdef list _decode(object data):
    cdef bytes buf = bytes(data)
    cdef const unsigned char* base = buf
    cdef Py_ssize_t total = len(buf)
    cdef Py_ssize_t off = 0, end, body, attr_start, hsize
    cdef uint32_t length
    cdef int mtype, flags
    cdef list out = []
    while off < total:
        if total - off < 16:
            raise DecodeError(off, f"{total - off} bytes left, too short for a header")
        length = _u32(base + off)
        mtype = _u16(base + off + 4)
        flags = _u16(base + off + 6)
        if length < 16 or off + <Py_ssize_t>length > total:
            raise DecodeError(off, f"message length {length} does not fit")
        end = off + length
        body = off + 16
        fmt = _TYPE_FMT[mtype] if mtype < MAX_TYPE else None
        seq = _u32(base + off + 8)
        pid = _u32(base + off + 12)
        if fmt is None:
            out.append(cnm_make6(_MESSAGE_T, mtype, flags, seq, pid, (),
                                 [cnm_make3(_ATTR_T, 0, K_BYTES, buf[body:end])]))
        else:
            hsize = _TYPE_HSIZE[mtype]
            if end - body < hsize:
                raise DecodeError(off, f"message type {mtype} is shorter than its header")
            header = _get_header(base + body, fmt)
            attr_start = body + hsize
            if mtype == _NLMSG_ERROR:
                if not flags & _NLM_F_CAPPED:
                    attr_start = body + 4 + max(<Py_ssize_t>header[1], 16)
                if flags & _NLM_F_ACK_TLVS and attr_start <= end:
                    attrs = _get_attrs(buf, base, attr_start, end, _NLMSGERR_POLICY)
                else:
                    attrs = []
            else:
                attrs = _get_attrs(buf, base, attr_start, end, <_Policy>_TYPE_POLICY[mtype])
            out.append(cnm_make6(_MESSAGE_T, mtype, flags, seq, pid, header, attrs))
        off += (length + 3) & ~3
    return out
