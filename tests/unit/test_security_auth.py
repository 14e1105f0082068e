from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from blazen_peer.security.auth import (
    AioTokenAuthInterceptor,
    TokenAuthInterceptor,
    TokenSource,
    make_auth_middleware,
)
from blazen_peer.security.errors import PeerAuthConfigError

from tests.support.pki import KubeletSecretDir

TOKEN = "s3cr3t-token-value"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_from_config_precedence(tmp_path):
    f = tmp_path / "token"
    f.write_text(" from-file \n")
    env = {"BLAZEN_PEER_TOKEN": "from-env", "BLAZEN_PEER_TOKEN_FILE": str(f)}
    assert TokenSource.from_config(None, env).check_bearer("Bearer from-file")
    g = tmp_path / "flag"
    g.write_text("from-flag")
    assert TokenSource.from_config(str(g), env).check_bearer("Bearer from-flag")
    assert TokenSource.from_config(None, {"BLAZEN_PEER_TOKEN": "  from-env\n"}).check_bearer(
        "Bearer from-env"
    )
    assert TokenSource.from_config(None, {"BLAZEN_PEER_TOKEN": "   "}) is None
    assert TokenSource.from_config(None, {}) is None


def test_empty_or_missing_token_file_fails_at_start(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PeerAuthConfigError):
        TokenSource(token_file=tmp_path / "empty")
    with pytest.raises(PeerAuthConfigError):
        TokenSource(token_file=tmp_path / "missing")
    with pytest.raises(ValueError, match="exactly one"):
        TokenSource()


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {TOKEN}", True),
        (f"bearer {TOKEN}", True),
        (f"  Bearer   {TOKEN}  ", True),
        (f"Bearer {TOKEN}".encode(), True),
        (f"Bearer {TOKEN}x", False),
        (f"Bearer {TOKEN[:-1]}", False),
        (f"Basic {TOKEN}", False),
        (TOKEN, False),
        ("Bearer ", False),
        ("", False),
        (None, False),
    ],
)
def test_check_bearer(header, ok):
    assert TokenSource(token=TOKEN).check_bearer(header) is ok


def test_reasons_do_not_contain_the_token():
    src = TokenSource(token=TOKEN)
    assert "missing" in src.why_rejected(None)
    assert src.why_rejected("Bearer nope") == "invalid bearer token"
    assert TOKEN not in repr(src)
    assert src.authorization() == f"Bearer {TOKEN}"
    assert src.metadata() == [("authorization", f"Bearer {TOKEN}")]


def test_rotated_secret_takes_effect_with_a_grace_window(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    d = KubeletSecretDir(tmp_path / "token")
    d.write({"token": b"old-token\n"})
    src = TokenSource(token_file=d.path("token"), recheck_interval=1.0, rotation_grace=30.0, clock=clock)
    assert src.check_bearer("Bearer old-token")
    d.write({"token": b"new-token\n"})
    # Not re-read before the recheck interval: the per-call path does no I/O.
    assert not src.check_bearer("Bearer new-token")
    clock.t += 1.5
    assert src.check_bearer("Bearer new-token")
    assert src.rotation_count == 1
    assert src.check_bearer("Bearer old-token")  # grace window
    clock.t += 31
    assert not src.check_bearer("Bearer old-token")
    assert src.check_bearer("Bearer new-token")
    assert sorted(src.secrets()) == ["new-token", "old-token"]
    # A half-written (empty) file keeps the current token.
    d.write({"token": b""})
    clock.t += 2
    assert src.check_bearer("Bearer new-token")
    assert "old-token" not in caplog.text
    assert "new-token" not in caplog.text


def test_plain_file_rewrite(tmp_path):
    f = tmp_path / "tok"
    f.write_text("a-token")
    src = TokenSource(token_file=f, recheck_interval=0)
    f.write_text("b-token-longer")
    assert src.check_bearer("Bearer b-token-longer")


# -- gRPC -------------------------------------------------------------------------------------------


def _handlers(aio: bool) -> grpc.GenericRpcHandler:
    if aio:

        async def echo(req, ctx):
            return b"echo:" + req

        async def many(req, ctx):
            yield b"1"
            yield b"2"
    else:

        def echo(req, ctx):
            return b"echo:" + req

        def many(req, ctx):
            yield b"1"
            yield b"2"

    return grpc.method_handlers_generic_handler(
        "test.Svc",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Many": grpc.unary_stream_rpc_method_handler(many),
        },
    )


def _health_handler() -> grpc.GenericRpcHandler:
    async def check(req, ctx):
        return b""

    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )


async def test_aio_interceptor():
    src = TokenSource(token=TOKEN)
    server = grpc.aio.server(interceptors=[AioTokenAuthInterceptor(src)])
    server.add_generic_rpc_handlers((_handlers(True), _health_handler()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/test.Svc/Echo")
            many = ch.unary_stream("/test.Svc/Many")
            good = [("authorization", f"Bearer {TOKEN}")]
            assert await echo(b"x", metadata=good) == b"echo:x"
            assert [m async for m in many(b"", metadata=good)] == [b"1", b"2"]
            for md, fragment in ((None, "missing"), ([("authorization", "Bearer wrong")], "invalid")):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await echo(b"x", metadata=md)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert fragment in ei.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    _ = [m async for m in many(b"", metadata=md)]
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health checks (kubelet gRPC probes) need no token.
            assert await ch.unary_unary("/grpc.health.v1.Health/Check")(b"") == b""
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary("/test.Svc/Nope")(b"", metadata=good)
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


def test_sync_interceptor():
    src = TokenSource(token=TOKEN)
    server = grpc.server(ThreadPoolExecutor(max_workers=2), interceptors=[TokenAuthInterceptor(src)])
    server.add_generic_rpc_handlers((_handlers(False),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/test.Svc/Echo")
            assert echo(b"y", metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5) == b"echo:y"
            with pytest.raises(grpc.RpcError) as ei:
                echo(b"y", timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as ei:
                list(ch.unary_stream("/test.Svc/Many")(b"", timeout=5))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


# -- aiohttp ----------------------------------------------------------------------------------------


async def test_aiohttp_middleware(caplog):
    caplog.set_level(logging.DEBUG)

    async def ok(request):
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[make_auth_middleware(TokenSource(token=TOKEN))])
    app.router.add_post("/v1/peer/invoke_sub_workflow", ok)
    app.router.add_route("OPTIONS", "/v1/peer/invoke_sub_workflow", ok)
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/v1/peer/invoke_sub_workflow", json={})
        assert r.status == 401
        assert (await r.json())["error"].startswith("missing bearer token")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await client.post("/v1/peer/invoke_sub_workflow", headers={"Authorization": "Bearer no"})
        assert r.status == 401
        assert await r.json() == {"error": "invalid bearer token"}
        r = await client.post(
            "/v1/peer/invoke_sub_workflow", headers={"Authorization": f"Bearer {TOKEN}"}, json={}
        )
        assert r.status == 200
        r = await client.options("/v1/peer/invoke_sub_workflow")  # preflights carry no credentials
        assert r.status == 200
    assert TOKEN not in caplog.text
