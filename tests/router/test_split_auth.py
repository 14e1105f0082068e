"""Hostile callers of a peer's ``blazen.fleet.v1`` RunStep / EndRun: the methods run any served step on any
event and state and end runs, so only the fleet router's identity may call them - never an ordinary client
certificate of the same CA, never the shared bearer token alone - and nobody unless the peer is told who the
router is. A real peer on loopback with mTLS and a token; raw gRPC calls."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from blazen_peer import StepRegistry
from blazen_peer.client import BlazenPeerClient
from blazen_peer.wire.envelope import unwrap, wrap
from blazen_peer.wire.errors import PeerAuthConfigError, PeerError
from blazen_peer.wire.fleet import EndRunRequest, RunStepRequest, RunStepResponse
from blazen_peer.wire.protocol import FLEET_ROUTER_TOKEN_METADATA, PATH_END_RUN, PATH_RUN_STEP

from tests.support.peers import TOKEN, running_peer, start_router, tls_client
from tests.support.pki import Issued, Pki

ROUTER_NAME = "router.fleet.example"
RAN: list[str] = []


def registry() -> StepRegistry:
    reg = StepRegistry()

    @reg.step("probe")
    async def probe(event: dict, ctx: Any) -> dict:
        RAN.append(event.get("who", "?"))
        return {"type": "blazen::StopEvent", "result": "ran"}

    return reg


def tls(pki: Pki, **more: Any) -> dict[str, Any]:
    return {"tls_cert": pki.cert, "tls_key": pki.key, "tls_ca": pki.ca_file, "token": TOKEN, **more}


def run_step(who: str) -> bytes:
    return wrap(
        RunStepRequest(
            str(uuid.uuid4()), "wf", "probe", f'{{"type":"blazen::StartEvent","who":"{who}"}}'.encode()
        ).encode()
    )


async def call(
    port: int,
    pki: Pki,
    leaf: Issued | None,
    path: str = PATH_RUN_STEP,
    request: bytes | None = None,
    metadata: list[tuple[str, str]] | None = None,
) -> bytes | grpc.aio.AioRpcError:
    creds = grpc.ssl_channel_credentials(
        pki.ca_pem, leaf.key_pem if leaf else None, leaf.cert_pem if leaf else None
    )
    md = [("authorization", f"Bearer {TOKEN}"), *(metadata or [])]
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as ch:
        try:
            return await ch.unary_unary(path)(request or run_step("?"), metadata=md, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc


def router_leaf(pki: Pki) -> Issued:
    """What the operator's ``<fleet>-router-tls`` is: the same CA, client auth, the router's own name."""
    return pki.ca.issue("router", dns=(ROUTER_NAME, "localhost"), ips=("127.0.0.1",))


async def test_refused_unless_the_peer_is_told_who_the_router_is(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    RAN.clear()
    async with running_peer(registry(), **tls(pki)) as peer:
        for leaf in (pki.client, router_leaf(pki)):
            for path, request in ((PATH_RUN_STEP, run_step("default")), (PATH_END_RUN, None)):
                body = request or wrap(EndRunRequest(str(uuid.uuid4())).encode())
                err = await call(peer.grpc_port, pki, leaf, path, body)
                assert isinstance(err, grpc.aio.AioRpcError)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "--fleet-router-identity" in (err.details() or "")
    assert RAN == []


async def test_only_the_router_certificate_may_run_a_step(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    RAN.clear()
    async with running_peer(
        registry(), **tls(pki, fleet_router_identity=(ROUTER_NAME,), plaintext_grpc_addr="127.0.0.1:0")
    ) as peer:
        # an ordinary caller: a valid client certificate of the same CA and the bearer token
        err = await call(peer.grpc_port, pki, pki.client, request=run_step("client"))
        assert isinstance(err, grpc.aio.AioRpcError)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert ROUTER_NAME in (err.details() or "")
        # the peer's own serving certificate is no router either
        err = await call(peer.grpc_port, pki, pki.server, request=run_step("server"))
        assert isinstance(err, grpc.aio.AioRpcError)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # no client certificate at all: the TLS handshake fails (mTLS), nothing runs
        err = await call(peer.grpc_port, pki, None, request=run_step("anonymous"))
        assert isinstance(err, grpc.aio.AioRpcError)
        # EndRun is the router's too
        err = await call(
            peer.grpc_port, pki, pki.client, PATH_END_RUN, wrap(EndRunRequest(str(uuid.uuid4())).encode())
        )
        assert isinstance(err, grpc.aio.AioRpcError)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # the plaintext listener for Blazen's own clients does not have the method at all
        async with grpc.aio.insecure_channel(f"127.0.0.1:{peer.plaintext_grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await ch.unary_unary(PATH_RUN_STEP)(run_step("plaintext"), timeout=10)
            assert plain.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert RAN == []
        # the router's certificate: the step runs
        raw = await call(peer.grpc_port, pki, router_leaf(pki), request=run_step("router"))
        assert isinstance(raw, bytes)
        resp = RunStepResponse.decode(unwrap(raw))
        assert resp.error is None
        assert resp.events_json == [b'{"result":"ran","type":"blazen::StopEvent"}']
        assert RAN == ["router"]
        # ... still behind the admission: the router certificate without the bearer token is refused
        leaf = router_leaf(pki)
        creds = grpc.ssl_channel_credentials(pki.ca_pem, leaf.key_pem, leaf.cert_pem)
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{peer.grpc_port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as anon:
                await ch.unary_unary(PATH_RUN_STEP)(run_step("no-token"), timeout=10)
            assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert RAN == ["router"]


async def test_token_only_deployments_need_the_router_token(tmp_path: Path) -> None:
    token_file = tmp_path / "router-token"
    token_file.write_text("router-only-7d1e\n")
    RAN.clear()
    async with running_peer(registry(), token=TOKEN, fleet_router_token_file=str(token_file)) as peer:

        async def plain(metadata: list[tuple[str, str]]) -> bytes | grpc.aio.AioRpcError:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{peer.grpc_port}") as ch:
                try:
                    return await ch.unary_unary(PATH_RUN_STEP)(
                        run_step("x"), metadata=[("authorization", f"Bearer {TOKEN}"), *metadata], timeout=10
                    )
                except grpc.aio.AioRpcError as exc:
                    return exc

        for md in (
            [],
            [(FLEET_ROUTER_TOKEN_METADATA, f"Bearer {TOKEN}")],
            [(FLEET_ROUTER_TOKEN_METADATA, "Bearer nope")],
        ):
            err = await plain(md)
            assert isinstance(err, grpc.aio.AioRpcError)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert RAN == []
        assert isinstance(await plain([(FLEET_ROUTER_TOKEN_METADATA, "Bearer router-only-7d1e")]), bytes)
        assert RAN == ["x"]


async def test_a_router_identity_without_client_certificates_does_not_start(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    with pytest.raises(PeerAuthConfigError, match="--tls-ca"):
        async with running_peer(registry(), token=TOKEN, fleet_router_identity=(ROUTER_NAME,)):
            pass
    cfg = tls(pki, fleet_router_identity=(ROUTER_NAME,))
    del cfg["tls_ca"]
    with pytest.raises(PeerAuthConfigError, match="--tls-ca"):
        async with running_peer(registry(), **cfg):
            pass


async def test_a_tls_router_splits_a_run_with_its_certificate(tmp_path: Path) -> None:
    """mTLS end to end: pools that trust only the router's name, the router presenting its certificate on
    the hop (``--pool-tls-*``); a caller's ordinary certificate reaches the steps only through it."""
    pki = Pki(tmp_path / "pki")
    leaf = router_leaf(pki)
    (tmp_path / "router.crt").write_bytes(leaf.cert_pem)
    (tmp_path / "router.key").write_bytes(leaf.key_pem)
    reg = StepRegistry()

    @reg.step("a")
    async def a(event: dict, ctx: Any) -> dict:
        ctx.state["a"] = ctx.node_id
        return {"type": "Mid"}

    @reg.step("b", accepts=["Mid"])
    async def b(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": [ctx.state["a"], ctx.node_id]}

    peer_cfg = tls(pki, fleet_router_identity=(ROUTER_NAME,))
    async with (
        running_peer(reg, node_id="p1", steps=["a"], **peer_cfg) as p1,
        running_peer(reg, node_id="p2", steps=["b"], **peer_cfg) as p2,
    ):
        router = await start_router(
            {"one": [f"127.0.0.1:{p1.grpc_port}"], "two": [f"127.0.0.1:{p2.grpc_port}"]},
            **tls(pki),
            pool_tls_cert=str(tmp_path / "router.crt"),
            pool_tls_key=str(tmp_path / "router.key"),
            pool_server_name="localhost",
        )
        try:
            client = await tls_client(router.grpc_port, pki, "secure-caller")
            try:
                resp = await client.invoke_sub_workflow("wf", ["a", "b"])
            finally:
                await client.close()
            assert resp.error is None
            assert resp.result_value() == ["p1", "p2"]
            assert resp.state_values() == {"a": "p1"}
        finally:
            await router.stop(grace=0)


async def test_a_pool_answering_garbage_to_runstep_fails_the_call_not_the_router(tmp_path: Path) -> None:
    """A replica that says it runs steps but answers RunStep with bytes that are no RunStepResponse: the
    caller gets INTERNAL naming it (invoke and stream), and the router goes on serving."""
    from blazen_peer.wire.fleet import Description
    from blazen_peer.wire.protocol import FLEET_SERVICE, METHOD_DESCRIBE, METHOD_RUN_STEP

    reg = StepRegistry()

    @reg.step("a")
    async def a(event: dict, ctx: Any) -> dict:
        return {"type": "Mid"}

    async def describe(request: bytes, context: Any) -> bytes:
        return wrap(Description("liar", {"b": ("Mid",)}, run_steps=True).encode())

    async def garbage(request: bytes, context: Any) -> bytes:
        return wrap(b"\xff\xff\xff")

    liar = grpc.aio.server()
    liar.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                FLEET_SERVICE,
                {
                    METHOD_DESCRIBE: grpc.unary_unary_rpc_method_handler(describe),
                    METHOD_RUN_STEP: grpc.unary_unary_rpc_method_handler(garbage),
                },
            ),
        )
    )
    liar_port = liar.add_insecure_port("127.0.0.1:0")
    await liar.start()
    token = tmp_path / "t"
    token.write_text("tok")
    cfg = {"insecure": True, "fleet_router_token_file": str(token)}
    try:
        async with running_peer(reg, node_id="honest", steps=["a"], **cfg) as honest:
            router = await start_router(
                {"one": [f"127.0.0.1:{honest.grpc_port}"], "two": [f"127.0.0.1:{liar_port}"]}, **cfg
            )
            try:
                client = await BlazenPeerClient.connect(f"http://127.0.0.1:{router.grpc_port}", "c")
                try:
                    with pytest.raises(PeerError, match="malformed RunStep reply") as err:
                        await client.invoke_sub_workflow("wf", ["a", "b"])
                    assert getattr(err.value, "code", None) == "INTERNAL"
                    assert "malformed RunStep reply" in str(err.value)
                    with pytest.raises(PeerError, match="malformed RunStep reply") as err:
                        async for _ in client.stream_sub_workflow_events("wf", ["a", "b"]):
                            pass
                    assert getattr(err.value, "code", None) == "INTERNAL"
                    # still serving
                    resp = await client.invoke_sub_workflow("wf", ["a"])
                    assert resp.error == "workflow error: no handler for event type: Mid"
                finally:
                    await client.close()
            finally:
                await router.stop(grace=0)
    finally:
        await liar.stop(0)
