"""The postcard payload structs of the Blazen peer protocol, envelope version 1.

Field order is the wire order. Every ``decode`` is strict and ignores trailing bytes; every ``encode`` writes
exactly the bytes Blazen 0.6.74 writes. UUIDs are carried as lowercase hyphenated strings in Python and as
``0x10`` + 16 raw bytes on the wire. The classes are plain ``__slots__`` objects: they sit on the hot path.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Self

from .postcard import PostcardDecodeError, Reader, Writer, parse_uuid, uuid_str, varint
from .protocol import ENVELOPE_VERSION, MAX_MESSAGE_BYTES

STREAM_FRAME_EVENT = 0
STREAM_FRAME_FINAL = 1
# What the envelope adds around a payload (tag byte + length varint), rounded up.
ENVELOPE_HEADER_BYTES = 8


class _Message:
    __slots__: tuple[str, ...] = ()
    # Every slot of the class and its bases: a subclass's own ``__slots__`` names only the slots it adds
    # (``DerefRequest`` adds none to ``_RefRequest``'s).
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = cls._fields + tuple(cls.__dict__.get("__slots__", ()))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


class SubWorkflowRequest(_Message):
    __slots__ = ("envelope_version", "input_json", "step_ids", "timeout_secs", "workflow_name")

    def __init__(
        self,
        workflow_name: str,
        step_ids: list[str] | None = None,
        input_json: bytes = b"{}",
        timeout_secs: int | None = None,
        envelope_version: int = ENVELOPE_VERSION,
    ) -> None:
        self.envelope_version = envelope_version
        self.workflow_name = workflow_name
        self.step_ids = list(step_ids) if step_ids is not None else []
        self.input_json = input_json
        self.timeout_secs = timeout_secs

    @classmethod
    def new(
        cls,
        workflow_name: str,
        step_ids: list[str] | None = None,
        input: Any = None,
        timeout_secs: int | None = None,
    ) -> SubWorkflowRequest:
        """Build a request from a Python input value (default ``{}``), as Blazen's constructor does."""
        payload = dumps_json({} if input is None else input)
        return cls(workflow_name, step_ids, payload, timeout_secs)

    def input_value(self) -> Any:
        return json.loads(self.input_json)

    def encode(self) -> bytes:
        w = Writer().u32(self.envelope_version).str(self.workflow_name)
        w.usize(len(self.step_ids))
        for sid in self.step_ids:
            w.str(sid)
        w.bytes(self.input_json)
        if self.timeout_secs is None:
            w.option_tag(False)
        else:
            w.option_tag(True).u64(self.timeout_secs)
        return w.getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> SubWorkflowRequest:
        fast = _fast_request(buf)
        if fast is not None:
            return fast
        return cls.decode_strict(buf)

    @classmethod
    def decode_strict(cls, buf: bytes) -> SubWorkflowRequest:
        r = Reader(buf)
        version = r.take_u32()
        name = r.take_str()
        step_ids = [r.take_str() for _ in range(r.take_count())]
        input_json = r.take_bytes()
        timeout = r.take_option_u64()
        return cls(name, step_ids, input_json, timeout, version)


def _fast_request(buf: bytes) -> SubWorkflowRequest | None:
    """The hot path: every varint below 2**14 and all data present. Anything else (including every malformed
    input) returns None and takes the strict ``Reader`` path, which produces the exact errors."""
    try:
        n = len(buf)
        version = buf[0]
        if version >= 0x80:
            return None
        pos = 1
        ln = buf[pos]
        if ln >= 0x80:
            return None
        pos += 1
        end = pos + ln
        if end > n:
            return None
        name = buf[pos:end].decode()
        pos = end
        count = buf[pos]
        if count >= 0x80:
            return None
        pos += 1
        ids = []
        for _ in range(count):
            ln = buf[pos]
            if ln >= 0x80:
                return None
            pos += 1
            end = pos + ln
            if end > n:
                return None
            ids.append(buf[pos:end].decode())
            pos = end
        ln = buf[pos]
        pos += 1
        if ln >= 0x80:
            hi = buf[pos]
            if hi >= 0x80:
                return None
            ln = (ln & 0x7F) | (hi << 7)
            pos += 1
        end = pos + ln
        if end > n:
            return None
        input_json = bytes(buf[pos:end])
        tag = buf[end]
        if tag == 0:
            timeout = None
        elif tag == 1 and end + 1 < n and buf[end + 1] < 0x80:
            timeout = buf[end + 1]
        else:
            return None
    except (IndexError, UnicodeDecodeError):
        return None
    req = SubWorkflowRequest.__new__(SubWorkflowRequest)
    req.envelope_version = version
    req.workflow_name = name
    req.step_ids = ids
    req.input_json = input_json
    req.timeout_secs = timeout
    return req


class RemoteRefDescriptor(_Message):
    __slots__ = ("created_at_epoch_ms", "origin_node_id", "type_tag")

    def __init__(self, origin_node_id: str, type_tag: str, created_at_epoch_ms: int) -> None:
        self.origin_node_id = origin_node_id
        self.type_tag = type_tag
        self.created_at_epoch_ms = created_at_epoch_ms

    def write(self, w: Writer) -> None:
        w.str(self.origin_node_id).str(self.type_tag).u64(self.created_at_epoch_ms)

    @classmethod
    def read(cls, r: Reader) -> RemoteRefDescriptor:
        return cls(r.take_str(), r.take_str(), r.take_u64())


class SubWorkflowResponse(_Message):
    __slots__ = ("envelope_version", "error", "remote_refs", "result_json", "state_json")

    def __init__(
        self,
        state_json: dict[str, bytes] | None = None,
        result_json: bytes | None = None,
        remote_refs: dict[str, RemoteRefDescriptor] | None = None,
        error: str | None = None,
        envelope_version: int = ENVELOPE_VERSION,
    ) -> None:
        self.envelope_version = envelope_version
        self.state_json = state_json if state_json is not None else {}
        self.result_json = result_json
        self.remote_refs = remote_refs if remote_refs is not None else {}
        self.error = error

    def result_value(self) -> Any:
        return None if self.result_json is None else json.loads(self.result_json)

    def state_values(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.state_json.items()}

    def encode(self) -> bytes:
        state = self.state_json
        refs = self.remote_refs
        result = self.result_json
        if not state and not refs and self.error is None and result is not None:
            # The common shape (success, nothing exported): one concatenation.
            return b"".join(
                (varint(self.envelope_version), b"\x00\x01", varint(len(result)), result, b"\x00\x00")
            )
        w = Writer().u32(self.envelope_version)
        w.usize(len(state))
        for k, v in state.items():
            w.str(k).bytes(v)
        if result is None:
            w.option_tag(False)
        else:
            w.option_tag(True).bytes(result)
        w.usize(len(refs))
        for key, desc in refs.items():
            w.uuid(parse_uuid(key))
            desc.write(w)
        if self.error is None:
            w.option_tag(False)
        else:
            w.option_tag(True).str(self.error)
        return w.getvalue()

    def encode_within_limit(self) -> bytes:
        """``encode()``, unless that (in its envelope) exceeds the message limit: then the same run's refs
        with an error that says so, an OK answer the caller can act on instead of a failed transport. Every
        InvokeSubWorkflow answer (a peer's, a router's split run) goes through here."""
        out = self.encode()
        if len(out) <= MAX_MESSAGE_BYTES - ENVELOPE_HEADER_BYTES:
            return out
        return SubWorkflowResponse(
            remote_refs=self.remote_refs,
            error=f"response too large: {len(out)} bytes of postcard exceed the {MAX_MESSAGE_BYTES}-byte "
            "message limit",
        ).encode()

    @classmethod
    def decode(cls, buf: bytes) -> SubWorkflowResponse:
        r = Reader(buf)
        version = r.take_u32()
        state: dict[str, bytes] = {}
        for _ in range(r.take_count()):
            k = r.take_str()
            state[k] = r.take_bytes()
        result = r.take_option_bytes()
        refs: dict[str, RemoteRefDescriptor] = {}
        for _ in range(r.take_count()):
            key = uuid_str(r.take_uuid())
            refs[key] = RemoteRefDescriptor.read(r)
        error = r.take_option_str()
        return cls(state, result, refs, error, version)


class _RefRequest(_Message):
    __slots__ = ("envelope_version", "ref_uuid")

    def __init__(self, ref_uuid: str, envelope_version: int = ENVELOPE_VERSION) -> None:
        self.envelope_version = envelope_version
        self.ref_uuid = ref_uuid

    def encode(self) -> bytes:
        return Writer().u32(self.envelope_version).uuid(parse_uuid(self.ref_uuid)).getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> Self:
        r = Reader(buf)
        version = r.take_u32()
        return cls(uuid_str(r.take_uuid()), version)


class DerefRequest(_RefRequest):
    __slots__ = ()


class ReleaseRequest(_RefRequest):
    __slots__ = ()


class DerefResponse(_Message):
    __slots__ = ("envelope_version", "payload")

    def __init__(self, payload: bytes, envelope_version: int = ENVELOPE_VERSION) -> None:
        self.envelope_version = envelope_version
        self.payload = payload

    def encode(self) -> bytes:
        return Writer().u32(self.envelope_version).bytes(self.payload).getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> DerefResponse:
        r = Reader(buf)
        version = r.take_u32()
        return cls(r.take_bytes(), version)


class ReleaseResponse(_Message):
    __slots__ = ("envelope_version", "released")

    def __init__(self, released: bool, envelope_version: int = ENVELOPE_VERSION) -> None:
        self.envelope_version = envelope_version
        self.released = released

    def encode(self) -> bytes:
        return Writer().u32(self.envelope_version).bool(self.released).getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> ReleaseResponse:
        r = Reader(buf)
        version = r.take_u32()
        return cls(r.take_bool(), version)


class SubWorkflowEvent(_Message):
    """One event emitted by a step, streamed by ``StreamSubWorkflowEvents`` (our extension; see
    docs/wire.md)."""

    __slots__ = ("emitted_at_epoch_ms", "envelope_version", "event_json", "event_type", "sequence", "step_id")

    def __init__(
        self,
        sequence: int,
        step_id: str,
        event_type: str,
        event_json: bytes,
        emitted_at_epoch_ms: int,
        envelope_version: int = ENVELOPE_VERSION,
    ) -> None:
        self.envelope_version = envelope_version
        self.sequence = sequence
        self.step_id = step_id
        self.event_type = event_type
        self.event_json = event_json
        self.emitted_at_epoch_ms = emitted_at_epoch_ms

    def event_value(self) -> Any:
        return json.loads(self.event_json)

    def encode(self) -> bytes:
        w = Writer().u32(self.envelope_version).u64(self.sequence).str(self.step_id).str(self.event_type)
        return w.bytes(self.event_json).u64(self.emitted_at_epoch_ms).getvalue()

    @classmethod
    def read(cls, r: Reader) -> SubWorkflowEvent:
        version = r.take_u32()
        seq = r.take_u64()
        step_id = r.take_str()
        event_type = r.take_str()
        event_json = r.take_bytes()
        return cls(seq, step_id, event_type, event_json, r.take_u64(), version)

    @classmethod
    def decode(cls, buf: bytes) -> SubWorkflowEvent:
        return cls.read(Reader(buf))


def encode_stream_event(event: SubWorkflowEvent) -> bytes:
    """``SubWorkflowStreamFrame::Event(SubWorkflowEvent)``: variant index 0, then the struct."""
    return b"\x00" + event.encode()


def encode_stream_final(response: SubWorkflowResponse) -> bytes:
    """``SubWorkflowStreamFrame::Final(SubWorkflowResponse)``: variant index 1, then the struct."""
    return b"\x01" + response.encode()


def decode_stream_frame(buf: bytes) -> SubWorkflowEvent | SubWorkflowResponse:
    r = Reader(buf)
    tag = r.take_enum_tag()
    if tag == STREAM_FRAME_EVENT:
        return SubWorkflowEvent.read(r)
    if tag == STREAM_FRAME_FINAL:
        return SubWorkflowResponse.decode(buf[r.pos :])
    raise PostcardDecodeError("Serde Deserialization Error")


_JSON_OPTIONS: dict[str, Any] = {
    "separators": (",", ":"),
    "ensure_ascii": False,
    "sort_keys": True,
    "allow_nan": False,
}
# json.dumps builds a new encoder whenever it is given options; this one is built once (hot path).
_PLAIN_ENCODER = json.JSONEncoder(**_JSON_OPTIONS)


def json_encoder(default: Any) -> json.JSONEncoder:
    """An encoder writing ``dumps_json``'s form with a ``default`` hook; build it once and keep it."""
    return json.JSONEncoder(**_JSON_OPTIONS, default=default)


def dumps_json(value: Any, default: Any = None) -> bytes:
    """Compact JSON text as UTF-8 bytes, keys sorted, non-ASCII raw: the form Blazen writes."""
    encoder = _PLAIN_ENCODER if default is None else json_encoder(default)
    return encoder.encode(value).encode("utf-8")
