"""API-level fixtures: a real etcd + kube-apiserver + kube-controller-manager for the session,
cert-manager's and our CRDs installed, the operator running in-process under kopf.testing.KopfRunner,
a fresh namespace per test."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blazen_operator.apply import Api, ApiError, load_client_configuration

from tests.support import controlplane
from tests.support.controlplane import eventually
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    workdir = tmp_path_factory.mktemp("controlplane")
    with controlplane.ControlPlane.start(workdir) as cp:
        print(f"\ncontrol plane up: {cp.startup_seconds}", file=sys.stderr)
        old = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        try:
            yield cp
        finally:
            if old is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = old


@pytest.fixture(scope="package")
def api(control_plane: controlplane.ControlPlane) -> Api:
    api = Api(load_client_configuration())
    controlplane.install_crds(api, [controlplane.cert_manager_crds(), ROOT / "crds" / "blazenpeers.yaml"])
    # discovery must serve the new resources before kopf starts scanning
    eventually(lambda: api.request("GET", "/apis/blazen.dev/v1alpha1"), what="blazen.dev discovery")
    eventually(lambda: api.request("GET", "/apis/cert-manager.io/v1"), what="cert-manager discovery")
    return api


@pytest.fixture(scope="package")
def operator_ports() -> dict[str, int]:
    return {"liveness": free_port(), "metrics": free_port()}


@pytest.fixture(scope="package")
def operator(api: Api, operator_ports: dict[str, int]) -> Iterator[Any]:
    from kopf.testing import KopfRunner

    os.environ["BLAZEN_OPERATOR_RESYNC_SECONDS"] = "3"
    os.environ["BLAZEN_OPERATOR_METRICS_PORT"] = str(operator_ports["metrics"])
    os.environ["BLAZEN_OPERATOR_NAMESPACES"] = ""
    args = [
        "run",
        "--standalone",
        "--all-namespaces",
        "--liveness",
        f"http://127.0.0.1:{operator_ports['liveness']}/healthz",
        "-m",
        "blazen_operator.handlers",
    ]
    started = time.monotonic()
    with KopfRunner(args, timeout=60) as runner:

        def healthy() -> bool:
            url = f"http://127.0.0.1:{operator_ports['liveness']}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200

        eventually(lambda: _quiet(healthy), timeout=30, what="operator liveness")
        print(f"operator up in {time.monotonic() - started:.1f}s", file=sys.stderr)
        yield runner
    # After the session: the operator stopped cleanly and never crashed a handler.
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None
    assert "Traceback" not in runner.output, runner.output[-5000:]


def _quiet(fn: Callable[[], bool]) -> bool:
    try:
        return fn()
    except OSError:
        return False


@pytest.fixture
def namespace(api: Api) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    api.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    yield name
    with contextlib.suppress(ApiError):
        api.request("DELETE", f"/api/v1/namespaces/{name}")
