"""``blazen-peer serve`` as a real subprocess: certificate rotation under continuous load (kubelet-style
Secret swaps, zero failed calls, no restart), graceful drain on SIGTERM (exit 0), secure by default."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from blazen_peer.wire.envelope import wrap
from blazen_peer.wire.messages import SubWorkflowRequest

from tests.support.peers import (
    TOKEN,
    PeerProcess,
    client_ssl,
    http_get,
    metric,
    served_serial,
    wait_ready,
    wait_serial,
)
from tests.support.pki import KubeletSecretDir, Pki

INVOKE = "/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow"
RATE = 250  # calls/s offered; the test requires >= 200/s answered
DURATION = 20.0
ROTATE_AT = (6.0, 13.0)
CHANNELS = 4
NEW_CONNECTION_EVERY = 25  # every 25th call opens a fresh connection (a new handshake) for itself


@pytest.fixture
async def peer_process(tmp_path: Path):
    p = PeerProcess(tmp_path, Pki(tmp_path / "pki"))
    try:
        yield p
    finally:
        await p.close()


def token_dir(tmp: Path) -> str:
    d = KubeletSecretDir(tmp / "token")
    d.write({"token": (TOKEN + "\n").encode()})
    return str(d.path("token"))


@pytest.mark.timeout(180)
async def test_rotation_under_continuous_load(peer_process: PeerProcess, tmp_path: Path) -> None:
    p = peer_process
    pki = p.pki
    assert pki is not None
    proc = await p.start(*p.args("--token-file", token_dir(tmp_path)))
    await wait_ready(p.admin, proc)
    pid = proc.pid
    grpc_ctx, http_ctx = client_ssl(pki, pki.client_files, h2=True), client_ssl(pki)
    assert await asyncio.to_thread(served_serial, p.grpc, grpc_ctx) == 1001
    clients = [await p.client(f"load-{i}") for i in range(CHANNELS)]
    loop = asyncio.get_running_loop()
    failures: list[str] = []
    done_at: list[float] = []

    async def one(i: int) -> None:
        try:
            if i % NEW_CONNECTION_EVERY == 0:
                async with await p.client(f"fresh-{i}") as fresh:
                    resp = await fresh.invoke_sub_workflow("wf", ["echo"], {"x": i}, deadline=60)
            else:
                resp = await clients[i % CHANNELS].invoke_sub_workflow("wf", ["echo"], {"x": i}, deadline=60)
            if resp.result_value()["x"] != i:
                failures.append(f"call {i}: wrong answer {resp}")
        except Exception as exc:
            failures.append(f"call {i}: {type(exc).__name__}: {exc}")
        done_at.append(loop.time())

    async def offer_load() -> list[asyncio.Task]:
        tasks: list[asyncio.Task] = []
        t0 = loop.time()
        while (now := loop.time()) - t0 < DURATION:
            due = int((now - t0) * RATE)
            while len(tasks) < due:
                tasks.append(asyncio.ensure_future(one(len(tasks))))
            await asyncio.sleep(0.004)
        return tasks

    async def rotate() -> list[tuple[int, float, float]]:
        seen = []
        t0 = loop.time()
        for n, at in enumerate(ROTATE_AT):
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            serial = 2002 + n * 1001
            await asyncio.to_thread(pki.rotate, serial)
            # New handshakes on both listeners present the new certificate within 5 s.
            g = await wait_serial(p.grpc, grpc_ctx, serial, 5.0)
            h = await wait_serial(p.http, http_ctx, serial, 5.0)
            seen.append((serial, g, h))
        return seen

    t_start = loop.time()
    load, rotations = await asyncio.gather(offer_load(), rotate())
    await asyncio.wait_for(asyncio.gather(*load), 90)
    elapsed = max(done_at) - t_start
    for c in clients:
        await c.close()

    sent = len(load)
    print(f"rotation under load: {sent} calls, {len(failures)} failed, {sent / elapsed:.0f}/s, {rotations=}")
    assert failures == [], failures[:10]
    assert len(done_at) == sent
    assert sent >= RATE * DURATION * 0.95, f"only {sent} calls were offered"
    assert sent / elapsed >= 200, f"{sent} calls answered in {elapsed:.1f} s"
    assert [s for s, _, _ in rotations] == [2002, 3003]
    assert all(g <= 5.0 and h <= 5.0 for _, g, h in rotations), rotations
    # One process all along: same pid, still running, two reloads counted, same identity.
    assert proc.returncode is None
    assert proc.pid == pid
    _, text = await http_get(f"http://127.0.0.1:{p.admin}/metrics")
    assert metric(text, "blazen_peer_tls_reloads_total", listener="peer") == 2
    ok = metric(text, "blazen_peer_calls_total", transport="grpc", method="InvokeSubWorkflow", code="OK")
    assert ok == sent
    not_after = pki.server.cert.not_valid_after_utc.timestamp()
    assert metric(text, "blazen_peer_tls_cert_not_after_seconds", listener="peer") == not_after
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0, p.log()[-3000:]


async def _raw_call(port: int, pki: Pki, payload: bytes, token: str) -> tuple[grpc.StatusCode, str]:
    creds = grpc.ssl_channel_credentials(pki.ca_pem, pki.client.key_pem, pki.client.cert_pem)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as ch:
        try:
            await ch.unary_unary(INVOKE)(payload, metadata=[("authorization", f"Bearer {token}")], timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.timeout(120)
async def test_sigterm_drains_in_flight_call_and_exits_zero(
    peer_process: PeerProcess, tmp_path: Path
) -> None:
    p = peer_process
    pki = p.pki
    assert pki is not None
    proc = await p.start(*p.args("--shutdown-grace-secs", "30"), env={"BLAZEN_PEER_TOKEN": TOKEN})
    await wait_ready(p.admin, proc)
    marker = tmp_path / "started"
    client = await p.client("drain-test")
    in_flight = asyncio.ensure_future(
        client.invoke_sub_workflow("wf", ["slow"], {"secs": 4.0, "marker": str(marker)}, deadline=60)
    )
    t0 = time.monotonic()
    while not marker.exists():
        assert time.monotonic() - t0 < 30, "the slow step never started"
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    # Draining without an admit window (the CLI default): /readyz false, the listeners closed to new
    # connections at once (a client gets UNAVAILABLE and can go elsewhere), the in-flight call runs on.
    t0 = time.monotonic()
    while (await http_get(f"http://127.0.0.1:{p.admin}/readyz"))[0] != 503:
        assert time.monotonic() - t0 < 10, "readiness did not turn false"
        await asyncio.sleep(0.05)
    _, body = await http_get(f"http://127.0.0.1:{p.admin}/readyz")
    assert json.loads(body) == {"ready": False, "reason": "draining"}
    payload = wrap(SubWorkflowRequest.new("wf", ["echo"], {"x": 1}).encode())
    code, _ = await _raw_call(p.grpc, pki, payload, TOKEN)
    assert code == grpc.StatusCode.UNAVAILABLE
    import aiohttp

    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s:
            await s.post(
                f"https://localhost:{p.http}/v1/peer/invoke_sub_workflow",
                data=b"{}",
                headers={"authorization": f"Bearer {TOKEN}"},
                ssl=client_ssl(pki),
            )
    assert not in_flight.done()
    resp = await in_flight
    assert resp.result_value() == {"slept": 4.0}
    await client.close()
    assert await asyncio.wait_for(proc.wait(), 30) == 0, p.log()[-3000:]
    assert "drained" in p.log()


@pytest.mark.timeout(120)
async def test_cli_refuses_to_start_without_tls_or_token(tmp_path: Path) -> None:
    p = PeerProcess(tmp_path, None)
    try:
        proc = await p.start(*p.args())
        assert await asyncio.wait_for(proc.wait(), 60) == 2
        out = p.log()
        assert "refusing to start: neither TLS" in out
        assert "--insecure" in out
        # The explicit opt-out, and the env twins of the token and of --insecure, all start a peer.
        for env in ({"BLAZEN_PEER_INSECURE": "1"}, {"BLAZEN_PEER_TOKEN": TOKEN}):
            proc = await p.start(*p.args(), env=env)
            await wait_ready(p.admin, proc)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        # Logs are JSON lines with the node id; the token never shows.
        lines = [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]
        assert lines
        assert all(rec["node_id"] == "proc-0" for rec in lines)
        assert TOKEN not in p.log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            await p.close()
