"""Slow, idle, numerous and vanishing HTTP clients against a real ``blazen-peer serve``: header deadline
(slowloris), connection cap below the fd limit, no log line per dropped connection, and a caller that
hangs up has its sub-workflow cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from blazen_peer.client import BlazenPeerClient
from blazen_peer.wire.protocol import ROUTE_INVOKE

from tests.security.transport_peer import ShimPeer, invoke_body, post_head, raw_exchange
from tests.support.peers import http_get, metric
from tests.support.pki import Pki


async def _closed_within(reader: asyncio.StreamReader, limit: float) -> bool:
    """True when the server closes (EOF or reset) within ``limit`` seconds."""
    try:
        data = await asyncio.wait_for(reader.read(65536), limit)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    while data:  # an answer (e.g. 408) may come first; what matters is that the connection ends
        try:
            data = await asyncio.wait_for(reader.read(65536), limit)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return True


async def test_slowloris_headers_are_cut_off_at_the_idle_timeout(tmp_path: Path):
    peer = await ShimPeer.start(tmp_path, "--insecure", "--idle-timeout-secs", "2")
    try:
        head = post_head(peer.http, ROUTE_INVOKE, 10) + b"\r\nX-Pad: "
        reader, writer = await asyncio.open_connection("127.0.0.1", peer.http)
        t0 = time.monotonic()

        async def trickle() -> None:
            # One byte every 0.25 s: never a complete header, never idle for long.
            with contextlib.suppress(ConnectionError):
                for b in head + b"a" * 200:
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(0.25)

        sender = asyncio.ensure_future(trickle())
        try:
            assert await _closed_within(reader, 15), "a trickled header kept its connection for 15 s"
        finally:
            sender.cancel()
            writer.close()
        assert time.monotonic() - t0 < 8
        # An idle connection (nothing sent at all) is closed too.
        reader, writer = await asyncio.open_connection("127.0.0.1", peer.http)
        assert await _closed_within(reader, 15)
        writer.close()
        assert peer.alive()
    finally:
        await peer.close()


async def test_connections_past_the_cap_are_closed_at_once_and_logged_once(tmp_path: Path):
    peer = await ShimPeer.start(tmp_path, "--insecure", "--max-connections", "8", "--idle-timeout-secs", "30")
    try:
        held = [await asyncio.open_connection("127.0.0.1", peer.http) for _ in range(8)]
        await asyncio.sleep(0.3)
        fds = peer.open_fds()
        extra = [await asyncio.open_connection("127.0.0.1", peer.http) for _ in range(40)]
        for reader, _ in extra:
            assert await _closed_within(reader, 5), "a connection past the cap was kept"
        assert peer.open_fds() <= fds + 2
        for _, writer in extra:
            writer.close()
        # The held connections still work: a request on one of them is answered.
        reader, writer = held[0]
        body = invoke_body(["echo"], {"x": 1})
        writer.write(post_head(peer.http, ROUTE_INVOKE, len(body)) + b"\r\n\r\n" + body)
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.3)
        status, _ = await raw_exchange(peer.http, post_head(peer.http, ROUTE_INVOKE, len(body)), body)
        assert status == 200
        notes = [line for line in peer.log().splitlines() if "--max-connections" in line]
        assert len(notes) == 1, notes  # 40 refusals, one rate-limited line
        assert "40 connection(s) refused" in notes[0] or "1 connection(s) refused" in notes[0]
    finally:
        await peer.close()


def _bad_tls_handshake(port: int, ctx: ssl.SSLContext) -> None:
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        tls.recv(100)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_dropped_connections_do_not_log_a_line_each(tmp_path: Path, loop: str):
    pki = Pki(tmp_path / "pki")
    tls = ["--tls-cert", pki.cert, "--tls-key", pki.key, "--tls-ca", pki.ca_file]
    peer = await ShimPeer.start(tmp_path / "work", *tls, "--event-loop", loop)
    try:
        before = len(peer.log().splitlines())
        no_cert = ssl.create_default_context(cadata=pki.ca_pem.decode())
        wrong_ca = ssl.create_default_context()  # the system roots: the peer's certificate fails here
        for port in (peer.http, peer.grpc):
            for ctx in (no_cert, wrong_ca):
                await asyncio.gather(*(asyncio.to_thread(_bad_tls_handshake, port, ctx) for _ in range(25)))
            for _ in range(25):  # plain TCP open and reset
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        for _ in range(25):  # not HTTP at all, on the admin port (plain HTTP)
            status, _ = await raw_exchange(peer.admin, b"\x16\x03\x01 not http", read_timeout=5)
            assert status in (0, 400)
        await asyncio.sleep(1)
        lines = peer.log().splitlines()[before:]
        assert lines == [], "\n".join(lines[:20])
        assert peer.alive()
    finally:
        await peer.close()


async def test_a_caller_that_hangs_up_has_its_run_cancelled(tmp_path: Path):
    peer = await ShimPeer.start(tmp_path, "--insecure", "--max-concurrent-workflows", "1")
    try:
        marker = tmp_path / "started"
        body = invoke_body(["slow"], {"marker": str(marker), "secs": 60}, timeout_secs=120)
        _reader, writer = await asyncio.open_connection("127.0.0.1", peer.http)
        writer.write(post_head(peer.http, ROUTE_INVOKE, len(body)) + b"\r\n\r\n" + body)
        await writer.drain()
        for _ in range(100):
            if marker.exists():
                break
            await asyncio.sleep(0.05)
        assert marker.exists(), peer.log()[-2000:]
        # The one workflow slot is taken: a second call is refused.
        echo = invoke_body(["echo"], {"x": 1})
        status, _ = await raw_exchange(peer.http, post_head(peer.http, ROUTE_INVOKE, len(echo)), echo)
        assert status == 429
        writer.transport.abort()  # the caller goes away
        t0 = time.monotonic()
        status = 429
        while status == 429 and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.1)
            status, _ = await raw_exchange(peer.http, post_head(peer.http, ROUTE_INVOKE, len(echo)), echo)
        assert status == 200, "the abandoned 60 s run still holds the workflow slot"
        _, text = await http_get(f"http://127.0.0.1:{peer.admin}/metrics")
        labels = {"transport": "http", "method": "InvokeSubWorkflow"}
        assert metric(text, "blazen_peer_in_flight_calls", **labels) == 0.0
        assert metric(text, "blazen_peer_calls_total", code="499", **labels) == 1.0
    finally:
        await peer.close()


async def test_the_shim_answers_on_a_connection_kept_alive_between_calls(tmp_path: Path):
    """The idle deadline must not cut a client that reuses its connection within it."""
    peer = await ShimPeer.start(tmp_path, "--insecure", "--idle-timeout-secs", "2")
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(
                    f"http://127.0.0.1:{peer.http}{ROUTE_INVOKE}",
                    data=invoke_body(["echo"], {"x": 1}),
                    headers={"Content-Type": "application/json"},
                ) as r:
                    assert r.status == 200
                await asyncio.sleep(1)
    finally:
        await peer.close()


async def test_grpc_connections_past_the_cap_are_closed_at_once(tmp_path: Path):
    peer = await ShimPeer.start(tmp_path, "--insecure", "--max-connections", "4")
    try:
        lines = len(peer.log().splitlines())
        held = [await asyncio.open_connection("127.0.0.1", peer.grpc) for _ in range(4)]
        await asyncio.sleep(0.3)
        extra = [await asyncio.open_connection("127.0.0.1", peer.grpc) for _ in range(20)]
        for reader, _ in extra:
            assert await _closed_within(reader, 5), "a gRPC connection past the cap was kept"
        assert len(peer.log().splitlines()) == lines  # no line per refused connection
        for _, writer in held + extra:
            writer.close()
        await asyncio.sleep(0.5)
        async with await BlazenPeerClient.connect(f"http://127.0.0.1:{peer.grpc}", "c") as client:
            resp = await client.invoke_sub_workflow("wf", ["echo"], {"x": 2}, timeout_secs=10)
        assert resp.result_value()["x"] == 2
    finally:
        await peer.close()


async def test_a_grpc_connection_that_never_handshakes_is_closed_at_the_idle_timeout(tmp_path: Path):
    pki = Pki(tmp_path / "pki")
    tls = ["--tls-cert", pki.cert, "--tls-key", pki.key, "--tls-ca", pki.ca_file]
    peer = await ShimPeer.start(tmp_path / "work", *tls, "--idle-timeout-secs", "2")
    try:
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", peer.grpc)
        assert await _closed_within(reader, 15), "a silent connection kept its gRPC slot for 15 s"
        assert time.monotonic() - t0 < 8
        writer.close()
    finally:
        await peer.close()
