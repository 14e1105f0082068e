"""Headless Chromium against the REAL shim: a ``BlazenPeerServer`` (security installed,
``--cors-allow-origin``) serving the example ``examples::echo`` step. A page on another localhost port
``fetch()``es it with the request Blazen's WASM ``HttpPeerClient`` sends, plus the bearer token.

The shim's auth is the explicit choice ``--http-auth token``: a browser app that calls the shim itself
must hold the token and send it (the WASM ``HttpPeerClient`` cannot add headers, so it goes through a proxy
that adds the token or presents a client certificate; docs/security.md). ``client-cert`` is the other
choice, and is no use to a page without a certificate; ``unauthenticated`` is not what these tests need."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from blazen_peer import ServerHooks

from tests.browser.harness import CFG, dump_dom, find_chromium, page_app, parse_result, start
from tests.support.peers import start_peer

pytestmark = pytest.mark.browser

ROUTE = "/v1/peer/invoke_sub_workflow"
TOKEN = "real-shim-browser-token"
EXAMPLE_STEPS = Path(__file__).resolve().parents[2] / "examples" / "steps"
REQUEST = {
    "envelope_version": 1,
    "workflow_name": "echo",
    "step_ids": ["examples::echo"],
    "input_json": list(b'{"hello":"from the browser"}'),
    "timeout_secs": None,
}


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


@pytest.fixture
def example_steps(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(EXAMPLE_STEPS))
    return "blazen_examples.steps"


async def _browse(chromium: str, entrypoint: str, *, allow_page_origin: bool, page_token: str | None):
    """Page on one port, the real peer's shim on another; returns (page result, answers the shim gave as
    (method, origin, status), the preflight's headers, the ``X-Blazen-Peer-Node-Id`` of each POST, page
    origin)."""
    page = page_app(token=page_token, body=REQUEST)
    page_runner, page_port = await start(page)
    origin = f"http://127.0.0.1:{page_port}"
    seen: list[tuple[str, str | None, int]] = []
    preflight_headers: dict[str, str] = {}
    callers: list[str | None] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append((request.method, request.headers.get("Origin"), response.status))
        if request.method == "OPTIONS":
            preflight_headers.update(response.headers)
        elif request.method == "POST":
            callers.append(request.headers.get("X-Blazen-Peer-Node-Id"))

    server = await start_peer(
        hooks=ServerHooks(http_app_setup=[lambda app: app.on_response_prepare.append(record)]),
        node_id="browser-peer-0",
        entrypoint=entrypoint,
        admin_addr=None,
        token=TOKEN,
        http_auth="token",
        cors_allow_origin=(origin if allow_page_origin else "https://app.example.com",),
    )
    page[CFG]["url"] = f"http://127.0.0.1:{server.http_port}{ROUTE}"
    try:
        result = parse_result(await dump_dom(chromium, f"{origin}/", budget_ms=8000))
        return result, seen, preflight_headers, callers, origin
    finally:
        await page_runner.cleanup()
        await server.stop(grace=0)


async def test_allowed_origin_calls_the_real_shim(chromium, example_steps) -> None:
    result, seen, preflight, callers, origin = await _browse(
        chromium, example_steps, allow_page_origin=True, page_token=TOKEN
    )
    assert result["ok"] is True, result
    assert result["status"] == 200
    body = json.loads(result["body"])
    assert body["error"] is None
    assert json.loads(bytes(body["result_json"])) == {"hello": "from the browser"}
    # Preflight answered as the WASM seed asks, then the authenticated POST ran the step.
    assert seen == [("OPTIONS", origin, 204), ("POST", origin, 200)]
    assert preflight["Access-Control-Allow-Origin"] == origin
    assert preflight["Access-Control-Allow-Headers"] == "Content-Type, X-Blazen-Peer-Node-Id, Authorization"
    assert preflight["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    # The browser sent the page's node id on the POST (the header the preflight allowed).
    assert callers == ["browser-tab-7f3c"]


async def test_other_origin_is_blocked_by_the_browser(chromium, example_steps) -> None:
    result, seen, preflight, _, origin = await _browse(
        chromium, example_steps, allow_page_origin=False, page_token=TOKEN
    )
    assert result["ok"] is False, result
    assert "Failed to fetch" in result["error"]
    # No CORS header for that origin; the POST never reached the engine.
    assert seen == [("OPTIONS", origin, 403)]
    assert "Access-Control-Allow-Origin" not in preflight


async def test_allowed_origin_without_token_reads_the_401(chromium, example_steps) -> None:
    result, seen, _, _, origin = await _browse(
        chromium, example_steps, allow_page_origin=True, page_token=None
    )
    # X-Blazen-Peer-Node-Id still forces a preflight; the 401 carries the CORS headers, so the page can
    # read the error instead of seeing a network failure.
    assert result["ok"] is True, result
    assert result["status"] == 401
    assert json.loads(result["body"])["error"].startswith("missing bearer token")
    assert seen == [("OPTIONS", origin, 204), ("POST", origin, 401)]
