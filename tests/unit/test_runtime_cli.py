"""Config table (flags and env twins), entrypoint loading, the server lifecycle, and the CLI end to end."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import pytest
from blazen_peer import BlazenPeerServer, PeerConfig, ServerConsumedError, StepRegistry
from blazen_peer.client import BlazenPeerClient, HttpPeerClient, PeerTransportError
from blazen_peer.config import FLAGS, parse_serve_args
from blazen_peer.engine.registry import load_entrypoint
from blazen_peer.event_loop import run_event_loop
from blazen_peer.security.http_auth import resolve_http_auth
from blazen_peer.wire.errors import PeerInsecureConfigError


def test_flags_env_twins_and_precedence() -> None:
    env = {
        "BLAZEN_PEER_NODE_ID": "from-env",
        "BLAZEN_PEER_STEPS": "a, b",
        "BLAZEN_PEER_CORS_ALLOW_ORIGIN": "https://x,https://y",
        "BLAZEN_PEER_INSECURE": "true",
        "BLAZEN_PEER_HTTP_ADDR": "0.0.0.0:8080",
        "BLAZEN_PEER_REF_TTL_SECS": "12.5",
    }
    cfg = parse_serve_args(["--node-id", "from-flag", "--forward-peers", "h1:1,h2:2"], env)
    assert cfg.node_id == "from-flag"
    assert cfg.steps == ("a", "b")
    assert cfg.cors_allow_origin == ("https://x", "https://y")
    assert cfg.insecure is True
    assert cfg.http_addr == "0.0.0.0:8080"
    assert cfg.forward_peers == ("h1:1", "h2:2")
    assert cfg.ref_ttl_secs == 12.5
    cfg = parse_serve_args(["--cors-allow-origin", "https://a", "--cors-allow-origin", "https://b"], {})
    assert cfg.cors_allow_origin == ("https://a", "https://b")
    assert cfg.grpc_addr == "0.0.0.0:50051"
    assert cfg.http_addr is None
    assert cfg.admin_addr == "0.0.0.0:9090"
    assert {f.attr for f in FLAGS} <= PeerConfig.field_names()
    with pytest.raises(ValueError, match="BLAZEN_PEER_INSECURE"):
        parse_serve_args([], {"BLAZEN_PEER_INSECURE": "maybe"})


def test_entrypoint_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ep_mod.py").write_text(
        textwrap.dedent("""
        from blazen_peer import StepRegistry
        REG = StepRegistry()
        REG.register("x", ["blazen::StartEvent"], lambda e, c: None)
        def register(reg):
            reg.register("y", ["blazen::StartEvent"], lambda e, c: None)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_entrypoint("ep_mod:REG").step_ids() == ["x"]
    mine = StepRegistry()
    assert load_entrypoint("ep_mod:register", mine) is mine
    assert mine.step_ids() == ["y"]


async def test_serve_consumes_and_http_is_off_by_default() -> None:
    server = BlazenPeerServer("n", config=PeerConfig(insecure=True, admin_addr=None), registry=StepRegistry())
    ready = asyncio.Event()
    server.hooks.on_ready.append(lambda s: ready.set())
    task = asyncio.ensure_future(server.serve("127.0.0.1:0"))
    await asyncio.wait_for(ready.wait(), 10)
    assert server.http_port is None
    assert server.info() == {
        "node_id": "n",
        "steps": [],
        "envelope_version": 1,
        "ready": True,
        "session_refs": 0,
    }
    with pytest.raises(ServerConsumedError, match="server already consumed by serve"):
        await server.serve("127.0.0.1:0")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.ready is False


async def test_cli_serves_an_entrypoint(tmp_path: Path) -> None:
    (tmp_path / "my_app_steps.py").write_text(
        textwrap.dedent("""
        from blazen_peer import Workflow, step

        @step("my_app::analyze", accepts=["blazen::StartEvent"])
        async def analyze(event, ctx):
            return {"type": "Analyzed", "words": len(event["document"].split())}

        wf = Workflow("analyze-pipeline")
        wf.add_step("my_app::summarize", ["Analyzed"],
                    lambda e, c: {"type": "blazen::StopEvent", "result": {"words": e["words"]}})
        wf.add_step("my_app::analyze", ["blazen::StartEvent"], analyze)
    """)
    )
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "BLAZEN_PEER_INSECURE": "1",
        "BLAZEN_PEER_ADMIN_ADDR": "off",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "blazen_peer.cli",
        "serve",
        "--entrypoint",
        "my_app_steps",
        "--node-id",
        "cli-node",
        "--grpc-addr",
        f"127.0.0.1:{ports[0]}",
        "--http-addr",
        f"127.0.0.1:{ports[1]}",
        "--steps",
        "my_app::analyze,my_app::summarize",
        env=env,
        cwd=str(tmp_path),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        client = None
        for _ in range(100):
            try:
                client = await BlazenPeerClient.connect(
                    f"http://127.0.0.1:{ports[0]}", "t", connect_timeout=0.2
                )
                break
            except PeerTransportError:
                await asyncio.sleep(0.1)
        assert client is not None
        resp = await client.invoke_sub_workflow("analyze-pipeline", [], {"document": "one two three"})
        assert resp.result_value() == {"words": 3}
        http = HttpPeerClient.new_http(f"http://127.0.0.1:{ports[1]}", "t")
        resp = await http.invoke_sub_workflow(
            "x", ["my_app::analyze", "my_app::summarize"], {"document": "a b"}
        )
        assert resp.result_value() == {"words": 2}
        await http.close()
        await client.close()
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode in (0, -15), err.decode()


async def test_forward_dns_siblings_skip_self() -> None:
    from blazen_peer.transport.forwarding import SiblingForwarder

    me = SiblingForwarder(dns_name="localhost", own_ports=[50051], dns_port=50051)
    assert await me.siblings() == []  # localhost's A record is this very pod
    other = SiblingForwarder(dns_name="localhost", own_ports=[50052], dns_port=50051)
    assert await other.siblings() == ["127.0.0.1:50051"]
    static = SiblingForwarder(
        static_peers=["127.0.0.1:7000", "10.0.0.9:7000", "10.0.0.9:7000"], own_ports=[7000]
    )
    assert await static.siblings() == ["10.0.0.9:7000"]
    missing = SiblingForwarder(dns_name="no-such-host.invalid", own_ports=[1])
    assert await missing.siblings() == []


def test_event_loop_flag_and_the_loop_it_runs() -> None:
    assert parse_serve_args([], {}).event_loop == "uvloop"
    assert parse_serve_args(["--event-loop", "asyncio"], {}).event_loop == "asyncio"
    assert parse_serve_args([], {"BLAZEN_PEER_EVENT_LOOP": "AsyncIO"}).event_loop == "asyncio"
    with pytest.raises(ValueError, match=r"BLAZEN_PEER_EVENT_LOOP.*uvloop, asyncio"):
        parse_serve_args([], {"BLAZEN_PEER_EVENT_LOOP": "trio"})

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_event_loop(loop_module(), "uvloop").startswith("uvloop")
    assert run_event_loop(loop_module(), "asyncio").startswith("asyncio")


def test_http_flags_parse_with_their_env_twins() -> None:
    cfg = parse_serve_args([], {})
    assert (cfg.http_auth, cfg.idle_timeout_secs, cfg.max_connections) == ("auto", 15.0, 0)
    cfg = parse_serve_args(
        ["--http-auth", "Client-Cert"],
        {"BLAZEN_PEER_IDLE_TIMEOUT_SECS": "2.5", "BLAZEN_PEER_MAX_CONNECTIONS": "100"},
    )
    assert (cfg.http_auth, cfg.idle_timeout_secs, cfg.max_connections) == ("client-cert", 2.5, 100)
    with pytest.raises(ValueError, match="--http-auth / BLAZEN_PEER_HTTP_AUTH: must be one of"):
        parse_serve_args([], {"BLAZEN_PEER_HTTP_AUTH": "open"})
    with pytest.raises(ValueError, match="--idle-timeout-secs"):
        parse_serve_args(["--idle-timeout-secs", "0"], {})


@pytest.mark.parametrize(
    ("mode", "tls", "ca", "token", "expected"),
    [
        ("auto", True, True, False, ("client-cert", "required", False)),
        ("auto", True, True, True, ("token", "optional", True)),
        ("auto", True, False, True, ("token", "none", True)),
        ("auto", False, False, True, ("token", "none", True)),
        ("auto", False, False, False, ("unauthenticated", "none", False)),
        ("client-cert", True, True, True, ("client-cert", "required", True)),
        ("unauthenticated", True, True, True, ("unauthenticated", "none", False)),
    ],
)
def test_http_auth_resolution(mode: str, tls: bool, ca: bool, token: bool, expected: tuple) -> None:
    auth = resolve_http_auth(mode, tls=tls, ca=ca, token=token)
    assert (auth.mode, auth.client_auth, auth.check_token) == expected


@pytest.mark.parametrize(
    ("mode", "tls", "ca", "token"),
    [("auto", True, False, False), ("client-cert", True, False, True), ("token", True, True, False)],
)
def test_http_auth_refusals_name_the_flag(mode: str, tls: bool, ca: bool, token: bool) -> None:
    with pytest.raises(PeerInsecureConfigError, match="--http-auth"):
        resolve_http_auth(mode, tls=tls, ca=ca, token=token)
