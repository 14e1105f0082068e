"""Byte-level behaviour of both transports, seen with raw grpcio and raw HTTP (no client library of ours)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from blazen_peer import BlazenPeerServer, StepRegistry
from blazen_peer.wire import SubWorkflowRequest, SubWorkflowResponse, json_form, unwrap, wrap
from blazen_peer.wire.messages import ReleaseResponse, decode_stream_frame

from tests.support.peers import running_peer

SVC = "/blazen.peer.v1.BlazenPeer/"
REQ_A = bytes.fromhex(
    "010973756d6d6172697a65020566657463680973756d6d6172697a651d7b2275726c223a2268747470733a2f2f6578616d706c652e"
    "636f6d227d011e"
)


@pytest.fixture
async def server() -> AsyncIterator[BlazenPeerServer]:
    reg = StepRegistry()

    @reg.step("fetch")
    async def fetch(event: dict, ctx: Any) -> dict:
        return {"type": "Fetched", "url": event["url"]}

    @reg.step("summarize", accepts=["Fetched"])
    async def summarize(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": {"summary": event["url"]}}

    async with running_peer(reg, node_id="raw", insecure=True) as s:
        yield s


async def grpc_call(server: BlazenPeerServer, method: str, body: bytes, **kw: Any) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        return await ch.unary_unary(SVC + method)(body, **kw)


async def grpc_error(server: BlazenPeerServer, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await grpc_call(server, method, body)
    return err.value.code(), err.value.details()


async def test_doc_vector_a_over_grpc(server: BlazenPeerServer) -> None:
    reply = await grpc_call(server, "InvokeSubWorkflow", wrap(REQ_A) + b"")
    resp = SubWorkflowResponse.decode(unwrap(reply))
    assert resp.result_json == b'{"summary":"https://example.com"}'
    assert unwrap(reply).hex() == "010001" + "21" + resp.result_json.hex() + "0000"  # Blazen's success shape


async def test_grpc_statuses(server: BlazenPeerServer) -> None:
    assert await grpc_error(server, "InvokeSubWorkflow", wrap(REQ_A[:-2])) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "postcard decode failed: Hit the end of buffer, expected more data",
    )
    assert await grpc_error(server, "InvokeSubWorkflow", wrap(REQ_A[:-2] + b"\x05")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "postcard decode failed: Found an Option discriminant that wasn't 0 or 1",
    )
    assert await grpc_error(server, "InvokeSubWorkflow", wrap(b"\x02" + REQ_A[1:])) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "envelope version 2 is newer than supported 1",
    )
    assert await grpc_error(server, "DerefSessionRef", wrap(b"\x01\x10" + b"\x11" * 15)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "postcard decode failed: Hit the end of buffer, expected more data",
    )
    assert await grpc_error(server, "NoSuchMethod", b"") == (grpc.StatusCode.UNIMPLEMENTED, "")
    # trailing bytes ignored; unknown protobuf fields skipped
    reply = await grpc_call(server, "InvokeSubWorkflow", b"\x10\x01" + wrap(REQ_A + b"\xff\xff"))
    assert SubWorkflowResponse.decode(unwrap(reply)).error is None
    # unknown uuid: ReleaseResponse{1, false}, protobuf 0a 02 01 00, as the real server answers
    reply = await grpc_call(
        server, "ReleaseSessionRef", wrap(bytes.fromhex("01106f1c2a3b4d5e4f608a7b9c0d1e2f3a4b"))
    )
    assert reply == bytes.fromhex("0a020100")
    assert ReleaseResponse.decode(unwrap(reply)).released is False


async def test_grpc_stream(server: BlazenPeerServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        frames = [
            decode_stream_frame(unwrap(m))
            async for m in ch.unary_stream(SVC + "StreamSubWorkflowEvents")(wrap(REQ_A))
        ]
    assert [type(f).__name__ for f in frames] == [
        "SubWorkflowEvent",
        "SubWorkflowEvent",
        "SubWorkflowResponse",
    ]
    assert frames[0].step_id == "fetch"
    assert frames[0].event_value() == {"type": "Fetched", "url": "https://example.com"}
    assert frames[1].event_type == "blazen::StopEvent"
    assert frames[2].result_value() == {"summary": "https://example.com"}


async def post(
    server: BlazenPeerServer, route: str, body: bytes | str, method: str = "POST"
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method,
            f"http://127.0.0.1:{server.http_port}{route}",
            data=body,
            headers={"content-type": "application/json", "x-blazen-peer-node-id": "raw-test"},
        ) as r,
    ):
        return r.status, json.loads(await r.read())


async def test_http_captured_body_and_rendering(server: BlazenPeerServer) -> None:
    captured = (
        '{"envelope_version":1,"workflow_name":"summarize","step_ids":["fetch","summarize"],"input_json":[123,34,117,'
        "114,108,34,58,34,104,116,116,112,115,58,47,47,101,120,97,109,112,108,101,46,99,111,109,34,125],"
        '"timeout_secs":30}'
    )
    assert json_form.request_to_json(SubWorkflowRequest.decode(REQ_A)) == captured
    status, body = await post(server, "/v1/peer/invoke_sub_workflow", captured)
    assert status == 200
    assert list(body) == ["envelope_version", "state_json", "result_json", "remote_refs", "error"]
    assert body["error"] is None
    assert bytes(body["result_json"]) == b'{"summary":"https://example.com"}'
    status, body = await post(
        server,
        "/v1/peer/release_session_ref",
        '{"envelope_version":1,"ref_uuid":"6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"}',
    )
    assert (status, body) == (200, {"envelope_version": 1, "released": False})


@pytest.mark.parametrize(
    ("route", "body", "status", "error"),
    [
        (
            "/v1/peer/invoke_sub_workflow",
            '{"envelope_version":1}',
            400,
            "invalid request JSON: missing field `workflow_name`",
        ),
        ("/v1/peer/invoke_sub_workflow", "{", 400, "invalid request JSON: "),
        (
            "/v1/peer/invoke_sub_workflow",
            '{"envelope_version":1,"workflow_name":"w","step_ids":["x"],"input_json":[123,125],"timeout_secs":null}',
            404,
            "unknown step id `x`",
        ),
        (
            "/v1/peer/invoke_sub_workflow",
            '{"envelope_version":3,"workflow_name":"w","step_ids":["x"],"input_json":[123,125],"timeout_secs":null}',
            412,
            "envelope version 3 is newer than supported 1",
        ),
        (
            "/v1/peer/invoke_sub_workflow",
            '{"envelope_version":1,"workflow_name":"w","step_ids":[],"input_json":[123,125],"timeout_secs":null}',
            500,
            "workflow build failed: workflow validation failed: workflow must have at least one step",
        ),
        (
            "/v1/peer/deref_session_ref",
            '{"envelope_version":1,"ref_uuid":"6F1C2A3B4D5E4F608A7B9C0D1E2F3A4B"}',
            404,
            "session ref 6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b not found",
        ),
        ("/v1/peer/nope", "{}", 404, "Not Found"),
    ],
)
async def test_http_errors(server: BlazenPeerServer, route: str, body: str, status: int, error: str) -> None:
    got_status, got = await post(server, route, body)
    assert got_status == status
    assert set(got) == {"error"}
    assert got["error"].startswith(error)


async def test_http_wrong_method_is_json_too(server: BlazenPeerServer) -> None:
    status, body = await post(server, "/v1/peer/invoke_sub_workflow", "", method="GET")
    assert status == 405
    assert set(body) == {"error"}
