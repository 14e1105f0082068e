"""Hostile HTTP bodies against a real ``blazen-peer serve``: over the limit (refused before they are read),
huge but allowed (a bounded memory peak), stalled, and of a type a browser may send cross-site without a
preflight. Each test ends with the peer alive and serving."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from blazen_peer.wire.protocol import ROUTE_INVOKE

from tests.security.transport_peer import (
    ShimPeer,
    invoke_body,
    post_head,
    raw_exchange,
)

MIB = 1024 * 1024


async def _assert_serving(peer: ShimPeer) -> None:
    assert peer.alive(), peer.log()[-3000:]
    body = invoke_body(["echo"], {"x": 7})
    status, reply = await raw_exchange(peer.http, post_head(peer.http, ROUTE_INVOKE, len(body)), body)
    assert status == 200, reply[-500:]


@pytest.fixture
async def small_limit_peer(tmp_path: Path):
    peer = await ShimPeer.start(tmp_path, "--insecure", "--http-max-body-bytes", str(MIB))
    yield peer
    await peer.close()


async def test_an_over_limit_content_length_is_refused_before_the_body_is_sent(small_limit_peer):
    peer = small_limit_peer
    # Headers only: a server that reads the body first would wait here for 4 MiB that never come.
    status, reply = await raw_exchange(
        peer.http, post_head(peer.http, ROUTE_INVOKE, 4 * MIB), read_timeout=10
    )
    assert status == 429, reply
    assert b"--http-max-body-bytes" in reply
    await _assert_serving(peer)


async def test_eight_rejected_4mib_requests_leave_memory_flat(small_limit_peer):
    peer = small_limit_peer
    body = b"[" + b"1," * (2 * MIB) + b"1]"  # 4 MiB
    rss0 = peer.status_kib("VmRSS")

    async def chunked() -> int:
        # No Content-Length: the cap has to act while the body streams in.
        async def gen():
            for i in range(0, len(body), 64 * 1024):
                yield body[i : i + 64 * 1024]

        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{peer.http}{ROUTE_INVOKE}",
                data=gen(),
                headers={"Content-Type": "application/json"},
            ) as r,
        ):
            return r.status

    async def sized() -> int:
        status, _ = await raw_exchange(peer.http, post_head(peer.http, ROUTE_INVOKE, len(body)), body)
        return status

    statuses = await asyncio.gather(*(chunked() if i % 2 else sized() for i in range(8)))
    assert statuses == [429] * 8
    growth_mib = (peer.status_kib("VmHWM") - rss0) / 1024
    assert growth_mib < 50, f"peak RSS grew by {growth_mib:.1f} MiB for eight refused 4 MiB bodies"
    await _assert_serving(peer)


async def test_a_promised_body_costs_nothing_until_it_arrives(tmp_path: Path):
    """Eight connections announce 60 MiB bodies (under the default 64 MiB limit) and send ten bytes each:
    the peer must not reserve what they promise."""
    peer = await ShimPeer.start(tmp_path, "--insecure", "--idle-timeout-secs", "30")
    try:
        rss0 = peer.status_kib("VmRSS")
        conns = []
        for _ in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", peer.http)
            writer.write(post_head(peer.http, ROUTE_INVOKE, 60 * MIB) + b"\r\n\r\n" + b'{"envelope')
            await writer.drain()
            conns.append((reader, writer))
        await asyncio.sleep(1)
        growth_mib = (peer.status_kib("VmHWM") - rss0) / 1024
        assert growth_mib < 50, f"peak RSS grew by {growth_mib:.0f} MiB for 80 bytes received"
        for _, writer in conns:
            writer.close()
        await _assert_serving(peer)
    finally:
        await peer.close()


async def test_a_62mib_body_costs_less_than_twice_its_size(tmp_path: Path):
    peer = await ShimPeer.start(tmp_path, "--insecure")  # the default limit, 64 MiB
    try:
        # Blazen's rendering: input_json as an array of integers, about 3 characters per payload byte.
        body = invoke_body(["echo"], {"x": 1, "pad": "a" * (62 * MIB // 3 - 40)})
        assert 61.9 * MIB < len(body) < 62.1 * MIB
        await asyncio.sleep(0.5)
        rss0 = peer.status_kib("VmRSS")
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{peer.http}{ROUTE_INVOKE}",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as r,
        ):
            assert r.status == 200
            reply = await r.json()
        assert reply["error"] is None
        assert json.loads(bytes(reply["result_json"]))["x"] == 1
        peak = (peer.status_kib("VmHWM") - rss0) * 1024
        assert peak < 2 * len(body), f"peak RSS grew by {peak / MIB:.0f} MiB for a 62 MiB body"
        await _assert_serving(peer)
    finally:
        await peer.close()


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""],
)
async def test_non_json_content_types_are_refused_415_and_run_nothing(tmp_path: Path, content_type: str):
    """The simple requests a cross-site page can make without a CORS preflight."""
    peer = await ShimPeer.start(tmp_path, "--insecure")
    try:
        marker = tmp_path / "ran"
        body = invoke_body(["slow"], {"marker": str(marker), "secs": 0})
        head = post_head(peer.http, ROUTE_INVOKE, len(body), content_type=content_type)
        status, reply = await raw_exchange(peer.http, head, body)
        assert status == 415, reply
        assert b"application/json" in reply
        assert not marker.exists()
        # The same body as JSON runs.
        status, _ = await raw_exchange(peer.http, post_head(peer.http, ROUTE_INVOKE, len(body)), body)
        assert status == 200
        assert marker.exists()
    finally:
        await peer.close()


async def test_a_stalled_body_is_refused_408_at_the_idle_timeout(tmp_path: Path):
    peer = await ShimPeer.start(tmp_path, "--insecure", "--idle-timeout-secs", "1")
    try:
        t0 = time.monotonic()
        status, reply = await raw_exchange(
            peer.http, post_head(peer.http, ROUTE_INVOKE, 1000), b'{"envelope', read_timeout=15
        )
        assert status == 408, reply
        assert time.monotonic() - t0 < 10
        await _assert_serving(peer)
    finally:
        await peer.close()
