"""A real ``blazen-peer serve`` for the transport tests (tests/security/test_transport_*.py), built on the
peer helpers of tests/support: its ports, its log, its memory as the kernel reports it, and raw
sockets for the clients a well-behaved library would never be."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.support.peers import STEP_MODULE, spawn_peer, wait_ready, write_steps
from tests.support.ports import free_port


class ShimPeer:
    """``await ShimPeer.start(tmp, *flags)``: gRPC, HTTP shim and admin on loopback, ready."""

    def __init__(self, tmp: Path) -> None:
        self.dir = write_steps(tmp)
        self.grpc, self.http, self.admin = free_port(), free_port(), free_port()
        self.proc: asyncio.subprocess.Process | None = None

    def args(self, *flags: str) -> list[str]:
        return [
            "--entrypoint",
            f"{STEP_MODULE}:REG",
            "--node-id",
            "transport-0",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc}",
            "--http-addr",
            f"127.0.0.1:{self.http}",
            "--admin-addr",
            f"127.0.0.1:{self.admin}",
            *flags,
        ]

    @classmethod
    async def start(cls, tmp: Path, *flags: str, env: dict[str, str] | None = None) -> ShimPeer:
        peer = cls(tmp)
        peer.proc = await spawn_peer(peer.dir, peer.args(*flags), env)
        await wait_ready(peer.admin, peer.proc)
        return peer

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log(self) -> str:
        return (self.dir / "peer.log").read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def status_kib(self, field: str) -> int:
        """A ``/proc/PID/status`` figure in KiB (``VmRSS``: now; ``VmHWM``: the peak so far)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def open_fds(self) -> int:
        assert self.proc is not None
        return len(list(Path(f"/proc/{self.proc.pid}/fd").iterdir()))


def invoke_body(steps: list[str], value: Any, timeout_secs: int | None = 30) -> bytes:
    """An invoke body as Blazen's HttpPeerClient renders it (``input_json`` as an array of integers)."""
    payload = json.dumps(value).encode()
    return (
        b'{"envelope_version":1,"workflow_name":"wf","step_ids":'
        + json.dumps(steps).encode()
        + b',"input_json":['
        + ",".join(map(str, payload)).encode()
        + b'],"timeout_secs":'
        + json.dumps(timeout_secs).encode()
        + b"}"
    )


async def raw_exchange(
    port: int, head: bytes, body: bytes = b"", *, read_timeout: float = 30
) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, without the blank line) and ``body`` on a fresh
    connection; ``(status, response bytes)``; status 0 when the server closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), read_timeout)
    finally:
        writer.close()
    if not data.startswith(b"HTTP/1."):
        return 0, data
    return int(data.split(b" ", 2)[1]), data


def post_head(port: int, path: str, length: int | None, content_type: str = "application/json") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return "\r\n".join(lines).encode()
