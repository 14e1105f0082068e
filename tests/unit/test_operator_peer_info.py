"""The operator's /v1/info read against real HTTP servers on loopback: it follows no redirect, uses no proxy
from the environment, and reads a bounded body."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from blazen_operator.apply import read_peer_info


class Server:
    def __init__(self, respond) -> None:
        hits: list[str] = []
        self.hits = hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                respond(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.close()


def reply(status: int, body: bytes, headers: dict[str, str] | None = None):
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return respond


def test_reads_a_peers_info(servers: list[Server]) -> None:
    peer = Server(reply(200, json.dumps({"steps": ["a::b"]}).encode()))
    servers.append(peer)
    assert read_peer_info(f"{peer.url}/v1/info") == {"steps": ["a::b"]}
    assert peer.hits == ["/v1/info"]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed(servers: list[Server], status: int) -> None:
    # A compromised pod must not be able to point the operator at another host (an SSRF from the operator's
    # network position): the redirect is an unreadable answer, and the target never sees a request.
    target = Server(reply(200, json.dumps({"steps": ["evil::x"]}).encode()))
    peer = Server(reply(status, b"", {"Location": f"{target.url}/secret"}))
    servers += [target, peer]
    assert read_peer_info(f"{peer.url}/v1/info") is None
    assert peer.hits == ["/v1/info"]
    assert target.hits == []


def test_no_proxy_from_the_environment_is_used(servers: list[Server], monkeypatch) -> None:
    proxy = Server(reply(200, json.dumps({"steps": ["proxy::x"]}).encode()))
    peer = Server(reply(200, json.dumps({"steps": ["a::b"]}).encode()))
    servers += [proxy, peer]
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert read_peer_info(f"{peer.url}/v1/info") == {"steps": ["a::b"]}
    assert proxy.hits == []


@pytest.mark.parametrize(
    "respond",
    [
        reply(500, b"{}"),
        reply(200, b"not json"),
        reply(200, b"[1, 2]"),
        reply(200, b"{" * (2 << 20)),  # over the 1 MiB read bound: truncated, so unparseable
    ],
    ids=["500", "not-json", "not-an-object", "oversized"],
)
def test_bad_answers_are_unknown(servers: list[Server], respond) -> None:
    peer = Server(respond)
    servers.append(peer)
    assert read_peer_info(f"{peer.url}/v1/info") is None


def test_a_dead_peer_is_unknown() -> None:
    assert read_peer_info("http://127.0.0.1:1/v1/info", timeout=1) is None
    assert read_peer_info("https://127.0.0.1:1/v1/info") is None  # not the plain admin port
