"""End-to-end fixtures: the offline kind cluster (hack/kind-up.sh), the operator (hack/deploy-operator.sh),
and helpers to reach Services from the host test process through `kubectl port-forward`.

Every test here is marked ``e2e``. The session fixture runs hack/kind-up.sh, which brings the cluster up or
reuses a running one in seconds; `make test` builds the kind toolchain first, so this is never a cold build.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
HACK = REPO / "hack"
CACHE = Path(os.environ.get("BLAZEN_FLEET_CACHE", Path.home() / ".cache" / "blazen-fleet"))
CLUSTER = os.environ.get("CLUSTER_NAME", "blazen")
KUBECONFIG = os.environ.get("BLAZEN_E2E_KUBECONFIG", str(CACHE / f"kind-{CLUSTER}.kubeconfig"))
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.34.4")
GPU_NODE = f"{CLUSTER}-worker2"
CPU_NODE = f"{CLUSTER}-worker"
OPERATOR_NS = os.environ.get("OPERATOR_NAMESPACE", "blazen-system")
#: where ``wheel_on_node`` puts the ``blazen`` wheel on CPU_NODE for client pods to mount (hostPath)
WHEEL_HOST_DIR = "/opt/blazen-wheel"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["KUBECONFIG"] = KUBECONFIG
    tools = [str(CACHE / "bin"), str(CACHE / f"k8s-{K8S_VERSION}" / "bin")]
    env["PATH"] = os.pathsep.join([*tools, env.get("PATH", "")])
    return env


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(
        ["kubectl", *args], input=input, capture_output=True, text=True, env=_env(), timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def kubectl_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json"))


def apply(obj: dict[str, Any] | str, namespace: str | None = None) -> None:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    ns = ["-n", namespace] if namespace else []
    kubectl(*ns, "apply", "-f", "-", input=text)


def wait_until(what: str, fn, timeout: float = 180, interval: float = 2) -> Any:
    """Polls fn() until it returns a truthy value; fails with the last value/exception after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def _cluster_reachable() -> bool:
    try:
        kubectl("get", "--raw", "/readyz", timeout=10)
        return True
    except Exception:
        return False


def _run_hack(script: str) -> None:
    log = CACHE / "logs" / f"e2e-{script.removesuffix('.sh')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        rc = subprocess.run([str(HACK / script)], stdout=out, stderr=subprocess.STDOUT, env=_env()).returncode
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"hack/{script} failed ({rc}); see {log}:\n{tail}", pytrace=False)


@pytest.fixture(scope="session")
def cluster() -> str:
    """The kind cluster with cert-manager (hack/kind-up.sh brings it up or reuses it); the kubeconfig."""
    _run_hack("kind-up.sh")
    assert _cluster_reachable(), "hack/kind-up.sh finished but the API server does not answer"
    return KUBECONFIG


@pytest.fixture(scope="session")
def operator(cluster: str) -> str:
    """Our images loaded and the operator installed with its Helm chart (hack/deploy-operator.sh)."""
    _run_hack("deploy-operator.sh")  # rebuilds/reloads only what changed; helm upgrade is idempotent
    wait_until("the operator Deployment", _operator_running, timeout=180)
    return OPERATOR_NS


def _operator_running() -> bool:
    try:
        deps = kubectl_json(
            "-n", OPERATOR_NS, "get", "deploy", "-l", "app.kubernetes.io/name=blazen-operator"
        )
    except Exception:
        return False
    items = deps.get("items", [])
    return bool(items) and all((d.get("status") or {}).get("availableReplicas", 0) >= 1 for d in items)


@pytest.fixture(scope="session")
def wheel_on_node(cluster: str, isoc23_shim: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real ``blazen`` wheel (the test venv's, 0.6.74) and its glibc shim (tests/support/blazen_wheel.py)
    copied onto CPU_NODE, where client pods run, at WHEEL_HOST_DIR: the client image does not carry this test
    dependency (114 MB). ``clients.in_cluster(..., wheel=True)`` mounts it."""
    spec = importlib.util.find_spec("blazen")  # not imported: that needs the shim preloaded
    assert spec is not None
    assert spec.submodule_search_locations, spec
    package = Path(next(iter(spec.submodule_search_locations)))
    stage = tmp_path_factory.mktemp("wheel")
    shutil.copytree(package, stage / "blazen")
    # the wheel's extension finds its bundled libraries through its RPATH, ../blazen.libs
    shutil.copytree(package.parent / "blazen.libs", stage / "blazen.libs")
    shutil.copy(isoc23_shim, stage / "libisoc23_shim.so")
    docker = ["docker", "exec", CPU_NODE]
    subprocess.run([*docker, "rm", "-rf", WHEEL_HOST_DIR], check=True)
    subprocess.run(["docker", "cp", str(stage), f"{CPU_NODE}:{WHEEL_HOST_DIR}"], check=True)
    subprocess.run([*docker, "chmod", "-R", "a+rX", WHEEL_HOST_DIR], check=True)  # the pods run as 65532
    return WHEEL_HOST_DIR


@pytest.fixture
def namespace(cluster: str) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", ns)
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


@contextlib.contextmanager
def port_forward(namespace: str, target: str, remote_port: int) -> Iterator[int]:
    """`kubectl port-forward` to a Service/pod; yields the local port on 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "kubectl",
            "-n",
            namespace,
            "port-forward",
            target,
            f"{port}:{remote_port}",
            "--address",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "Forwarding from" in line:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"port-forward {target} exited: {line}{proc.stdout.read()}")
        yield port
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@dataclass
class TlsFiles:
    cert: Path
    key: Path
    ca: Path
    extra: dict[str, Path] = field(default_factory=dict)


def secret_files(namespace: str, name: str, dest: Path) -> TlsFiles:
    data = kubectl_json("-n", namespace, "get", "secret", name)["data"]
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for key, value in data.items():
        p = dest / re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        p.write_bytes(base64.b64decode(value))
        out[key] = p
    return TlsFiles(cert=out["tls.crt"], key=out["tls.key"], ca=out["ca.crt"], extra=out)
