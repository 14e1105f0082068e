"""The hostile-input suite's real peers: ``peer_factory(*flags)`` starts a ``blazen-peer serve`` process on
loopback (gRPC, HTTP/JSON shim and admin ports, ``--insecure`` unless TLS or a token is passed) serving
``hostile_steps:REG``, waits until ``/readyz`` answers 200, and kills it after the test.

``Peer`` has the raw calls a hostile client makes (bytes in, status out), the admin reads (a metric, the
process RSS) and the liveness check every test ends with: the process is alive and answers a valid call."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from blazen_peer.wire.envelope import unwrap, wrap
from blazen_peer.wire.messages import SubWorkflowRequest, SubWorkflowResponse, decode_stream_frame
from blazen_peer.wire.protocol import (
    PATH_DEREF,
    PATH_INVOKE,
    PATH_RELEASE,
    PATH_STREAM,
    ROUTE_DEREF,
    ROUTE_INVOKE,
    ROUTE_RELEASE,
)

from tests.support.peers import http_get, metric, spawn_peer, wait_ready
from tests.support.ports import free_port

STEPS = Path(__file__).with_name("hostile_steps.py")
INVOKE, STREAM, DEREF, RELEASE = PATH_INVOKE, PATH_STREAM, PATH_DEREF, PATH_RELEASE
__all__ = ["DEREF", "INVOKE", "RELEASE", "ROUTE_DEREF", "ROUTE_INVOKE", "ROUTE_RELEASE", "STREAM"]


def request(steps: list[str], input_value: Any = None, timeout_secs: int | None = None) -> bytes:
    """A wrapped ``SubWorkflowRequest`` (the gRPC request message)."""
    return wrap(SubWorkflowRequest.new("wf", steps, input_value, timeout_secs).encode())


class Peer:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.grpc, self.http, self.admin = free_port(), free_port(), free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None

    @property
    def args(self) -> list[str]:
        return [
            "--entrypoint",
            "hostile_steps:REG",
            "--node-id",
            "hostile-0",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc}",
            "--http-addr",
            f"127.0.0.1:{self.http}",
            "--admin-addr",
            f"127.0.0.1:{self.admin}",
        ]

    async def start(self, extra: list[str], env: dict[str, str] | None) -> None:
        self.proc = await spawn_peer(self.dir, self.args + extra, env)
        await wait_ready(self.admin, self.proc)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc}")

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log(self) -> str:
        return (self.dir / "peer.log").read_text(errors="replace")

    # -- gRPC, raw ---------------------------------------------------------------------------------------

    async def unary(self, method: str, message: bytes, deadline: float = 30) -> tuple[str, bytes]:
        """``(status name, reply postcard payload)``; the details instead of the payload unless OK."""
        assert self.channel is not None
        call = self.channel.unary_unary(method)
        try:
            reply = await call(message, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, (exc.details() or "").encode()
        return "OK", unwrap(reply)

    async def invoke(self, steps: list[str], input_value: Any = None, timeout_secs: int | None = None) -> Any:
        """InvokeSubWorkflow; ``SubWorkflowResponse`` on OK, else ``(status, details)``."""
        code, body = await self.unary(INVOKE, request(steps, input_value, timeout_secs))
        return SubWorkflowResponse.decode(body) if code == "OK" else (code, body.decode())

    async def stream(self, message: bytes, deadline: float = 30) -> tuple[str, str, list[Any]]:
        """StreamSubWorkflowEvents to its end: ``(status, details, frames)``."""
        assert self.channel is not None
        call = self.channel.unary_stream(STREAM)(message, timeout=deadline)
        frames: list[Any] = []
        try:
            async for msg in call:
                frames.append(decode_stream_frame(unwrap(msg)))
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or "", frames
        return "OK", "", frames

    # -- HTTP ----------------------------------------------------------------------------------------------

    async def post(self, route: str, body: bytes | str, deadline: float = 30) -> tuple[int, Any]:
        """``(status, parsed JSON body)``; a body that is not JSON is returned as text."""
        url = f"http://127.0.0.1:{self.http}{route}"
        client_timeout = aiohttp.ClientTimeout(total=deadline)
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as s,
            s.post(url, data=body, headers={"Content-Type": "application/json"}) as r,
        ):
            text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text

    # -- admin and process ---------------------------------------------------------------------------------

    async def metric(self, name: str, **labels: str) -> float | None:
        status, text = await http_get(f"http://127.0.0.1:{self.admin}/metrics")
        assert status == 200
        return metric(text, name, **labels)

    async def refs_held(self) -> float | None:
        return await self.metric("blazen_peer_session_refs")

    async def wait_refs(self, expected: float, limit: float = 10) -> float | None:
        """The session-ref gauge once it reads ``expected`` (or its last reading after ``limit`` s)."""
        deadline = time.monotonic() + limit
        seen = await self.refs_held()
        while seen != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            seen = await self.refs_held()
        return seen

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    async def probe(self) -> dict[str, Any]:
        """The counters of hostile_steps.py, read through a call (which also proves the peer serves)."""
        resp = await self.invoke(["probe"])
        assert isinstance(resp, SubWorkflowResponse), resp
        assert resp.error is None, resp
        return resp.result_value()

    async def assert_serving(self) -> None:
        """Alive, and answers a valid call on both transports."""
        assert self.proc is not None
        assert self.proc.returncode is None, self.log()[-3000:]
        resp = await self.invoke(["echo"], {"ping": 1}, timeout_secs=10)
        assert isinstance(resp, SubWorkflowResponse), resp
        assert resp.result_value() == {"ping": 1}, resp
        status, body = await self.post(ROUTE_INVOKE, invoke_json(["echo"], {"ping": 2}))
        assert (status, json.loads(bytes(body["result_json"]))) == (200, {"ping": 2}), body

    def tracebacks(self) -> int:
        return self.log().count("Traceback")


def invoke_json(steps: list[str], input_value: Any = None, timeout_secs: int | None = None) -> str:
    return json.dumps(
        {
            "envelope_version": 1,
            "workflow_name": "wf",
            "step_ids": steps,
            "input_json": list(json.dumps({} if input_value is None else input_value).encode()),
            "timeout_secs": timeout_secs,
        }
    )


PeerFactory = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def peer_factory(tmp_path: Path) -> AsyncIterator[PeerFactory]:
    """``await peer_factory(*flags, env=None)``: a started peer; ``--insecure`` is added unless a TLS or
    token flag is among ``flags``."""
    peers: list[Peer] = []

    async def start(*flags: str, env: dict[str, str] | None = None) -> Peer:
        workdir = tmp_path / f"peer-{len(peers)}"
        workdir.mkdir()
        shutil.copy(STEPS, workdir / STEPS.name)
        extra = list(flags)
        if not any(f.startswith(("--tls-", "--token")) for f in extra):
            extra.append("--insecure")
        peer = Peer(workdir)
        peers.append(peer)
        await peer.start(extra, env)
        return peer

    try:
        yield start
    finally:
        for peer in peers:
            await peer.close()
