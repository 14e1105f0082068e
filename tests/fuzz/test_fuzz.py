"""The CI-sized fuzz run (3,000 inputs per target) and hypothesis properties of the postcard decoder.
The recorded 100,000-input run is ``python -m tests.fuzz --inputs 100000`` (figures in docs/security.md)."""

from __future__ import annotations

import contextlib

import pytest
from blazen_peer.wire.envelope import EnvelopeDecodeError, unwrap, wrap
from blazen_peer.wire.messages import DerefRequest, ReleaseRequest, SubWorkflowRequest
from blazen_peer.wire.postcard import PostcardDecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.fuzzers import DECODERS, fuzz_decoder, fuzz_grpc, fuzz_http

CI_INPUTS = 3000


def _clean(report) -> None:
    assert report.inputs == CI_INPUTS
    assert report.findings == [], report.findings[:5]


def test_decoder_short_run() -> None:
    report = fuzz_decoder(CI_INPUTS, seed=11)
    _clean(report)
    assert report.outcomes["rejected"] > 0
    assert report.outcomes["ok"] > 0


@pytest.mark.timeout(240)
async def test_grpc_transport_short_run() -> None:
    report = await fuzz_grpc(CI_INPUTS, seed=12)
    _clean(report)
    # The run reached every stage: auth, envelope, postcard, and the engine behind them.
    for code in ("UNAUTHENTICATED", "INTERNAL", "INVALID_ARGUMENT", "UNIMPLEMENTED", "OK"):
        assert report.outcomes[code] > 0, report.outcomes


@pytest.mark.timeout(240)
async def test_http_transport_short_run() -> None:
    report = await fuzz_http(CI_INPUTS, seed=13)
    _clean(report)
    for status in ("200", "400", "401", "404"):
        assert report.outcomes[status] > 0, report.outcomes


_settings = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_the_decode_error(data: bytes) -> None:
    for _, decode in DECODERS:
        with contextlib.suppress(PostcardDecodeError, EnvelopeDecodeError):
            decode(data)


_text = st.text(max_size=40)
_request = st.builds(
    SubWorkflowRequest,
    workflow_name=_text,
    step_ids=st.lists(_text, max_size=5),
    input_json=st.binary(max_size=60),
    timeout_secs=st.none() | st.integers(0, 2**64 - 1),
)


@_settings
@given(_request, st.binary(max_size=8))
def test_requests_round_trip_and_trailing_bytes_are_ignored(req: SubWorkflowRequest, tail: bytes) -> None:
    data = req.encode()
    assert SubWorkflowRequest.decode(data) == req
    assert SubWorkflowRequest.decode(data + tail) == req
    assert SubWorkflowRequest.decode(unwrap(wrap(data))) == req


@_settings
@given(_request, st.data())
def test_truncated_requests_are_refused(req: SubWorkflowRequest, data: st.DataObject) -> None:
    raw = req.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(PostcardDecodeError):
        SubWorkflowRequest.decode(raw[:cut])
    with pytest.raises(PostcardDecodeError):
        SubWorkflowRequest.decode_strict(raw[:cut])


@_settings
@given(st.uuids())
def test_ref_requests_round_trip(u) -> None:
    for cls in (DerefRequest, ReleaseRequest):
        assert cls.decode(cls(str(u)).encode()).ref_uuid == str(u)
