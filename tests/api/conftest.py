"""API-level fixtures: a real etcd + kube-apiserver + kube-controller-manager for the session,
cert-manager's and our CRDs installed, the operator running in-process under kopf.testing.KopfRunner,
a fresh namespace per test."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from blazen_operator.apply import Api, ApiError, bearer_token, load_client_configuration
from blazen_operator.builders.common import OperatorIdentity
from blazen_operator.operator import Options, serve

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
    controlplane.install_crds(
        api,
        [
            controlplane.cert_manager_crds(),
            ROOT / "crds" / "blazenpeers.yaml",
            ROOT / "crds" / "blazenfleets.yaml",
        ],
    )
    # discovery must serve the new resources before kopf starts scanning
    eventually(lambda: api.request("GET", "/apis/blazen.dev/v1alpha1"), what="blazen.dev discovery")
    eventually(lambda: api.request("GET", "/apis/cert-manager.io/v1"), what="cert-manager discovery")
    return api


@pytest.fixture(scope="package")
def operator_ports() -> dict[str, int]:
    return {"liveness": free_port(), "metrics": free_port()}


CHART = ROOT / "helm" / "blazen-operator"
RELEASE, RELEASE_NS = "bo", "blazen-system"
# The operator's own pods, as the chart passes them (--operator-namespace / --operator-pod-labels).
OPERATOR_IDENTITY = OperatorIdentity(
    namespace=RELEASE_NS,
    pod_labels=(("app.kubernetes.io/instance", RELEASE), ("app.kubernetes.io/name", "blazen-operator")),
)


def chart_rbac() -> list[dict[str, Any]]:
    """The ClusterRoles the Helm chart grants the operator with default values (every namespace)."""
    helm = subprocess.run(
        [str(ROOT / "hack" / "build-helm.sh")], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    out = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", RELEASE_NS],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    roles = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ClusterRole"]
    assert sorted(r["metadata"]["name"] for r in roles) == [
        "bo-blazen-operator",
        "bo-blazen-operator-cluster",
    ]
    return roles


def grant_chart_rbac(api: Api, user: str) -> None:
    """The chart's ClusterRoles, bound to `user` instead of the chart's ServiceAccount."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    for role in chart_rbac():
        name = role["metadata"]["name"]
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
        cluster_role = {**role, "metadata": {"name": name}}
        for path, body in (
            (f"{rbac}/clusterroles/{name}", cluster_role),
            (f"{rbac}/clusterrolebindings/{name}", binding),
        ):
            api.request(
                "PATCH",
                path,
                query={"fieldManager": "blazen-tests", "force": "true"},
                body=body,
                content_type="application/apply-patch+yaml",
            )


class CallLog:
    """Every API call the operator's own client makes (not kopf's watches), as (verb, group, resource)."""

    def __init__(self) -> None:
        self.calls: set[tuple[str, str, str]] = set()

    def record(self, method: str, path: str, query: dict[str, Any] | None) -> None:
        parts = path.strip("/").split("/")
        if parts[0] == "api":  # /api/v1/...
            group, rest = "", parts[2:]
        else:  # /apis/{group}/{version}/...
            group, rest = parts[1], parts[3:]
        if rest[:1] == ["namespaces"] and len(rest) > 2:
            rest = rest[2:]
        resource, named = rest[0], len(rest) > 1
        if len(rest) > 2:
            resource = f"{resource}/{rest[2]}"
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method)
        if verb is None:
            verb = "get" if named else ("watch" if (query or {}).get("watch") else "list")
        self.calls.add((verb, group, resource))


@pytest.fixture(scope="package")
def operator_calls(control_plane: controlplane.ControlPlane, api: Api) -> Iterator[CallLog]:
    log = CallLog()
    original = Api.request

    def request(self: Api, method: str, path: str, **kw: Any) -> dict[str, Any]:
        if bearer_token(self.configuration) == control_plane.operator_token:
            path = path.split("?")[0]
            log.record(method, path, kw.get("query"))
            # A server-side apply of an absent object is authorized as `create`: look with the admin client.
            if kw.get("content_type") == "application/apply-patch+yaml" and not path.endswith("/status"):
                try:
                    original(api, "GET", path)
                except ApiError as exc:
                    if exc.not_found:
                        log.record("POST", path.rsplit("/", 1)[0], None)
        return original(self, method, path, **kw)

    Api.request = request  # type: ignore[method-assign]
    try:
        yield log
    finally:
        Api.request = original  # type: ignore[method-assign]


class NamespaceRequests:
    """The requests the operator's own client (not kopf's watches) sends about one namespace's objects, timed:
    what a pass over unchanged objects must not write."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str, str]] = []  # (monotonic time, method, path)

    def assert_passes_write_nothing(self, pass_path: str, window: float, timeout: float = 60) -> None:
        """Wait for a ``window`` of seconds holding at least 3 passes (a GET of the object at ``pass_path``,
        which each pass reads fresh) and not one write request (no server-side apply of an unchanged object,
        no create of one that exists, no status patch of an unchanged status, no Event)."""

        def quiet_window() -> bool:
            since = time.monotonic() - window
            recent = [(m, p) for t, m, p in self.calls if t >= since]
            passes = [p for m, p in recent if m == "GET" and p.endswith(pass_path)]
            writes = [f"{m} {p}" for m, p in recent if m != "GET"]
            assert len(passes) >= 3, passes
            assert not writes, (f"{len(writes)} writes in {len(passes)} passes", writes[:10])
            return True

        eventually(quiet_window, timeout=timeout, interval=1, what="passes that write nothing")


@pytest.fixture
def namespace_requests(
    control_plane: controlplane.ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> NamespaceRequests:
    log = NamespaceRequests()
    original = Api.request

    def request(self: Api, method: str, path: str, **kw: Any) -> dict[str, Any]:
        if bearer_token(self.configuration) == control_plane.operator_token and f"/{namespace}/" in path:
            log.calls.append((time.monotonic(), method, path.split("?")[0]))
        return original(self, method, path, **kw)

    monkeypatch.setattr(Api, "request", request)
    return log


class ErrorLog(logging.Handler):
    """Every log record with a traceback, from any logger (kopf's and ours)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="package")
def operator(
    api: Api,
    control_plane: controlplane.ControlPlane,
    operator_ports: dict[str, int],
    operator_calls: CallLog,
) -> Iterator[Options]:
    """The operator, in-process in a thread, as `blazen-operator run --all-namespaces` runs it: options in
    kopf's memo, and the Helm chart's RBAC as its only permissions (an unprivileged user bound to the chart's
    ClusterRoles), so every call it makes must be granted by the chart."""
    grant_chart_rbac(api, control_plane.operator_user)
    options = Options(
        namespaces=(),
        liveness_port=operator_ports["liveness"],
        metrics_port=operator_ports["metrics"],
        resync_seconds=3,
        ca_rotation_settle_seconds=2,  # no caller outside the (never running) pods
        kubeconfig=str(control_plane.operator_kubeconfig),
        operator=OPERATOR_IDENTITY,
    )
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    stop = threading.Event()
    crashed: list[BaseException] = []

    def main() -> None:
        try:
            serve(options, stop, liveness_host="127.0.0.1")
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            crashed.append(exc)

    thread = threading.Thread(target=main, name="operator", daemon=True)
    started = time.monotonic()
    thread.start()

    def healthy() -> bool:
        url = f"http://127.0.0.1:{operator_ports['liveness']}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200

    try:
        eventually(lambda: _quiet(healthy), timeout=30, what="operator liveness")
        print(f"operator up in {time.monotonic() - started:.1f}s", file=sys.stderr)
        yield options
    finally:
        stop.set()
        thread.join(timeout=60)
        logging.getLogger().removeHandler(errors)
    # After the session: the operator stopped cleanly and never logged a traceback (a crashed handler, a
    # refused API call the chart does not grant, ...).
    assert not thread.is_alive(), "the operator did not stop"
    assert not crashed, crashed
    assert not errors.records, [errors.format(r) for r in errors.records][:5]


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


@contextlib.contextmanager
def json_http_server(body: dict[str, Any]) -> Iterator[int]:
    """A real HTTP server on loopback answering every GET with ``body`` as JSON: its port."""
    data = json.dumps(body).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
