"""Postcard 1.x primitives (serde data model, non-human-readable), strict on decode.

Error texts are postcard's own ``Display`` strings, because Blazen's server puts them verbatim into
``INVALID_ARGUMENT postcard decode failed: <text>`` and clients may match on them.
"""

from __future__ import annotations

import builtins
import uuid as _uuid

from .errors import PeerError

UNEXPECTED_END = "Hit the end of buffer, expected more data"
BAD_VARINT = "Found a varint that didn't terminate. Is the usize too big for this platform?"
BAD_BOOL = "Found a bool that wasn't 0 or 1"
BAD_UTF8 = "Tried to parse invalid utf-8"
BAD_OPTION = "Found an Option discriminant that wasn't 0 or 1"
BAD_ENUM = "Found an enum discriminant that was > u32::max_value()"
SERDE_DE = "Serde Deserialization Error"

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class PostcardDecodeError(PeerError, ValueError):
    """Raised for any malformed postcard input; ``str()`` is postcard's message."""


class Reader:
    """A cursor over a bytes-like object. Every ``take_*`` advances ``pos`` or raises."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def _varint(self, max_bytes: int, limit: int) -> int:
        buf = self.buf
        pos = self.pos
        out = 0
        shift = 0
        for _ in range(max_bytes):
            if pos >= len(buf):
                raise PostcardDecodeError(UNEXPECTED_END)
            b = buf[pos]
            pos += 1
            out |= (b & 0x7F) << shift
            if b < 0x80:
                if out > limit:
                    raise PostcardDecodeError(BAD_VARINT)
                self.pos = pos
                return out
            shift += 7
        raise PostcardDecodeError(BAD_VARINT)

    def take_u32(self) -> int:
        return self._varint(5, U32_MAX)

    def take_u64(self) -> int:
        return self._varint(10, U64_MAX)

    take_usize = take_u64

    def take_count(self) -> int:
        """The length of a sequence or map. Each element takes at least one byte, so a length beyond the
        buffer fails here, before anything is allocated for it."""
        n = self.take_u64()
        if n > len(self.buf):
            raise PostcardDecodeError(UNEXPECTED_END)
        return n

    def take_u8(self) -> int:
        pos = self.pos
        if pos >= len(self.buf):
            raise PostcardDecodeError(UNEXPECTED_END)
        self.pos = pos + 1
        return self.buf[pos]

    def take_bool(self) -> bool:
        b = self.take_u8()
        if b > 1:
            raise PostcardDecodeError(BAD_BOOL)
        return b == 1

    def take_option_tag(self) -> bool:
        b = self.take_u8()
        if b > 1:
            raise PostcardDecodeError(BAD_OPTION)
        return b == 1

    def take_raw(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end > len(self.buf):
            raise PostcardDecodeError(UNEXPECTED_END)
        self.pos = end
        return bytes(self.buf[pos:end])

    def take_bytes(self) -> bytes:
        return self.take_raw(self.take_usize())

    def take_str(self) -> str:
        raw = self.take_raw(self.take_usize())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PostcardDecodeError(BAD_UTF8) from None

    def take_uuid(self) -> bytes:
        """A ``uuid::Uuid`` in a non-human-readable format: byte length 16, then 16 raw bytes."""
        n = self.take_usize()
        if n != 16:
            # The uuid crate's visitor rejects any other byte-slice length with a custom serde error.
            if n > len(self.buf) - self.pos:
                raise PostcardDecodeError(UNEXPECTED_END)
            raise PostcardDecodeError(SERDE_DE)
        return self.take_raw(16)

    def take_option_u64(self) -> int | None:
        return self.take_u64() if self.take_option_tag() else None

    def take_option_bytes(self) -> bytes | None:
        return self.take_bytes() if self.take_option_tag() else None

    def take_option_str(self) -> str | None:
        return self.take_str() if self.take_option_tag() else None

    def take_enum_tag(self) -> int:
        try:
            return self._varint(5, U32_MAX)
        except PostcardDecodeError as exc:
            if str(exc) == BAD_VARINT:
                raise PostcardDecodeError(BAD_ENUM) from None
            raise


def varint(value: int) -> bytes:
    """Unsigned LEB128, as postcard writes u16/u32/u64/usize."""
    if value < 0x80:
        if value < 0:
            raise ValueError("postcard varints are unsigned")
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


class Writer:
    """Appends postcard fields to a bytearray."""

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out = bytearray()

    def u32(self, v: int) -> Writer:
        if not 0 <= v <= U32_MAX:
            raise ValueError(f"u32 out of range: {v}")
        self.out += varint(v)
        return self

    def u64(self, v: int) -> Writer:
        if not 0 <= v <= U64_MAX:
            raise ValueError(f"u64 out of range: {v}")
        self.out += varint(v)
        return self

    usize = u64

    def u8(self, v: int) -> Writer:
        self.out.append(v)
        return self

    def bool(self, v: bool) -> Writer:
        self.out.append(1 if v else 0)
        return self

    def bytes(self, v: bytes) -> Writer:
        self.out += varint(len(v))
        self.out += v
        return self

    def str(self, v: str) -> Writer:
        return self.bytes(v.encode("utf-8"))

    # ``bytes`` and ``bool`` name methods in this class body from here on: the builtins by their full name.
    def uuid(self, v: builtins.bytes) -> Writer:
        if len(v) != 16:
            raise ValueError("a uuid is 16 bytes")
        self.out += b"\x10"
        self.out += v
        return self

    def option_tag(self, present: builtins.bool) -> Writer:
        self.out.append(1 if present else 0)
        return self

    def getvalue(self) -> builtins.bytes:
        return builtins.bytes(self.out)


def uuid_str(raw: bytes) -> str:
    """16 raw bytes -> lowercase hyphenated form (Blazen's Display)."""
    return str(_uuid.UUID(bytes=raw))


def parse_uuid(text: str) -> bytes:
    """Any form the ``uuid`` crate parses (hyphenated, simple, braced, urn) -> 16 raw bytes."""
    return _uuid.UUID(text).bytes
