"""The example steps (examples/steps) run through the runtime's engine, and the example manifests are valid
BlazenPeers: they match the generated CRD's schema and the operator renders them."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from blazen_operator.spec import parse_spec
from blazen_peer import BlazenPeerServer, PeerConfig, ServerHooks, default_registry
from blazen_peer.client import PeerTransportError
from blazen_peer.engine.service import PeerService
from blazen_peer.wire.errors import PeerStatusError, Status
from blazen_peer.wire.messages import SubWorkflowRequest

from tests.support.pki import CA, write_pem_files

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
STEPS_SRC = EXAMPLES / "steps"
CRD = ROOT / "crds" / "blazenpeers.yaml"


@pytest.fixture(scope="module")
def examples() -> Any:
    """``blazen_examples.steps``, imported as ``blazen-peer --entrypoint blazen_examples.steps`` would."""
    sys.path.insert(0, str(STEPS_SRC))
    try:
        yield importlib.import_module("blazen_examples.steps")
    finally:
        sys.path.remove(str(STEPS_SRC))


@pytest.fixture
def service(examples: Any) -> PeerService:
    return PeerService("peer-0", default_registry)


async def invoke(service: PeerService, workflow: str, steps: list[str], data: Any) -> Any:
    resp = await service.invoke(SubWorkflowRequest.new(workflow, steps, data, timeout_secs=10))
    assert resp.error is None, resp.error
    return resp


# ---------------------------------------------------------------------------------------------------- steps


def test_importing_registers_every_step_and_workflow(examples: Any) -> None:
    from blazen_examples import STEP_IDS

    assert set(STEP_IDS) <= set(default_registry.step_ids())
    assert default_registry.get("examples::count").accepts == ("examples::Tokens",)
    assert default_registry.get("examples::count").is_async is False
    assert default_registry.get("examples::tokenize").is_async is True
    assert default_registry.workflow_steps("word-count") == ["examples::tokenize", "examples::count"]
    assert default_registry.workflow_steps("gpu-info") == ["examples::gpu_info"]


async def test_echo_returns_the_input_fields(service: PeerService) -> None:
    resp = await invoke(service, "examples", ["examples::echo"], {"a": 1, "b": ["x"]})
    assert resp.result_value() == {"a": 1, "b": ["x"]}


async def test_tokenize_count_chain(service: PeerService) -> None:
    text = "To be, or not to be: that's the question."
    expected = {
        "words": 9,
        "counts": {"be": 2, "not": 1, "or": 1, "question": 1, "that's": 1, "the": 1, "to": 2},
    }
    resp = await invoke(service, "examples", ["examples::tokenize", "examples::count"], {"text": text})
    assert resp.result_value() == expected
    assert resp.state_values() == {"tokens": 9, "distinct": 7}

    # The named workflow runs the same chain when the request sends no step ids.
    resp = await invoke(service, "word-count", [], {"text": text})
    assert resp.result_value() == expected


async def test_the_cpu_gpu_cpu_chain_records_where_steps_ran(service: PeerService, monkeypatch: Any) -> None:
    monkeypatch.setenv("BLAZEN_NODE_NAME", "node-a")
    monkeypatch.setenv("BLAZEN_POOL", "cpu")
    steps = ["examples::extract", "examples::embed", "examples::index"]
    resp = await invoke(service, "examples", steps, {"text": "Embed every word"})
    assert resp.result_value() == {"indexed": 3, "longest": "embed"}
    hops = resp.state_values()["hops"]
    assert [h["step"] for h in hops] == steps
    assert {(h["node"], h["pool"]) for h in hops} == {("node-a", "cpu")}


async def test_where_reports_the_pod_node_and_pool(service: PeerService, monkeypatch: Any) -> None:
    monkeypatch.setenv("BLAZEN_NODE_NAME", "node-b")
    monkeypatch.setenv("BLAZEN_POOL", "gpu")
    monkeypatch.setenv("BLAZEN_PEER_NODE_ID", "pod-7")
    resp = await invoke(service, "where", [], {})
    assert resp.result_value() == {"node": "node-b", "pool": "gpu", "pod": "pod-7"}


async def test_count_alone_cannot_start_a_run(service: PeerService) -> None:
    resp = await service.invoke(SubWorkflowRequest.new("examples", ["examples::count"], {"text": "x"}))
    assert resp.result_json is None
    assert "blazen::StartEvent" in resp.error


async def test_remember_stores_a_session_ref_the_caller_can_deref(service: PeerService) -> None:
    value = {"name": "blazen", "n": [1, 2, 3]}
    resp = await invoke(service, "remember", [], {"value": value})
    (ref_id,) = resp.remote_refs
    descriptor = resp.remote_refs[ref_id]
    assert descriptor.origin_node_id == "peer-0"
    assert descriptor.type_tag == "examples::Remembered"
    result = resp.result_value()
    assert ref_id in json.dumps(result["ref"])
    assert resp.state_values() == {"ref": ref_id}
    assert json.loads(await service.deref(ref_id)) == value
    assert await service.release(ref_id) is True
    with pytest.raises(PeerStatusError) as err:
        await service.deref(ref_id)
    assert err.value.status is Status.NOT_FOUND


async def test_gpu_info_reports_node_pool_and_no_device_here(
    examples: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLAZEN_NODE_NAME", "blazen-worker2")
    monkeypatch.setenv("BLAZEN_POOL", "gpu")
    # The GPU peer serves only this step (examples/gpu-peer.yaml's spec.steps).
    gpu_peer = PeerService("examples-gpu-0", default_registry, served_steps=["examples::gpu_info"])
    assert gpu_peer.served_step_ids() == ["examples::gpu_info"]
    resp = await invoke(gpu_peer, "gpu-info", [], {})
    report = resp.result_value()
    assert report["node"] == "blazen-worker2"
    assert report["pool"] == "gpu"
    assert report["served_by"] == "examples-gpu-0"
    # This machine has no GPU: the step must say so rather than trust the pool label.
    assert report["gpu_devices"] == []
    assert report["gpu_visible"] is False

    with pytest.raises(PeerStatusError) as err:
        await gpu_peer.invoke(SubWorkflowRequest.new("examples", ["examples::echo"], {}))
    assert err.value.status is Status.NOT_FOUND


def test_gpu_report_sees_devices_and_nvidia_smi(examples: Any, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n")
    smi.chmod(0o755)
    env = {"PATH": str(bin_dir), "NVIDIA_VISIBLE_DEVICES": "0,1", "BLAZEN_PEER_NODE_ID": "pod-a"}
    report = examples.gpu_report(env, dev_glob=str(dev / "nvidia*"))
    assert report["gpu_devices"] == [str(dev / "nvidia0"), str(dev / "nvidia1")]
    assert report["nvidia_smi"] == str(smi)
    assert report["gpu_visible"] is True
    assert report["nvidia_visible_devices"] == "0,1"
    assert report["pod"] == "pod-a"
    assert report["node"] is None
    assert report["pool"] is None

    bare = examples.gpu_report({"PATH": str(tmp_path / "nowhere")}, dev_glob=str(tmp_path / "none*"))
    assert (bare["gpu_devices"], bare["nvidia_smi"], bare["gpu_visible"]) == ([], None, False)


# ------------------------------------------------------------------------------------------------ manifests


def load(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    return doc


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in ``value`` that the structural schema does not declare (what the API server would prune)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                return [p for k, v in value.items() for p in unknown_fields(v, extra, f"{path}.{k}")]
            return []
        out = []
        for key, sub in value.items():
            if key not in props:
                out.append(f"{path}.{key}")
            else:
                out.extend(unknown_fields(sub, props[key], f"{path}.{key}"))
        return out
    if isinstance(value, list) and "items" in schema:
        return [p for i, v in enumerate(value) for p in unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("name", ["cpu-peer.yaml", "gpu-peer.yaml"])
def test_manifest_matches_the_crd(name: str) -> None:
    doc = load(name)
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert doc["kind"] == crd["spec"]["names"]["kind"]
    schema = version["schema"]["openAPIV3Schema"]
    assert unknown_fields(doc["spec"], schema["properties"]["spec"], "spec") == []
    assert set(schema["properties"]["spec"].get("required", [])) <= set(doc["spec"])
    parse_spec(doc["spec"])  # the operator's own models: types, patterns, bounds


def render(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "blazen_operator", "render", "-f", str(EXAMPLES / name), "-n", "demo"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout) if d}


def peer_container(objs: dict[tuple[str, str], dict[str, Any]], name: str) -> tuple[dict, dict]:
    deploy = objs[("Deployment", name)]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return deploy, container


def test_cpu_peer_renders_two_replicas_with_the_cors_shim() -> None:
    objs = render("cpu-peer.yaml")
    deploy, container = peer_container(objs, "examples-cpu")
    assert deploy["spec"]["replicas"] == 2
    args = container["args"]
    assert args[args.index("--entrypoint") + 1] == "blazen_examples.steps"
    assert args[args.index("--http-addr") + 1] == "0.0.0.0:8080"
    assert args[args.index("--cors-allow-origin") + 1] == "http://localhost:5173"
    assert args[args.index("--http-auth") + 1] == "client-cert"  # the browser-facing shim is not anonymous
    assert args[args.index("--steps") + 1].split(",") == [
        "examples::echo",
        "examples::tokenize",
        "examples::count",
        "examples::remember",
    ]
    assert "--tls-cert" in args  # mTLS is on by default
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert any(kind == "PodDisruptionBudget" for kind, _ in objs)  # replicas > 1


def test_gpu_peer_renders_onto_the_gpu_pool_with_node_downward_env() -> None:
    objs = render("gpu-peer.yaml")
    deploy, container = peer_container(objs, "examples-gpu")
    pod = deploy["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    args = container["args"]
    assert args[args.index("--steps") + 1] == "examples::gpu_info"
    env = {e["name"]: e for e in container["env"]}
    assert env["BLAZEN_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["BLAZEN_POOL"]["value"] == "gpu"


def test_examples_package_is_installable_metadata() -> None:
    import tomllib

    meta = tomllib.loads((STEPS_SRC / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "blazen-examples"
    assert meta["project"]["dependencies"] == []


# --------------------------------------------------------------------------------------------------- client


def load_client_module() -> Any:
    spec = importlib.util.spec_from_file_location("examples_client", EXAMPLES / "client.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def mtls_peer(examples: Any, tmp_path: Path) -> Any:
    """A real BlazenPeerServer serving the example steps on gRPC with mutual TLS, plus client PEM files."""
    ca = CA()
    server_crt, server_key, ca_crt = write_pem_files(tmp_path / "server", ca.issue("examples-cpu-0"), ca)
    client_crt, client_key, _ = write_pem_files(
        tmp_path / "client", ca.issue("examples-client", server=False), ca
    )
    config = PeerConfig(
        node_id="examples-cpu-0",
        grpc_addr="127.0.0.1:0",
        admin_addr=None,
        tls_cert=str(server_crt),
        tls_key=str(server_key),
        tls_ca=str(ca_crt),
    )
    hooks = ServerHooks(
        grpc_server_credentials=lambda: grpc.ssl_server_credentials(
            [(server_key.read_bytes(), server_crt.read_bytes())],
            root_certificates=ca_crt.read_bytes(),
            require_client_auth=True,
        )
    )
    server = BlazenPeerServer(config=config, hooks=hooks)
    await server.start()
    try:
        yield {
            "endpoint": f"https://127.0.0.1:{server.grpc_port}",
            "files": ["--cert", str(client_crt), "--key", str(client_key), "--ca", str(ca_crt)],
            "ca": ca,
            "tmp": tmp_path,
        }
    finally:
        await server.stop(0)


async def run_client_script(mtls_peer: dict[str, Any], *args: str) -> bytes:
    """examples/client.py as a user runs it against the peer; its stdout (exit status 0 asserted)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "client.py"),
        mtls_peer["endpoint"],
        *mtls_peer["files"],
        *("--server-name", "localhost", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    return stdout


async def test_client_runs_the_chain_over_mtls(mtls_peer: dict[str, Any]) -> None:
    stdout = await run_client_script(
        mtls_peer, "--workflow", "word-count", "--input", json.dumps({"text": "a rose is a rose"})
    )
    assert json.loads(stdout) == {
        "result": {"words": 5, "counts": {"a": 2, "is": 1, "rose": 2}},
        "state": {"tokens": 5, "distinct": 3},
        "refs": {},
        "error": None,
    }


async def test_client_derefs_a_remembered_value(mtls_peer: dict[str, Any]) -> None:
    client = load_client_module()
    args = client.parse_args(
        [
            mtls_peer["endpoint"].removeprefix("https://"),  # host:port means https
            *mtls_peer["files"],
            *("--workflow", "remember", "--input", '{"value": {"k": [1, 2]}}', "--deref"),
        ]
    )
    (out,) = await client.run(args)
    assert out["error"] is None
    (ref,) = out["refs"]
    assert out["refs"][ref] == {
        "origin": "examples-cpu-0",
        "type_tag": "examples::Remembered",
        "payload": {"k": [1, 2]},
    }
    assert out["state"] == {"ref": ref}


async def test_client_reports_a_failed_workflow(mtls_peer: dict[str, Any]) -> None:
    client = load_client_module()
    args = client.parse_args(
        [mtls_peer["endpoint"], *mtls_peer["files"], "--step", "examples::count", "--input", '{"text": "x"}']
    )
    (out,) = await client.run(args)
    assert out["result"] is None
    assert "workflow error" in out["error"]


async def test_client_repeats_calls_on_one_connection(mtls_peer: dict[str, Any]) -> None:
    stdout = await run_client_script(mtls_peer, "--workflow", "where", "--repeat", "3")
    lines = stdout.decode().splitlines()
    assert len(lines) == 3
    assert len({json.loads(line)["result"]["pod"] for line in lines}) == 1  # one peer served them all


async def test_client_refuses_a_peer_signed_by_another_ca(mtls_peer: dict[str, Any]) -> None:
    client = load_client_module()
    # a caller of another CA, consistent in itself (its files validate), meets a peer it does not trust
    other = CA(name="someone-else")
    leaf = other.issue("other-client", server=False)
    crt, key, ca = write_pem_files(mtls_peer["tmp"] / "other", leaf, other)
    files = ["--cert", str(crt), "--key", str(key), "--ca", str(ca)]
    args = client.parse_args(
        [mtls_peer["endpoint"], *files, "--server-name", "localhost", "--connect-timeout", "2"]
    )
    with pytest.raises(PeerTransportError):
        await client.run(args)


def test_client_arguments() -> None:
    client = load_client_module()
    base = ["--cert", "c", "--key", "k", "--ca", "a"]
    args = client.parse_args(["peer.example:50051", *base])
    assert args.endpoint == "https://peer.example:50051"
    assert (args.workflow, args.steps, args.input) == ("echo", [], {})
    with pytest.raises(SystemExit):
        client.parse_args(["http://peer:50051", *base])  # plaintext cannot carry a client certificate
    with pytest.raises(SystemExit):
        client.parse_args(["peer:50051", *base, "--input", "{not json"])
