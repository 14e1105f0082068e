"""Our client against our server over both transports: results, streaming, and every typed error."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from blazen_peer import BlazenPeerServer, RefLifetime, StepRegistry
from blazen_peer.client import (
    BlazenPeerClient,
    DerefRequest,
    HttpPeerClient,
    PeerEncodeError,
    PeerEnvelopeVersionError,
    PeerError,
    PeerSessionRefNotFoundError,
    PeerTlsError,
    PeerTransportError,
    PeerUnknownStepError,
    PeerWorkflowError,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
    peer_envelope_version,
    peer_token_env,
    resolve_peer_token,
)
from blazen_peer.wire import wrap

from tests.support.peers import start_peer
from tests.support.ports import free_port


def registry() -> StepRegistry:
    reg = StepRegistry()

    @reg.step("echo")
    async def echo(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": {k: v for k, v in event.items() if k != "type"}}

    @reg.step("whoami")
    async def whoami(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": ctx.caller_node_id}

    @reg.step("boom")
    async def boom(event: dict, ctx: Any) -> None:
        raise RuntimeError("bad input")

    @reg.step("two::a")
    async def a(event: dict, ctx: Any) -> list[dict]:
        return [{"type": "Left", "v": 1}, {"type": "Right", "v": 2}]

    @reg.step("two::l", accepts=["Left"])
    async def left(event: dict, ctx: Any) -> dict:
        return {"type": "Joined", "side": "left"}

    @reg.step("two::r", accepts=["Right"])
    async def right(event: dict, ctx: Any) -> None:
        return None

    @reg.step("two::j", accepts=["Joined"])
    async def joined(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": event["side"]}

    @reg.step("ref")
    async def ref(event: dict, ctx: Any) -> dict:
        h = ctx.session_refs.insert(
            {"k": 1},
            type_tag="Dict",
            lifetime=RefLifetime.UntilExplicitDrop,
            serialize=lambda v: repr(v).encode(),
        )
        return {"type": "blazen::StopEvent", "result": h}

    return reg


async def start(name: str, **cfg: Any) -> BlazenPeerServer:
    return await start_peer(registry(), node_id=name, insecure=True, **cfg)


@pytest.fixture
async def server() -> AsyncIterator[BlazenPeerServer]:
    s = await start("node-a")
    yield s
    await s.stop(grace=0)


@pytest.fixture(params=["grpc", "http"])
async def client(request: pytest.FixtureRequest, server: BlazenPeerServer) -> AsyncIterator[Any]:
    if request.param == "grpc":
        c: Any = await BlazenPeerClient.connect(f"http://127.0.0.1:{server.grpc_port}", "caller")
    else:
        c = HttpPeerClient.new_http(f"http://127.0.0.1:{server.http_port}/", "caller")
    yield c
    await c.close()


async def test_invoke_and_refs(client: Any) -> None:
    resp = await client.invoke_sub_workflow("wf", ["echo"], {"x": [1, "ü"]}, 5)
    assert resp.error is None
    assert resp.result_value() == {"x": [1, "ü"]}
    assert (await client.invoke_sub_workflow("wf", ["whoami"])).result_value() == "caller"
    resp = await client.invoke_sub_workflow(
        SubWorkflowRequest.new("wf", ["two::a", "two::l", "two::r", "two::j"])
    )
    assert resp.result_value() == "left"
    resp = await client.invoke_sub_workflow("wf", ["ref"])
    (key,) = resp.remote_refs
    assert resp.result_value() == {"__blazen_session_ref__": key}
    assert resp.remote_refs[key].type_tag == "Dict"
    assert await client.deref_session_ref(key) == b"{'k': 1}"
    assert await client.release_session_ref(uuid.UUID(key)) is True
    assert await client.release_session_ref(key) is False


async def test_unknown_step(client: Any) -> None:
    with pytest.raises(PeerUnknownStepError, match="unknown step id `missing`") as err:
        await client.invoke_sub_workflow("wf", ["echo", "missing"])
    assert err.value.code in ("NOT_FOUND", "HTTP 404")


async def test_envelope_version(client: Any) -> None:
    req = SubWorkflowRequest("wf", ["echo"], b"{}", None, envelope_version=2)
    with pytest.raises(PeerEnvelopeVersionError, match="envelope version 2 is newer than supported 1"):
        await client.invoke_sub_workflow(req)


async def test_workflow_errors(client: Any) -> None:
    with pytest.raises(PeerWorkflowError, match="workflow must have at least one step"):
        await client.invoke_sub_workflow("no-such-workflow", [])
    resp = await client.invoke_sub_workflow("wf", ["boom"])
    assert resp.error == "workflow error: step 'boom' failed: bad input"
    with pytest.raises(PeerWorkflowError) as err:
        await client.invoke_sub_workflow("wf", ["boom"], raise_on_error=True)
    assert err.value.response.error == resp.error


async def test_encode_errors(client: Any) -> None:
    with pytest.raises(PeerEncodeError, match="invalid input JSON"):
        await client.invoke_sub_workflow(SubWorkflowRequest("wf", ["echo"], b"{nope"))
    with pytest.raises(PeerEncodeError, match="not JSON-serializable"):
        await client.invoke_sub_workflow("wf", ["echo"], {"s": {1, 2}})
    with pytest.raises(PeerEncodeError, match="invalid UUID"):
        await client.deref_session_ref("not-a-uuid")


async def test_ref_not_found(client: Any) -> None:
    ref = uuid.uuid4()
    with pytest.raises(PeerSessionRefNotFoundError, match=f"session ref {ref} not found"):
        await client.deref_session_ref(ref)


async def test_transport_errors() -> None:
    # A refused connection fails at once (not after connect_timeout) and says why.
    t0 = time.monotonic()
    with pytest.raises(PeerTransportError, match=r"cannot connect.*Connection refused"):
        await BlazenPeerClient.connect("http://127.0.0.1:1", "caller", connect_timeout=30)
    assert time.monotonic() - t0 < 5
    http = HttpPeerClient.new_http("http://127.0.0.1:1", "caller")
    with pytest.raises(PeerTransportError, match="request failed"):
        await http.invoke_sub_workflow("wf", ["echo"])
    await http.close()


async def test_tls_errors() -> None:
    with pytest.raises(PeerTlsError, match="not PEM data"):
        await BlazenPeerClient.connect("https://127.0.0.1:1", "c", root_certificates=b"garbage")
    with pytest.raises(PeerTlsError, match="unsupported tls"):
        HttpPeerClient.new_http("https://127.0.0.1:1", "c", tls=object())
    with pytest.raises(PeerTlsError, match="needs both"):
        await BlazenPeerClient.connect("https://127.0.0.1:1", "c", certificate_chain=b"-----BEGIN x")


def test_common_base_and_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (
        PeerUnknownStepError,
        PeerEnvelopeVersionError,
        PeerWorkflowError,
        PeerTransportError,
        PeerEncodeError,
        PeerTlsError,
        PeerSessionRefNotFoundError,
    ):
        assert issubclass(cls, PeerError)
    assert peer_envelope_version() == 1
    assert peer_token_env() == "BLAZEN_PEER_TOKEN"
    monkeypatch.setenv("BLAZEN_PEER_TOKEN", "")
    assert resolve_peer_token() is None
    monkeypatch.setenv("BLAZEN_PEER_TOKEN", "s3cret")
    assert resolve_peer_token() == "s3cret"


async def test_response_version_checked_by_client() -> None:
    async def handler(request: bytes, context: Any) -> bytes:
        return wrap(SubWorkflowResponse(result_json=b"1", envelope_version=2).encode())

    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "blazen.peer.v1.BlazenPeer",
                {"InvokeSubWorkflow": grpc.unary_unary_rpc_method_handler(handler)},
            ),
        )
    )
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        c = await BlazenPeerClient.connect(f"http://127.0.0.1:{port}", "c")
        with pytest.raises(PeerEnvelopeVersionError, match="envelope version 2"):
            await c.invoke_sub_workflow("wf", ["echo"])
        await c.close()
    finally:
        await srv.stop(0)


async def test_http_client_refuses_a_hostile_servers_deep_nesting() -> None:
    """A reply (or error body) nested 10,000 levels deep is a ``PeerEncodeError`` / a typed HTTP error,
    not a RecursionError out of the client."""
    from aiohttp import web

    deep = "[" * 10_000 + "]" * 10_000

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=deep, content_type="application/json")

    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=400, text=deep, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/peer/invoke_sub_workflow", ok)
    app.router.add_post("/v1/peer/deref_session_ref", failing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        c = HttpPeerClient.new_http(f"http://127.0.0.1:{port}", "c")
        with pytest.raises(PeerEncodeError, match="json deserialize: maximum recursion depth"):
            await c.invoke_sub_workflow("wf", ["echo"])
        with pytest.raises(PeerError, match="HTTP 400"):
            await c.deref_session_ref(str(uuid.uuid4()))
        await c.close()
    finally:
        await runner.cleanup()


async def test_stream_events_then_final(server: BlazenPeerServer) -> None:
    async with await BlazenPeerClient.connect(f"http://127.0.0.1:{server.grpc_port}", "c") as c:
        items = [
            i async for i in c.stream_sub_workflow_events("wf", ["two::a", "two::l", "two::r", "two::j"])
        ]
        events = [i for i in items if isinstance(i, SubWorkflowEvent)]
        assert isinstance(items[-1], SubWorkflowResponse)
        assert items[-1].result_value() == "left"
        assert [(e.sequence, e.step_id, e.event_type) for e in events] == [
            (0, "two::a", "Left"),
            (1, "two::a", "Right"),
            (2, "two::l", "Joined"),
            (3, "two::j", "blazen::StopEvent"),
        ]
        assert events[0].event_value() == {"type": "Left", "v": 1}
        with pytest.raises(PeerUnknownStepError):
            async for _ in c.stream_sub_workflow_events("wf", ["nope"]):
                pass


async def test_forwarding_between_two_replicas() -> None:
    ports = [free_port(), free_port()]
    peers = tuple(
        f"127.0.0.1:{p}" for p in ports
    )  # both listed on both, as a headless Service's A records are
    replicas = []
    for name, port in zip(("replica-a", "replica-b"), ports, strict=True):
        replicas.append(await start(name, grpc_addr=f"127.0.0.1:{port}", forward_peers=peers))
    a, b = replicas
    try:
        ca = await BlazenPeerClient.connect(f"http://127.0.0.1:{a.grpc_port}", "c")
        cb = await BlazenPeerClient.connect(f"http://127.0.0.1:{b.grpc_port}", "c")
        hb = HttpPeerClient.new_http(f"http://127.0.0.1:{b.http_port}", "c")
        resp = await ca.invoke_sub_workflow("wf", ["ref"])
        (key,) = resp.remote_refs
        assert resp.remote_refs[key].origin_node_id == "replica-a"
        assert b.refs.count == 0
        assert await cb.deref_session_ref(key) == b"{'k': 1}"  # reached the wrong replica: forwarded to a
        assert await hb.deref_session_ref(key) == b"{'k': 1}"  # the HTTP shim forwards too
        # A forwarded request is never forwarded again: b answers NOT_FOUND itself.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}") as ch:
            call = ch.unary_unary("/blazen.peer.v1.BlazenPeer/DerefSessionRef")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(wrap(DerefRequest(key).encode()), metadata=[("x-blazen-forwarded", "1")])
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details() == f"session ref {key} not found"
        assert await cb.release_session_ref(key) is True
        assert a.refs.count == 0
        assert await cb.release_session_ref(key) is False
        with pytest.raises(PeerSessionRefNotFoundError):
            await cb.deref_session_ref(key)
        for c in (ca, cb, hb):
            await c.close()
    finally:
        for server in replicas:
            await server.stop(grace=0)
