"""The protobuf envelope: ``message PostcardRequest/PostcardResponse { bytes postcard_payload = 1; }``.

Generated code is not needed: field 1 is the only field. Unwrapping tolerates a missing field (empty payload),
unknown fields (skipped) and repeats (last wins), as prost does.
"""

from __future__ import annotations

from .errors import PeerError
from .postcard import varint


class EnvelopeDecodeError(PeerError, ValueError):
    pass


def wrap(payload: bytes) -> bytes:
    if not payload:
        return b""
    n = len(payload)
    if n < 0x80:
        return b"\x0a" + bytes((n,)) + payload
    return b"\x0a" + varint(n) + payload


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise EnvelopeDecodeError("unexpected end of buffer")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7
        if shift >= 64:
            raise EnvelopeDecodeError("invalid varint")


def unwrap(msg: bytes) -> bytes:
    """Return the ``postcard_payload`` bytes of an encoded envelope message."""
    n = len(msg)
    # Fast path: exactly one field 1 with a one- or two-byte length, covering the whole message.
    if n >= 2 and msg[0] == 0x0A:
        b1 = msg[1]
        if b1 < 0x80:
            if b1 + 2 == n:
                return msg[2:]
        elif n >= 3 and msg[2] < 0x80 and (b1 & 0x7F) + (msg[2] << 7) + 3 == n:
            return msg[3:]
    payload = b""
    pos = 0
    while pos < n:
        key, pos = _read_varint(msg, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise EnvelopeDecodeError("invalid tag value: 0")
        if wire_type == 0:
            _, pos = _read_varint(msg, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(msg, pos)
            end = pos + length
            if end > n:
                raise EnvelopeDecodeError("buffer underflow")
            if field == 1:
                payload = msg[pos:end]
            pos = end
        else:
            raise EnvelopeDecodeError(f"invalid wire type value: {wire_type}")
        if pos > n:
            raise EnvelopeDecodeError("buffer underflow")
    return bytes(payload)
