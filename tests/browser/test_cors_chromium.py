"""A real browser against the CORS middleware: an allowed origin can call the shim, another cannot."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from blazen_peer.security.auth import TokenSource, make_auth_middleware
from blazen_peer.security.cors import make_cors_middleware

from tests.browser.harness import CFG, dump_dom, find_chromium, page_app, parse_result, start

pytestmark = pytest.mark.browser

ROUTE = "/v1/peer/invoke_sub_workflow"
TOKEN = "browser-test-token"


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


class StubShim:
    """A stand-in for the HTTP/JSON shim: the CORS and auth middlewares in front of one route."""

    def __init__(self, allowed_origins: list[str], token: str | None) -> None:
        self.seen: list[tuple[str, str | None, int]] = []
        mws = [self._record, make_cors_middleware(allowed_origins)]
        if token:
            mws.append(make_auth_middleware(TokenSource(token=token)))
        self.app = web.Application(middlewares=mws)
        self.app.router.add_post(ROUTE, self.invoke)

    @web.middleware
    async def _record(self, request: web.Request, handler) -> web.StreamResponse:
        resp = await handler(request)
        self.seen.append((request.method, request.headers.get("Origin"), resp.status))
        return resp

    async def invoke(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {
                "envelope_version": 1,
                "state_json": {},
                "result_json": list(json.dumps({"echo": body}).encode()),
                "remote_refs": {},
                "error": None,
                "caller": request.headers.get("X-Blazen-Peer-Node-Id"),
            }
        )


async def _browse(chromium: str, *, allow_page_origin: bool, page_token: str | None):
    """Page on one port, stub shim on another; returns (result, shim, page origin)."""
    page = page_app(token=page_token, body={"workflow_name": "wf"})
    page_runner, page_port = await start(page)
    origin = f"http://127.0.0.1:{page_port}"
    shim = StubShim([origin] if allow_page_origin else ["https://app.example.com"], TOKEN)
    api_runner, api_port = await start(shim.app)
    page[CFG]["url"] = f"http://127.0.0.1:{api_port}{ROUTE}"
    try:
        return parse_result(await dump_dom(chromium, f"{origin}/")), shim, origin
    finally:
        await page_runner.cleanup()
        await api_runner.cleanup()


async def test_allowed_origin_can_call_the_shim(chromium):
    result, shim, origin = await _browse(chromium, allow_page_origin=True, page_token=TOKEN)
    assert result["ok"] is True, result
    assert result["status"] == 200
    body = json.loads(result["body"])
    assert bytes(body["result_json"]).decode() == '{"echo": {"workflow_name": "wf"}}'
    assert body["caller"] == "browser-tab-7f3c"
    # The browser sent a preflight (answered without credentials), then the authenticated POST.
    assert ("OPTIONS", origin, 204) in shim.seen
    assert ("POST", origin, 200) in shim.seen


async def test_disallowed_origin_is_blocked_by_the_browser(chromium):
    result, shim, origin = await _browse(chromium, allow_page_origin=False, page_token=TOKEN)
    assert result["ok"] is False, result
    assert "Failed to fetch" in result["error"]
    # The preflight was refused and the POST never reached the shim.
    assert shim.seen == [("OPTIONS", origin, 403)]


async def test_allowed_origin_without_token_reads_the_401(chromium):
    result, shim, origin = await _browse(chromium, allow_page_origin=True, page_token=None)
    # The 401 carries CORS headers, so the page reads the error body instead of a network failure.
    assert result["ok"] is True, result
    assert result["status"] == 401
    assert json.loads(result["body"])["error"].startswith("missing bearer token")
    assert ("POST", origin, 401) in shim.seen
