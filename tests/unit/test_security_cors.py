from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from blazen_peer.security.cors import CorsPolicy, make_cors_middleware, normalize_origin

ROUTE = "/v1/peer/invoke_sub_workflow"
APP = "https://app.example.com"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,x-blazen-peer-node-id",
}


def _token_check(token: str):
    """A stand-in for the admission middleware the composition root places inside the CORS one: it answers
    401 itself (a response, not an exception) and lets preflights through."""

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.headers.get("Authorization") == f"Bearer {token}":
            return await handler(request)
        return web.json_response({"error": "missing bearer token"}, status=401)

    return check


def _app(origins, *, token: str | None = None) -> web.Application:
    async def invoke(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("fail"):
            raise web.HTTPNotFound(text='{"error": "unknown step id `x`"}', content_type="application/json")
        return web.json_response({"ok": True})

    mws = [make_cors_middleware(origins)]
    if token:
        mws.append(_token_check(token))
    app = web.Application(middlewares=mws)
    app.router.add_post(ROUTE, invoke)
    return app


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("https://App.Example.com/", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("*", "*"),
    ],
)
def test_normalize_origin(raw, norm):
    assert normalize_origin(raw) == norm


@pytest.mark.parametrize("bad", ["app.example.com", "ftp://x", "https://x/path", "https://u:p@x", "https://"])
def test_invalid_origins_fail_fast(bad):
    with pytest.raises(ValueError, match="invalid CORS origin"):
        CorsPolicy.from_values([bad])


def test_policy_from_repeated_and_comma_separated_values():
    p = CorsPolicy.from_values(["https://a.example", "https://b.example, http://localhost:3000"])
    assert p.origins == {"https://a.example", "https://b.example", "http://localhost:3000"}
    assert p.allows("https://B.example")
    assert not p.allows("https://c.example")
    assert not p.allows("null")
    assert CorsPolicy.from_values(["*"]).allows("https://anything.example")


async def test_preflight_for_an_allowed_origin_needs_no_auth():
    async with TestClient(TestServer(_app([APP], token="tok"))) as client:
        r = await client.options(ROUTE, headers=PREFLIGHT)
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert (
            r.headers["Access-Control-Allow-Headers"] == "Content-Type, X-Blazen-Peer-Node-Id, Authorization"
        )
        assert r.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
        assert int(r.headers["Access-Control-Max-Age"]) > 0
        assert r.headers["Vary"] == "Origin"
        assert "Access-Control-Allow-Credentials" not in r.headers


async def test_actual_requests_and_errors_carry_the_headers():
    async with TestClient(TestServer(_app([APP], token="tok"))) as client:
        auth = {"Origin": APP, "Authorization": "Bearer tok"}
        r = await client.post(ROUTE, json={}, headers=auth)
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert "Origin" in r.headers["Vary"]
        # A 401 from an inner middleware is readable by the page.
        r = await client.post(ROUTE, json={}, headers={"Origin": APP})
        assert r.status == 401
        assert r.headers["Access-Control-Allow-Origin"] == APP
        # So is an error raised by the handler.
        r = await client.post(ROUTE, json={"fail": True}, headers=auth)
        assert r.status == 404
        assert r.headers["Access-Control-Allow-Origin"] == APP


async def test_other_origins_get_no_cors_headers():
    async with TestClient(TestServer(_app([APP]))) as client:
        evil = "https://evil.example"
        r = await client.options(ROUTE, headers=dict(PREFLIGHT, Origin=evil))
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Access-Control-Allow-Methods" not in r.headers
        r = await client.post(ROUTE, json={}, headers={"Origin": evil})
        assert "Access-Control-Allow-Origin" not in r.headers
        assert r.headers["Vary"] == "Origin"
        # No Origin at all (server-to-server): untouched.
        r = await client.post(ROUTE, json={})
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_wildcard_and_credentials():
    async with TestClient(TestServer(_app(["*"]))) as client:
        r = await client.options(ROUTE, headers=dict(PREFLIGHT, Origin="https://x.example"))
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    app = web.Application(middlewares=[make_cors_middleware(["*"], allow_credentials=True)])

    async def empty(request: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_post(ROUTE, empty)
    async with TestClient(TestServer(app)) as client:
        r = await client.options(ROUTE, headers=dict(PREFLIGHT, Origin="https://x.example"))
        assert r.headers["Access-Control-Allow-Origin"] == "https://x.example"  # never * with credentials
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
