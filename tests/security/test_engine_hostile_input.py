"""Issue #10 item 2 against real peers: deeply nested JSON on every method and both transports, streamed
and invoked runs that fail in every way a step or its output can, and results whose ``__blazen_serialize__``
fails. Each answer has a defined status, no traceback is logged, the concurrency slot comes back and the
process keeps serving."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from blazen_peer.wire.envelope import wrap
from blazen_peer.wire.messages import SubWorkflowEvent, SubWorkflowRequest, SubWorkflowResponse

from .conftest import (
    DEREF,
    INVOKE,
    RELEASE,
    ROUTE_DEREF,
    ROUTE_INVOKE,
    ROUTE_RELEASE,
    PeerFactory,
    invoke_json,
    request,
)

DEPTH = 10_000
DEEP_ARRAY = "[" * DEPTH + "]" * DEPTH
DEEP_OBJECT = '{"a":' * DEPTH + "1" + "}" * DEPTH


def deep_request(text: str) -> bytes:
    return wrap(SubWorkflowRequest("wf", ["echo"], text.encode()).encode())


@pytest.mark.timeout(120)
async def test_deeply_nested_json_gets_a_defined_status_on_every_method(peer_factory: PeerFactory) -> None:
    peer = await peer_factory("--max-concurrent-workflows", "2")
    t0 = time.monotonic()
    for text in (DEEP_ARRAY, DEEP_OBJECT):
        # gRPC: the nesting sits in input_json (Invoke, Stream), or is the whole payload (Deref, Release).
        code, details = await peer.unary(INVOKE, deep_request(text))
        assert (code, details[:19]) == ("INVALID_ARGUMENT", b"invalid input JSON:"), details[:200]
        code, details, frames = await peer.stream(deep_request(text))
        assert (code, details[:19], frames) == ("INVALID_ARGUMENT", "invalid input JSON:", []), details
        for method in (DEREF, RELEASE):
            code, details = await peer.unary(method, wrap(text.encode()))
            assert code == "INVALID_ARGUMENT", (method, code, details[:200])
        # HTTP: the whole body, a nested field, and nested input_json given as a string.
        for route in (ROUTE_INVOKE, ROUTE_DEREF, ROUTE_RELEASE):
            for body in (text, f'{{"envelope_version":1,"ref_uuid":{text},"step_ids":{text}}}'):
                status, answer = await peer.post(route, body)
                assert status == 400, (route, status, str(answer)[:200])
                assert answer["error"].startswith("invalid request JSON"), answer
        body = invoke_json(["echo"]).replace('"input_json": [', f'"input_json": {json.dumps(text)}, "x": [')
        status, answer = await peer.post(ROUTE_INVOKE, body)
        assert (status, answer["error"][:18]) == (400, "invalid input JSON"), (status, str(answer)[:200])
    print(f"10,000-level nesting, 2 shapes x 4 gRPC methods + 7 HTTP bodies: {time.monotonic() - t0:.2f} s")
    # Nesting that parses but is too deep to write back (echo returns it): a workflow error, not a crash.
    for depth in (400, 900, 990):
        code, body = await peer.unary(INVOKE, deep_request('{"v":' + "[" * depth + "]" * depth + "}"))
        assert code in ("OK", "INVALID_ARGUMENT"), (depth, code, body[:200])
        error = SubWorkflowResponse.decode(body).error if code == "OK" else body.decode()
        assert error is None or "maximum recursion depth" in error, (depth, error)
    assert time.monotonic() - t0 < 60
    assert peer.tracebacks() == 0, peer.log()[-3000:]
    await peer.assert_serving()


BASE_EXCEPTIONS = ["system_exit", "keyboard_interrupt", "cancelled", "generator_exit", "recursion"]


@pytest.mark.timeout(180)
async def test_steps_raising_base_exceptions_fail_the_run_not_the_process(peer_factory: PeerFactory) -> None:
    """One concurrency slot: if any failed call kept it, the next call would be refused."""
    peer = await peer_factory("--max-concurrent-workflows", "1")
    for step in ("raise", "sync_raise"):
        for kind in BASE_EXCEPTIONS:
            resp = await asyncio.wait_for(peer.invoke([step], {"kind": kind}), 20)
            failed = f"workflow error: step '{step}' failed"
            assert isinstance(resp, SubWorkflowResponse), (step, kind, resp)
            assert (resp.error or "").startswith(failed), (step, kind, resp.error)
            code, _, frames = await peer.stream(request([step], {"kind": kind}), deadline=20)
            assert (code, type(frames[-1])) == ("OK", SubWorkflowResponse), (step, kind, code, frames)
            assert frames[-1].error.startswith(failed), frames[-1]
            status, body = await peer.post(ROUTE_INVOKE, invoke_json([step], {"kind": kind}))
            assert (status, body["error"][: len(failed)]) == (200, failed), (step, kind, body)
    resp = await peer.invoke(["recurse"])
    assert resp.error.startswith("workflow error: step 'recurse' failed: maximum recursion depth"), resp
    assert await peer.wait_refs(0) == 0
    assert peer.tracebacks() == 0, peer.log()[-3000:]
    await peer.assert_serving()


RESULT_KINDS = {
    "serialize": "cannot serialize this blob",
    "serialize_exit": "SystemExit",
    "nan": "Out of range float values are not JSON compliant",
    "deep": "maximum recursion depth",
    "object": "Object of type object is not JSON serializable",
}


@pytest.mark.timeout(180)
async def test_unserializable_results_and_events_answer_with_an_error(peer_factory: PeerFactory) -> None:
    peer = await peer_factory("--max-concurrent-workflows", "1")
    for kind, words in RESULT_KINDS.items():
        # Invoke: OK with error; the run's refs (2 context-drop refs, the ref made for "a") are gone.
        resp = await asyncio.wait_for(peer.invoke(["bad_result"], {"kind": kind}), 20)
        assert isinstance(resp, SubWorkflowResponse), (kind, resp)
        assert "not JSON-serializable" in (resp.error or ""), (kind, resp.error)
        assert words in resp.error, (kind, resp.error)
        assert (resp.result_json, resp.remote_refs) == (None, {}), resp
        assert await peer.wait_refs(0) == 0, kind
        # Stream: the final frame carries the error.
        code, _, frames = await peer.stream(request(["bad_result"], {"kind": kind}), deadline=20)
        assert (code, type(frames[-1])) == ("OK", SubWorkflowResponse), (kind, code, frames)
        assert words in frames[-1].error, (kind, frames[-1].error)
        # HTTP: 200 with the error set, as InvokeSubWorkflow.
        status, body = await peer.post(ROUTE_INVOKE, invoke_json(["bad_result"], {"kind": kind}))
        assert (status, body["result_json"]) == (200, None), (kind, body)
        assert words in body["error"], (kind, body)
        assert await peer.wait_refs(0) == 0, kind
        # An event that cannot be encoded ends the stream with an error after the events before it.
        if kind == "serialize_exit":
            continue
        code, _, frames = await peer.stream(request(["bad_event", "noise"], {"kind": kind}), deadline=20)
        assert code == "OK", (kind, code, frames)
        assert [type(f) for f in frames] == [SubWorkflowEvent, SubWorkflowResponse], (kind, frames)
        assert frames[0].event_type == "Noise"
        assert "event 'Bad' from step 'bad_event'" in (frames[-1].error or ""), frames
        assert words.split(":")[0] in frames[-1].error, (kind, frames[-1].error)
        assert await peer.wait_refs(0) == 0, kind
    assert peer.tracebacks() == 0, peer.log()[-3000:]
    await peer.assert_serving()
