"""Postcard codec: the doc's hex vectors, strictness, and round-trip properties."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from blazen_peer.wire import (
    DerefRequest,
    DerefResponse,
    PostcardDecodeError,
    ReleaseRequest,
    ReleaseResponse,
    RemoteRefDescriptor,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
    decode_stream_frame,
    encode_stream_event,
    encode_stream_final,
    unwrap,
    wrap,
)
from blazen_peer.wire.messages import _fast_request
from blazen_peer.wire.postcard import Reader, varint
from hypothesis import given
from hypothesis import strategies as st

REQ_A = (
    "010973756d6d6172697a65020566657463680973756d6d6172697a651d7b2275726c223a2268747470733a2f2f6578616d706c652e"
    "636f6d227d011e"
)
RESP_B = (
    "010105636f756e74023432010d7b226563686f223a226869227d01106f1c2a3b4d5e4f608a7b9c0d1e2f3a4b086e6f64652d63617"
    "00a46696c6548616e646c6580d095ffbc3100"
)
REF = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"


def test_vector_a_request() -> None:
    req = SubWorkflowRequest.decode(bytes.fromhex(REQ_A))
    assert req == SubWorkflowRequest(
        "summarize", ["fetch", "summarize"], b'{"url":"https://example.com"}', 30
    )
    assert req.envelope_version == 1
    assert req.encode().hex() == REQ_A
    assert len(bytes.fromhex(REQ_A)) == 60
    assert wrap(req.encode())[:2] == b"\x0a\x3c"


def test_vector_a_minimal_noop() -> None:
    assert SubWorkflowRequest.new("noop").encode() == bytes.fromhex(
        "01046e6f6f700002 7b7d00".replace(" ", "")
    )


def test_vector_b_response() -> None:
    resp = SubWorkflowResponse.decode(bytes.fromhex(RESP_B))
    assert resp.state_values() == {"count": 42}
    assert resp.result_value() == {"echo": "hi"}
    assert resp.remote_refs == {REF: RemoteRefDescriptor("node-cap", "FileHandle", 1_700_000_000_000)}
    assert resp.error is None
    assert resp.encode().hex() == RESP_B


def test_vector_c_success_shape() -> None:
    resp = SubWorkflowResponse(result_json=b'{"hello":"world","n":42}')
    assert resp.encode().hex() == "0100011" + "87b2268656c6c6f223a22776f726c64222c226e223a34327d0000"


def test_vector_d_timeout() -> None:
    resp = SubWorkflowResponse(error="workflow timed out after 5s")
    assert resp.encode().hex() == "010000000" + "11b776f726b666c6f772074696d6564206f7574206166746572203573"


def test_vector_e_deref_release() -> None:
    raw = bytes.fromhex("01106f1c2a3b4d5e4f608a7b9c0d1e2f3a4b")
    assert DerefRequest(REF).encode() == raw
    assert ReleaseRequest.decode(raw).ref_uuid == REF
    assert wrap(raw)[:2] == b"\x0a\x12"
    assert DerefResponse(b"\x00\x01hello\xff").encode().hex() == "0108000168656c6c6fff"
    assert ReleaseResponse(True).encode() == b"\x01\x01"
    assert ReleaseResponse(False).encode() == b"\x01\x00"
    assert wrap(ReleaseResponse(False).encode()) == bytes.fromhex("0a020100")


@pytest.mark.parametrize("cls", [DerefRequest, ReleaseRequest])
def test_ref_requests_compare_and_show_their_fields(cls: type[DerefRequest] | type[ReleaseRequest]) -> None:
    # The two share their fields through a base class: equality and repr must still see them.
    other = "00000000-0000-4000-8000-000000000001"
    assert cls(REF) == cls(REF)
    assert cls(REF) != cls(other)
    assert cls(REF) != cls(REF, envelope_version=2)
    assert repr(cls(REF)) == f"{cls.__name__}(envelope_version=1, ref_uuid='{REF}')"


@pytest.mark.parametrize(
    ("value", "hexed"),
    [(1, "01"), (30, "1e"), (127, "7f"), (128, "8001"), (300, "ac02"), (1_700_000_000_000, "80d095ffbc31")],
)
def test_varints(value: int, hexed: str) -> None:
    assert varint(value).hex() == hexed
    assert Reader(bytes.fromhex(hexed)).take_u64() == value


def test_trailing_bytes_are_ignored() -> None:
    assert SubWorkflowRequest.decode(bytes.fromhex(REQ_A) + b"\xff\xff").timeout_secs == 30


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (bytes.fromhex(REQ_A)[:-1], "Hit the end of buffer, expected more data"),  # missing timeout value
        (
            bytes.fromhex(REQ_A)[:-2],
            "Hit the end of buffer, expected more data",
        ),  # missing timeout_secs field
        (bytes.fromhex(REQ_A)[:-2] + b"\x02", "Found an Option discriminant that wasn't 0 or 1"),
        (b"\x01\x02\xff\xfe\x00\x02{}\x00", "Tried to parse invalid utf-8"),
        (
            b"\xff\xff\xff\xff\xff\x01",
            "Found a varint that didn't terminate. Is the usize too big for this platform?",
        ),
        (
            b"\xff\xff\xff\xff\x7f",
            "Found a varint that didn't terminate. Is the usize too big for this platform?",
        ),
        (b"", "Hit the end of buffer, expected more data"),
    ],
)
def test_strict_request_decoding(payload: bytes, message: str) -> None:
    with pytest.raises(PostcardDecodeError) as err:
        SubWorkflowRequest.decode(payload)
    assert str(err.value) == message


def test_uuid_needs_the_length_prefix() -> None:
    raw = uuid.UUID(REF).bytes
    with pytest.raises(PostcardDecodeError, match="Hit the end of buffer"):
        DerefRequest.decode(b"\x01" + raw)  # 16 bytes without 0x10: first byte read as a length of 0x6f
    with pytest.raises(PostcardDecodeError, match="Serde Deserialization Error"):
        DerefRequest.decode(b"\x01\x24" + REF.encode())  # the 36-char string form
    with pytest.raises(PostcardDecodeError, match="Hit the end of buffer"):
        DerefRequest.decode(b"\x01\x10" + raw[:8])


def test_bad_bool() -> None:
    with pytest.raises(PostcardDecodeError, match="Found a bool that wasn't 0 or 1"):
        ReleaseResponse.decode(b"\x01\x02")


def test_map_any_order_and_duplicate_last_wins() -> None:
    body = b"\x01\x03" + b"\x01a\x011" + b"\x01b\x012" + b"\x01a\x013" + b"\x00\x00\x00"
    resp = SubWorkflowResponse.decode(body)
    assert resp.state_json == {"a": b"3", "b": b"2"}


def test_envelope_unwrap_variants() -> None:
    payload = bytes.fromhex(REQ_A)
    assert unwrap(wrap(payload)) == payload
    assert unwrap(b"") == b""
    unknown = b"\x10\x05" + b"\x1a\x02hi"  # field 2 varint, field 3 bytes
    assert unwrap(unknown + wrap(b"first") + wrap(payload)) == payload  # last field 1 wins
    big = b"z" * 300
    assert unwrap(wrap(big)) == big


def test_stream_frames() -> None:
    ev = SubWorkflowEvent(7, "my::step", "Mid", b'{"n":1}', 1_700_000_000_000)
    frame = encode_stream_event(ev)
    assert (
        frame.hex()
        == "00" + "01" + "07" + "086d793a3a73746570" + "034d6964" + "077b226e223a317d" + "80d095ffbc31"
    )
    assert decode_stream_frame(frame) == ev
    final = SubWorkflowResponse(result_json=b"1")
    assert decode_stream_frame(encode_stream_final(final)) == final
    with pytest.raises(PostcardDecodeError):
        decode_stream_frame(b"\x02\x01")


uuids = st.uuids().map(str)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
text = st.text(max_size=40)
blob = st.binary(max_size=300)


@given(
    st.builds(
        SubWorkflowRequest, text, st.lists(text, max_size=5), blob, st.none() | u64, st.integers(0, 2**32 - 1)
    )
)
def test_request_round_trip(req: SubWorkflowRequest) -> None:
    assert SubWorkflowRequest.decode(req.encode()) == req
    assert unwrap(wrap(req.encode())) == req.encode()


descriptors = st.builds(RemoteRefDescriptor, text, text, u64)


@given(
    st.builds(
        SubWorkflowResponse,
        st.dictionaries(text, blob, max_size=4),
        st.none() | blob,
        st.dictionaries(uuids, descriptors, max_size=4),
        st.none() | text,
    )
)
def test_response_round_trip(resp: SubWorkflowResponse) -> None:
    assert SubWorkflowResponse.decode(resp.encode()) == resp


@given(uuids, blob, st.booleans())
def test_ref_messages_round_trip(ref: str, payload: bytes, released: bool) -> None:
    assert DerefRequest.decode(DerefRequest(ref).encode()).ref_uuid == ref
    assert DerefResponse.decode(DerefResponse(payload).encode()).payload == payload
    assert ReleaseResponse.decode(ReleaseResponse(released).encode()).released is released


@given(st.binary(max_size=200))
def test_decoders_never_crash_on_garbage(data: bytes) -> None:
    for cls in (SubWorkflowRequest, SubWorkflowResponse, DerefRequest, DerefResponse, ReleaseResponse):
        with contextlib.suppress(PostcardDecodeError):
            cls.decode(data)


@given(
    st.builds(SubWorkflowRequest, text, st.lists(text, max_size=3), blob, st.none() | u64), st.integers(1, 59)
)
def test_any_truncation_fails_cleanly(req: SubWorkflowRequest, cut: int) -> None:
    data = req.encode()
    if cut < len(data):
        with pytest.raises(PostcardDecodeError):
            SubWorkflowRequest.decode(data[: len(data) - cut])


@given(
    st.binary(max_size=120)
    | st.builds(
        lambda r, tail: r.encode() + tail,
        st.builds(SubWorkflowRequest, text, st.lists(text, max_size=3), blob, st.none() | u64),
        st.binary(max_size=4),
    )
)
def test_fast_path_agrees_with_strict_decoder(data: bytes) -> None:
    fast = _fast_request(data)
    if fast is None:
        return
    assert SubWorkflowRequest.decode_strict(data) == fast
