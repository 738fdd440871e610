"""Wire codec: messages ↔ msgpack bytes, with strict validation and size limits.

A message is the msgpack array `[version, tag, field, ...]`; nested `PeerRef`/`Token` are arrays of
their fields. Frames are a 4-byte big-endian length then the message. Decoding checks the
version, the tag, the number of fields and each field's type and range: anything else is a
`RemoteProtocolError` whose text says what was wrong, so the caller can close that one link
with a clear reason. Encoding a message that would not decode is a `LocalProtocolError`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any

import msgpack

from meshcast import messages as m
from meshcast.errors import LocalProtocolError, RemoteProtocolError

MAX_FRAME = 64 * 1024
"""Largest control frame accepted (bytes, after the length prefix)."""

_LEN = struct.Struct(">I")
Check = Callable[[Any, Any], Any]
"""A field check: (value, where) → the value; `where` names the field for an error message, as
a string or a (parent, field name or list index) pair: `_path` spells it out only on failure,
since `encode` runs every check on every message sent."""


# -- field checks: each returns the (possibly converted) value or raises -------------------------


def _path(where: Any) -> str:
    """`where` as a dotted path: ("Assign", "parent"), "address") → "Assign.parent.address"."""
    steps = []
    while type(where) is tuple:
        where, step = where
        steps.append(f"[{step}]" if type(step) is int else f".{step}")
    return where + "".join(reversed(steps))


def _fail(where: Any, expected: str, value: Any) -> RemoteProtocolError:
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return RemoteProtocolError(f"{_path(where)}: expected {expected}, got {shown}")


def integer(lo: int, hi: int) -> Check:
    def check(v: Any, where: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _fail(where, f"an integer in [{lo}, {hi}]", v)
        return v
    return check


def number(lo: float, hi: float) -> Check:
    def check(v: Any, where: Any) -> float:
        if type(v) not in (int, float) or not (lo <= v <= hi) or math.isnan(v):
            raise _fail(where, f"a number in [{lo}, {hi}]", v)
        return float(v)
    return check


def text(max_len: int) -> Check:
    def check(v: Any, where: Any) -> str:
        if type(v) is not str or len(v) > max_len:
            raise _fail(where, f"a string of at most {max_len} characters", v)
        return v
    return check


def blob(max_len: int, exact: bool = False) -> Check:
    def check(v: Any, where: Any) -> bytes:
        if type(v) is not bytes or len(v) > max_len or (exact and len(v) != max_len):
            size = f"exactly {max_len}" if exact else f"at most {max_len}"
            raise _fail(where, f"{size} bytes", v)
        return v
    return check


def token_sig(v: Any, where: Any) -> bytes:
    """A token's signature; if it was signed in a batch, then its salt and the batch's digests
    (1 to `TOKEN_BATCH`)."""
    if type(v) is bytes:
        digests = len(v) - m.SIG_LEN - m.TOKEN_SALT
        if len(v) == m.SIG_LEN or (0 < digests <= m.TOKEN_BATCH * m.TOKEN_DIGEST
                                   and digests % m.TOKEN_DIGEST == 0):
            return v
    raise _fail(where, f"{m.SIG_LEN} bytes, or those, a salt of {m.TOKEN_SALT} and 1 to "
                       f"{m.TOKEN_BATCH} digests of {m.TOKEN_DIGEST}", v)


def boolean(v: Any, where: Any) -> bool:
    if type(v) is not bool:
        raise _fail(where, "true or false", v)
    return v


def array(item: Check, max_len: int = m.MAX_LIST) -> Check:
    def check(v: Any, where: Any) -> tuple:
        if type(v) is not list or len(v) > max_len:
            raise _fail(where, f"a list of at most {max_len} items", v)
        return tuple(item(x, (where, i)) for i, x in enumerate(v))
    return check


def optional(inner: Check) -> Check:
    def check(v: Any, where: Any) -> Any:
        return None if v is None else inner(v, where)
    return check


def nested(cls: type) -> Check:
    def check(v: Any, where: Any) -> Any:
        return _build(cls, v, where)
    return check


NODE_ID = integer(-1, 2**48)
SEQ = integer(0, 2**48)
SUBSTREAM = integer(0, m.MAX_SUBSTREAMS - 1)
CHANNEL = text(m.MAX_CHANNEL)
ADDRESS = text(m.MAX_ADDRESS)
REASON = text(m.MAX_REASON)
KBPS = integer(0, 10_000_000)
TIME = number(-1e12, 1e12)
SIG = blob(m.SIG_LEN, exact=True)
KEY = blob(m.KEY_LEN, exact=True)
COUNT = integer(0, 1 << 20)

# Each message: its tag and one check per dataclass field, in declaration order.
SCHEMA: dict[type, tuple[int, tuple[Check, ...]]] = {
    m.PeerRef: (0, (NODE_ID, ADDRESS)),
    m.Token: (0, (NODE_ID, NODE_ID, CHANNEL, integer(-1, m.MAX_SUBSTREAMS - 1), TIME, token_sig)),
    m.Resume: (0, (NODE_ID, integer(-1, m.MAX_SUBSTREAMS - 1),
                   array(nested(m.PeerRef), m.MAX_SUBSTREAMS), optional(nested(m.Token)), COUNT)),
    m.Announce: (1, (CHANNEL, KEY, ADDRESS, KBPS, KBPS, integer(1, m.MAX_SUBSTREAMS),
                     integer(10, 10_000), SIG, NODE_ID, blob(m.KEY_LEN), COUNT)),
    m.Join: (2, (CHANNEL, ADDRESS, KBPS, array(number(-1e6, 1e6), 8), optional(nested(m.Resume)))),
    m.Welcome: (3, (NODE_ID, CHANNEL, KEY, KEY, integer(1, m.MAX_SUBSTREAMS),
                    integer(10, 10_000), KBPS, text(8), NODE_ID)),
    m.Assign: (4, (SUBSTREAM, nested(m.PeerRef), optional(nested(m.Token)), optional(nested(m.PeerRef)),
                   optional(nested(m.Token)), boolean)),
    m.Neighbours: (5, (array(nested(m.PeerRef), 64), array(nested(m.Token), 64), NODE_ID)),
    m.Reject: (6, (REASON,)),
    m.Leave: (7, (REASON,)),
    m.ParentLost: (8, (SUBSTREAM, NODE_ID, NODE_ID)),
    m.Complaint: (9, (NODE_ID, REASON, text(16))),
    m.Hello: (10, (NODE_ID, CHANNEL, optional(nested(m.Token)))),
    m.Subscribe: (11, (SUBSTREAM, nested(m.Token), integer(-1, 2**48), boolean)),
    m.Unsubscribe: (12, (SUBSTREAM,)),
    m.Refuse: (13, (SUBSTREAM, REASON)),
    m.Have: (14, (SEQ, blob(m.MAX_BITMAP))),
    m.Request: (15, (array(SEQ, 64),)),
    m.Missing: (16, (array(SEQ, 64),)),
    m.ChunkHead: (17, (CHANNEL, SEQ, integer(0, m.MAX_CHUNK), integer(0, 255), TIME, SIG)),
    m.Revoke: (18, (NODE_ID, TIME, REASON)),
    m.Detach: (19, (NODE_ID, SUBSTREAM, TIME)),
    m.Waiting: (20, (REASON,)),
}
_BY_TAG = {tag: cls for cls, (tag, _) in SCHEMA.items() if tag}
_NAMES = {cls: tuple(f.name for f in fields(cls)) for cls in SCHEMA}


def _build(cls: type, raw: Any, where: Any) -> Any:
    checks = SCHEMA[cls][1]
    if type(raw) is not list or len(raw) != len(checks):
        raise _fail(where, f"{cls.__name__} as a list of {len(checks)} fields", raw)
    return cls(*[check(v, (where, name)) for check, v, name in zip(checks, raw, _NAMES[cls])])


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    if len(names) > 1:
        return attrgetter(*names)
    name = names[0]
    return lambda obj: (getattr(obj, name),)


_VALUES = {cls: _getter(names) for cls, names in _NAMES.items()}
"""A message's field values, in order, as a tuple."""
_LEAVES = frozenset({int, float, str, bytes, bool, type(None)})


def _flatten(obj: Any) -> Any:
    """Messages and tuples as (nested) lists of plain values, the shape msgpack packs."""
    t = type(obj)
    if t in SCHEMA:
        values = _VALUES[t](obj)
    elif t is tuple:
        values = obj
    else:
        return obj
    return [v if type(v) in _LEAVES else _flatten(v) for v in values]


def encode(msg: m.Message) -> bytes:
    """Serialize a message (no length prefix)."""
    entry = SCHEMA.get(type(msg))
    if entry is None or entry[0] == 0:
        raise LocalProtocolError(f"not a top-level message: {msg!r}")
    raw = _flatten(msg)
    try:
        _build(type(msg), raw, type(msg).__name__)  # the receiver's checks: never send what it refuses
        data = msgpack.packb([m.PROTOCOL_VERSION, entry[0], *raw], use_bin_type=True)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"invalid message: {exc}") from None
    except (TypeError, ValueError) as exc:  # msgpack: unpackable object, unencodable str
        raise LocalProtocolError(f"{type(msg).__name__} cannot be encoded: {exc}") from None
    if len(data) > MAX_FRAME:
        raise LocalProtocolError(f"{type(msg).__name__} encodes to {len(data)} bytes > {MAX_FRAME}")
    return data


def frame_size(msg: m.Message) -> int:
    """Bytes `frame(msg)` takes, without the checks `encode` makes (for accounting: the simulator
    counts control bytes for messages the nodes built, which are valid by construction).

    Counted by msgpack's rules (`packed_size`), not packed: packing was 8 % of a simulation's
    joins, for a length."""
    t = type(msg)
    values = _VALUES[t](msg)
    size = (4 + _array_header(2 + len(values)) + packed_size(m.PROTOCOL_VERSION)
            + packed_size(SCHEMA[t][0]))
    for v in values:
        size += packed_size(v)
    return size


def _array_header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def packed_size(v: object) -> int:
    """Bytes msgpack (`use_bin_type=True`) packs `v` into, a nested message as the array of its
    fields (as `encode` sends it). `tests/unit/test_wire.py` checks it against msgpack."""
    if v is None or v is True or v is False:
        return 1
    if isinstance(v, int):
        if v >= 0:
            return 1 if v < 128 else 2 if v < 256 else 3 if v < 65536 else 5 if v < 1 << 32 else 9
        return (1 if v >= -32 else 2 if v >= -128 else 3 if v >= -32768 else 5 if v >= -(1 << 31)
                else 9)
    if isinstance(v, float):
        return 9
    if isinstance(v, str):
        n = len(v) if v.isascii() else len(v.encode())
        return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)
    if isinstance(v, bytes):
        n = len(v)
        return n + (2 if n < 256 else 3 if n < 65536 else 5)
    if isinstance(v, (tuple, list)):
        size = _array_header(len(v))
        for x in v:
            size += packed_size(x)
        return size
    return packed_size(_VALUES[type(v)](v))  # a nested message


def decode(data: bytes) -> m.Message:
    """Parse and validate one message; `RemoteProtocolError` says what is wrong."""
    if len(data) > MAX_FRAME:
        raise RemoteProtocolError(f"message of {len(data)} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        raw = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, ValueError, UnicodeError…)
        raise RemoteProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None
    if type(raw) is not list or len(raw) < 2:
        raise _fail("message", "a list [version, tag, fields...]", raw)
    version, tag = raw[0], raw[1]
    if version != m.PROTOCOL_VERSION or type(version) is not int:
        raise RemoteProtocolError(
            f"unsupported protocol version {version!r} (this node speaks {m.PROTOCOL_VERSION})")
    cls = _BY_TAG.get(tag) if type(tag) is int else None
    if cls is None:
        raise _fail("message tag", "a known message type", tag)
    return _build(cls, raw[2:], cls.__name__)


def frame(msg: m.Message) -> bytes:
    """Length-prefixed encoding, for streams."""
    data = encode(msg)
    return _LEN.pack(len(data)) + data


class FrameReader:
    """Incremental decoder for a stream of frames; bytes arrive in arbitrary pieces."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes, *, most: int = 1 << 30) -> list[m.Message]:
        """Add bytes; return the messages now complete (at most `most`; the rest stays
        buffered for `take_rest`). Raises `RemoteProtocolError`."""
        self._buf += data
        out: list[m.Message] = []
        while len(self._buf) >= 4 and len(out) < most:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise RemoteProtocolError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4:4 + size])
            del self._buf[:4 + size]
            out.append(decode(body))
        return out

    def take_rest(self) -> bytes:
        """Bytes received after the last complete frame (a chunk stream's payload start)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def pending(self) -> int:
        return len(self._buf)
