"""Hitless termination with real ``blazen-peer serve`` processes on loopback: two replicas behind a
kube-proxy-like TCP balancer, clients that keep one channel (one keep-alive session) open, one replica
SIGTERMed under load. Nothing may fail: the terminating peer keeps admitting while the balancer still sends it
connections, then sends GOAWAY so the open channel reconnects to the other replica, and lets its in-flight
calls finish before it exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.support.peers import TOKEN, PeerProcess, client_ssl, http_get, metric, tls_client, wait_ready
from tests.support.pki import Pki

GRPC_RATE = 220  # calls/s on one open channel
HTTP_RATE = 40  # calls/s on one keep-alive session
DURATION = 9.0
SIGTERM_AT = 2.5
ADMIT_SECS = 4.0
ENDPOINT_DELAY = 1.0  # how long after readiness fails the balancer stops sending new connections


class Balancer:
    """Round-robins each new TCP connection over the backends it currently lists, as kube-proxy does for
    a Service: an open connection stays with its backend for good. ``follow_readiness`` drops a backend
    ``ENDPOINT_DELAY`` after its ``/readyz`` turns false (the endpoints update)."""

    def __init__(self, backends: dict[str, tuple[int, int]]) -> None:
        self.backends = dict(backends)  # name -> (port, admin port)
        self.listed = list(backends)
        self.connections: dict[str, int] = dict.fromkeys(backends, 0)
        self._next = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def follow_readiness(self) -> None:
        while True:
            for name, (_, admin) in self.backends.items():
                if name not in self.listed:
                    continue
                status = 0
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    status, _ = await http_get(f"http://127.0.0.1:{admin}/readyz")
                if status != 200:
                    await asyncio.sleep(ENDPOINT_DELAY)
                    self.listed.remove(name)
            await asyncio.sleep(0.1)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = self.listed[self._next % len(self.listed)]
        self._next += 1
        self.connections[name] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backends[name][0])
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.mark.timeout(180)
async def test_sigterm_under_load_loses_no_call(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    a, b = PeerProcess(tmp_path / "a", pki), PeerProcess(tmp_path / "b", pki)
    grace = [
        "--shutdown-grace-secs",
        "20",
        "--shutdown-admit-secs",
        str(ADMIT_SECS),
        "--grpc-max-connection-age-secs",
        str(ADMIT_SECS / 2),
    ]
    env = {"BLAZEN_PEER_TOKEN": TOKEN}
    proc_a = await a.start(*a.args(*grace, "--node-id", "peer-a"), env=env)
    proc_b = await b.start(*b.args(*grace, "--node-id", "peer-b"), env=env)
    grpc_lb = Balancer({"a": (a.grpc, a.admin), "b": (b.grpc, b.admin)})
    http_lb = Balancer({"a": (a.http, a.admin), "b": (b.http, b.admin)})
    follow: list[asyncio.Task] = []
    try:
        await wait_ready(a.admin, proc_a)
        await wait_ready(b.admin, proc_b)
        for lb in (grpc_lb, http_lb):
            await lb.start()
            follow.append(asyncio.ensure_future(lb.follow_readiness()))
        held = await tls_client(grpc_lb.port, pki, "load")  # one channel for the whole test
        direct = await a.client("slow-caller")
        session = aiohttp.ClientSession()  # one keep-alive session
        loop = asyncio.get_running_loop()
        failures: list[str] = []

        async def grpc_one(i: int) -> None:
            try:
                resp = await held.invoke_sub_workflow("wf", ["echo"], {"x": i}, deadline=30)
                result = resp.result_value()
                if result["x"] != i:
                    failures.append(f"grpc {i}: wrong answer {result}")
            except Exception as exc:
                failures.append(f"grpc {i} at {loop.time() - t0:.2f}s: {type(exc).__name__}: {exc}")

        async def http_one(i: int) -> None:
            body = {
                "envelope_version": 1,
                "workflow_name": "wf",
                "step_ids": ["echo"],
                "input_json": list(json.dumps({"x": i}).encode()),
                "timeout_secs": None,
            }
            try:
                async with session.post(
                    f"https://localhost:{http_lb.port}/v1/peer/invoke_sub_workflow",
                    json=body,
                    headers={"authorization": f"Bearer {TOKEN}"},
                    ssl=client_ssl(pki),
                ) as r:
                    got = await r.json()
                    if r.status != 200 or got["error"] is not None:
                        failures.append(f"http {i}: {r.status} {got}")
            except Exception as exc:
                failures.append(f"http {i} at {loop.time() - t0:.2f}s: {type(exc).__name__}: {exc}")

        async def offer(rate: int, one) -> list[asyncio.Task]:
            tasks: list[asyncio.Task] = []
            while (now := loop.time()) - t0 < DURATION:
                while len(tasks) < int((now - t0) * rate):
                    tasks.append(asyncio.ensure_future(one(len(tasks))))
                await asyncio.sleep(0.004)
            return tasks

        async def terminate_a() -> tuple[asyncio.Future, float]:
            await asyncio.sleep(SIGTERM_AT)
            # A call already running on the terminating replica: it must finish, not be cut.
            slow = asyncio.ensure_future(
                direct.invoke_sub_workflow("wf", ["slow"], {"secs": 5.0}, deadline=60)
            )
            await asyncio.sleep(0.3)
            proc_a.send_signal(signal.SIGTERM)
            sent = loop.time()
            while (await http_get(f"http://127.0.0.1:{a.admin}/readyz"))[0] != 503:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return slow, loop.time() - sent

        t0 = loop.time()
        grpc_tasks, http_tasks, (slow, not_ready_after) = await asyncio.gather(
            offer(GRPC_RATE, grpc_one), offer(HTTP_RATE, http_one), terminate_a()
        )
        await asyncio.wait_for(asyncio.gather(*grpc_tasks, *http_tasks), 60)
        elapsed = loop.time() - t0
        slow_result = (await slow).result_value()
        code = await asyncio.wait_for(proc_a.wait(), 30)
        stopped_after = loop.time() - t0 - SIGTERM_AT
        print(
            f"hitless drain: {len(grpc_tasks)} gRPC + {len(http_tasks)} HTTP calls in {elapsed:.1f}s, "
            f"{len(failures)} failed; connections {grpc_lb.connections} "
            f"{http_lb.connections}; not ready {not_ready_after * 1000:.0f} ms after SIGTERM; "
            f"peer-a exited after {stopped_after:.1f}s"
        )
        assert failures == [], failures[:10]
        assert len(grpc_tasks) / elapsed >= 200
        assert slow_result == {"slept": 5.0}
        assert code == 0, a.log()[-3000:]
        assert "drained" in a.log()
        # Readiness fell at once; the held channel moved to peer-b after the GOAWAY (a second connection
        # through the balancer) and peer-b served calls.
        assert not_ready_after < 1.0
        assert grpc_lb.connections["a"] >= 1
        assert grpc_lb.connections["b"] >= 1
        _, text = await http_get(f"http://127.0.0.1:{b.admin}/metrics")
        on_b = metric(
            text, "blazen_peer_calls_total", transport="grpc", method="InvokeSubWorkflow", code="OK"
        )
        assert (on_b or 0) > 0
        await session.close()
        await held.close()
        await direct.close()
    finally:
        for task in follow:
            task.cancel()
        for lb in (grpc_lb, http_lb):
            await lb.close()
        await a.close()
        await b.close()
