"""The real blazen 0.6.74 clients (gRPC ``BlazenPeerClient`` and ``HttpPeerClient``) against our server."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from .conftest import NODE_ID, now_ms

pytestmark = pytest.mark.interop

TRANSPORTS = ["grpc", "http"]


def invoke(transport: str, steps: list[str] | None, input: dict | None = None, **kw: object) -> dict:
    return {"op": "invoke", "transport": transport, "workflow": "wf", "steps": steps, "input": input, **kw}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_echo_success(peer, run_blazen, transport: str) -> None:
    data = {"hello": "world", "n": 42, "nested": {"list": [1.5, None, True]}}
    (res,) = await run_blazen(peer, [invoke(transport, ["echo"], data)])
    assert res["error"] is None
    assert res["result"] == data
    assert res["state"] == {}
    assert res["refs"] == {}
    assert res["version"] == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_exported_state(peer, run_blazen, transport: str) -> None:
    (res,) = await run_blazen(peer, [invoke(transport, ["stateful"])])
    assert res["error"] is None
    assert res["result"] is None
    assert res["state"] == {"count": 42, "who": "é"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_chain_runs_in_event_order_and_default_step_set(peer, run_blazen, transport: str) -> None:
    explicit = invoke(transport, ["chain::c", "chain::b", "chain::a"], {"n": 1})  # list order is irrelevant
    default = {
        "op": "invoke",
        "transport": transport,
        "workflow": "echo-pipeline",
        "steps": [],
        "input": {"n": 2},
    }
    res, res_default = await run_blazen(peer, [explicit, default])
    assert res["result"] == {"trail": ["a", "b", "c"], "n": 20}
    assert res_default["error"] is None
    assert res_default["result"] == {"trail": ["a", "b", "c"], "n": 30}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_session_refs_deref_and_release_twice(peer, run_blazen, transport: str) -> None:
    before = now_ms()
    ops = [
        invoke(transport, ["refs::make"]),
        {"op": "deref", "transport": transport, "uuid": "$ref0"},
        {"op": "deref", "transport": transport, "uuid": "$ref1"},
        {"op": "release", "transport": transport, "uuid": "$ref0"},
        {"op": "release", "transport": transport, "uuid": "$ref0"},
        {"op": "deref", "transport": transport, "uuid": "$ref0"},
        {"op": "release", "transport": transport, "uuid": "$ref1"},
    ]
    res, d0, d1, r1, r2, gone, r3 = await run_blazen(peer, ops)
    after = now_ms()
    assert res["error"] is None
    refs = res["refs"]
    # Only this call's surviving refs: the kept blob and the FileHandle; not the UntilContextDrop scratch ref.
    assert len(refs) == 2
    by_tag = {d["type_tag"]: (uuid, d) for uuid, d in refs.items()}
    assert set(by_tag) == {"Blob", "tests.interop.conftest.FileHandle"}
    for _, d in by_tag.values():
        assert d["origin_node_id"] == NODE_ID
        assert before <= d["created_at_epoch_ms"] <= after
    assert "cannot be resolved" in res["result_exc"]  # the wheel's own limitation with ref markers
    payloads = {sorted(refs)[0]: d0["payload_hex"], sorted(refs)[1]: d1["payload_hex"]}
    assert payloads[by_tag["Blob"][0]] == b"\x00\x01hello\xff".hex()
    tag = b"tests.interop.conftest.FileHandle"
    assert payloads[by_tag[tag.decode()][0]] == (len(tag).to_bytes(4, "big") + tag + b"/data/x.bin").hex()
    assert r1["released"] is True
    assert r2["released"] is False
    assert "exc" in gone
    assert f"session ref {sorted(refs)[0]} not found" in gone["msg"]
    assert r3["released"] is True
    assert peer.server.refs.count == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unknown_step(peer, run_blazen, transport: str) -> None:
    (res,) = await run_blazen(peer, [invoke(transport, ["echo", "nope", "also-nope"])])
    assert res["exc"] == "PeerException"
    if transport == "grpc":
        assert res["msg"] == (
            "tonic transport error: code: 'Some requested entity was not found', "
            'message: "unknown step id `nope`"'
        )
    else:
        assert res["msg"] == (
            "tonic transport error: HTTP 404 from /v1/peer/invoke_sub_workflow: unknown step id `nope`"
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_step_error_and_unhandled_event_keep_serving(peer, run_blazen, transport: str) -> None:
    ops = [invoke(transport, ["boom"]), invoke(transport, ["orphan"]), invoke(transport, ["echo"], {"ok": 1})]
    boom, orphan, after = await run_blazen(peer, ops)
    assert boom["error"] == "workflow error: step 'boom' failed: kaboom"
    assert orphan["error"] == "workflow error: no handler for event type: NobodyListens"
    assert after["error"] is None
    assert after["result"] == {"ok": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_timeout_cancels_the_run(peer, run_blazen, transport: str) -> None:
    (res,) = await run_blazen(peer, [invoke(transport, ["slow"], timeout=1)])
    assert res["error"] == "workflow timed out after 1s"
    assert res["elapsed"] < 1.9
    await asyncio.sleep(1.5)  # the step would have finished by now had it not been cancelled
    assert peer.finished == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unicode_round_trip(peer, run_blazen, transport: str) -> None:
    data = {"é": "ünïcödé", "emoji": "🦀🐍", "cjk": "分散ワークフロー", "rtl": "שלום", "nul": "a\u0000b"}
    (res,) = await run_blazen(peer, [invoke(transport, ["echo"], data)])
    assert res["result"] == data


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_payload_near_3_mib(peer, run_blazen, transport: str) -> None:
    blob = "x" * (3 * 1024 * 1024 - 64)
    (res,) = await run_blazen(peer, [invoke(transport, ["echo"], {"blob": blob}, digest=True)])
    assert res["error"] is None
    expected = json.dumps({"blob": blob}, sort_keys=True).encode()
    assert res["result_len"] == len(expected)
    assert res["result_sha256"] == hashlib.sha256(expected).hexdigest()


async def test_oversized_grpc_request_gets_tonics_status(peer, run_blazen) -> None:
    blob = "y" * (4 * 1024 * 1024 + 10)
    (res,) = await run_blazen(peer, [invoke("grpc", ["echo"], {"blob": blob})])
    assert res["exc"] == "PeerException"
    assert "Operation was attempted past the valid range" in res["msg"]
    assert "Error, decoded message length too large: found " in res["msg"]
    assert "the limit is: 4194304 bytes" in res["msg"]


async def test_empty_step_ids_without_default_set(peer, run_blazen) -> None:
    (res,) = await run_blazen(peer, [invoke("grpc", None)])
    assert res["msg"] == (
        "tonic transport error: code: 'Internal error', "
        'message: "workflow build failed: workflow validation '
        'failed: workflow must have at least one step"'
    )


async def test_http_node_id_header_reaches_the_step(peer, run_blazen) -> None:
    res_http, res_grpc = await run_blazen(
        peer, [invoke("http", ["whoami"]), invoke("grpc", ["whoami"])], "tab-7f3c"
    )
    assert res_http["result"] == {"caller": "tab-7f3c", "node": NODE_ID}
    assert res_grpc["result"] == {"caller": None, "node": NODE_ID}  # Blazen's gRPC client sends no node id


async def test_under_graceful_goaways_a_call_either_runs_once_or_never_reached_the_peer(run_blazen) -> None:
    """The operator gives gRPC connections a maximum age (pod.drainAdmitSeconds / 2) so a draining pod's
    open channels move elsewhere. Under a GOAWAY every 0.2 s at full speed, on one channel: our client
    (grpcio, which retries a stream the GOAWAY refused) fails no call; the real wheel (tonic, which does
    not) fails only calls its transport reports as never sent, and the peer ran exactly the calls it
    answered - none twice, none of the failed ones."""
    from blazen_peer import BlazenPeerServer, PeerConfig
    from blazen_peer.client import BlazenPeerClient

    from tests.support.blazen_wheel import raced_a_goaway
    from tests.support.peers import http_get, metric
    from tests.unit.test_hitless_drain import Balancer

    from .conftest import Peer, build_registry

    config = PeerConfig(
        node_id=NODE_ID,
        grpc_addr="127.0.0.1:0",
        http_addr="127.0.0.1:0",
        insecure=True,
        admin_addr="127.0.0.1:0",
        grpc_max_connection_age_secs=0.2,
    )
    server = BlazenPeerServer(config=config, registry=build_registry([]))
    await server.start()
    # A counting TCP relay in front: every reconnect after a GOAWAY is a new connection through it.
    relay = Balancer({"peer": (server.grpc_port, server.admin_port)})
    await relay.start()

    class ThroughRelay(Peer):
        @property
        def grpc_url(self) -> str:
            return f"http://127.0.0.1:{relay.port}"

    async def invoked() -> float:
        _, text = await http_get(f"http://127.0.0.1:{server.admin_port}/metrics")
        return sum(
            metric(text, "blazen_peer_calls_total", transport="grpc", method="InvokeSubWorkflow", code=code)
            or 0
            for code in ("OK", "CANCELLED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED")
        )

    try:
        ours_failed = 0
        ours = await BlazenPeerClient.connect(f"http://127.0.0.1:{relay.port}", "ours")

        async def one(first: int) -> None:
            nonlocal ours_failed
            for i in range(first, 4000, 4):
                resp = await ours.invoke_sub_workflow("wf", ["echo"], {"i": i}, timeout_secs=10)
                ours_failed += resp.result_value() != {"i": i}

        try:
            await asyncio.gather(*(one(i) for i in range(4)))
        finally:
            await ours.close()
        ours_connections, ours_runs = relay.connections["peer"], await invoked()
        (wheel,) = await run_blazen(
            ThroughRelay(server, []), [{"op": "burst", "n": 3000, "concurrency": 4, "steps": ["echo"]}]
        )
        wheel_runs = await invoked() - ours_runs
    finally:
        await relay.close()
        await server.stop(grace=0)
    raced = sum(n for msg, n in wheel["errors"].items() if raced_a_goaway(msg))
    print(
        f"ours: 4000 calls, 0 failed, {ours_connections} connections; wheel: {wheel['ok']} ok, {raced} never "
        f"sent (raced a GOAWAY), {relay.connections['peer'] - ours_connections} connections"
    )
    assert ours_failed == 0
    assert ours_runs == 4000
    assert ours_connections >= 5, relay.connections  # a GOAWAY every 0.2 s moved the channel each time
    assert {msg: n for msg, n in wheel["errors"].items() if not raced_a_goaway(msg)} == {}
    assert wheel["wrong"] == 0, wheel
    assert wheel["ok"] + raced == 3000, wheel
    assert wheel_runs == wheel["ok"]  # the failed calls never ran, and no call ran twice
