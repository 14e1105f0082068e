"""Client pods for the e2e tests: a Python script run inside the cluster (the example-steps image, which has
``blazen_peer.client``; the client certificate mounted at /tls), which goes through the Service's real load
balancing and can sustain hundreds of calls per second; and the one load client (tests/e2e/load_client.py)
the load tests share, driven by our client or by the real ``blazen`` wheel."""

from __future__ import annotations

import json
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

from .conftest import CPU_NODE, WHEEL_HOST_DIR, apply, kubectl, kubectl_json, wait_until

IMAGE = "blazen-fleet/example-steps:dev"
# The namespace trust bundle the operator keeps (docs/security.md); the ``files`` load client follows it.
TRUST_CONFIGMAP = "blazen-trust"
LOAD_CLIENT = (Path(__file__).parent / "load_client.py").read_text()


def in_cluster(
    ns: str,
    name: str,
    script: str,
    timeout: float = 240,
    env: dict[str, str] | None = None,
    wheel: bool = False,
    secret: str | None = None,
    trust: str | None = None,
) -> Any:
    """Runs a Python script in a client pod on CPU_NODE (label ``e2e=client``; ``SVC`` is the Service's DNS
    name, ``env`` adds to it) and returns the JSON object its last stdout line holds. ``wheel``: the pod
    mounts the ``blazen`` wheel the ``wheel_on_node`` fixture put on the node and can import it. ``trust``:
    a ConfigMap mounted at /trust (the namespace trust bundle, followed as it changes)."""
    pod = f"client-{uuid.uuid4().hex[:6]}"
    if secret is None:
        secret = (kubectl_json("-n", ns, "get", "blazenpeer", name).get("status") or {})["certificate"][
            "clientSecretName"
        ]
    variables = {"SVC": f"{name}.{ns}.svc", **(env or {})}
    mounts = [{"name": "tls", "mountPath": "/tls", "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "tls", "secret": {"secretName": secret}}]
    if wheel:
        variables |= {"PYTHONPATH": "/wheel", "LD_PRELOAD": "/wheel/libisoc23_shim.so"}
        mounts.append({"name": "wheel", "mountPath": "/wheel", "readOnly": True})
        volumes.append({"name": "wheel", "hostPath": {"path": WHEEL_HOST_DIR, "type": "Directory"}})
    if trust is not None:
        mounts.append({"name": "trust", "mountPath": "/trust", "readOnly": True})
        volumes.append({"name": "trust", "configMap": {"name": trust}})
    apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "labels": {"e2e": "client"}},
            "spec": {
                "restartPolicy": "Never",
                "nodeName": CPU_NODE,
                "containers": [
                    {
                        "name": "c",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", textwrap.dedent(script)],
                        "env": [{"name": k, "value": v} for k, v in variables.items()],
                        "volumeMounts": mounts,
                    }
                ],
                "volumes": volumes,
            },
        },
        ns,
    )
    wait_until(
        f"client pod {pod}",
        lambda: kubectl_json("-n", ns, "get", "pod", pod)["status"].get("phase") in ("Succeeded", "Failed"),
        timeout=timeout,
        interval=2,
    )
    logs = kubectl("-n", ns, "logs", pod)
    phase = kubectl_json("-n", ns, "get", "pod", pod)["status"]["phase"]
    assert phase == "Succeeded", logs[-4000:]
    return json.loads(logs.strip().splitlines()[-1])


def wait_clients_running(ns: str, clients: int = 1) -> None:
    """Waits until ``clients`` client pods (label ``e2e=client``) of ``ns`` are running, so what the test
    does next happens under their calls."""
    wait_until(
        f"{clients} client pod(s) running",
        lambda: (
            sum(
                p["status"].get("phase") == "Running"
                for p in kubectl_json("-n", ns, "get", "pods", "-l", "e2e=client")["items"]
            )
            >= clients
        ),
        timeout=120,
        interval=1,
    )


def in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Runs fn() in a thread; the dict gets "result" or "exc"."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def joined(t: threading.Thread, out: dict[str, Any], timeout: float = 400) -> dict[str, Any]:
    t.join(timeout=timeout)
    if "exc" in out:
        raise out["exc"]
    assert "result" in out, "the load client did not finish"
    return out["result"]


def load_spec(
    ns: str,
    name: str,
    *,
    rate: int,
    seconds: int,
    client: str = "ours",
    channels: int = 1,
    token: str = "",
    wait_for_ready: bool = False,
) -> dict[str, Any]:
    """What load_client.py runs: ``ours`` and ``files`` on the gRPC port (mutual TLS), ``wheel`` on the
    plaintext one."""
    port = 50052 if client == "wheel" else 50051
    return {
        "client": client,
        "target": f"{name}.{ns}.svc:{port}",
        "rate": rate,
        "seconds": seconds,
        "channels": channels,
        "token": token,
        "wait_for_ready": wait_for_ready,
    }


def run_load(ns: str, name: str, spec: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    """Runs load_client.py with ``spec`` (``load_spec``) in a client pod; its result, with ``rate``."""
    result = in_cluster(
        ns,
        name,
        LOAD_CLIENT,
        timeout=spec["seconds"] + 300,
        env={"LOAD_SPEC": json.dumps(spec)},
        wheel=spec["client"] == "wheel",
        secret=secret,
        trust=TRUST_CONFIGMAP if spec["client"] == "files" else None,
    )
    return {**result, "rate": spec["rate"]}


def start_load(
    ns: str, name: str, spec: dict[str, Any], secret: str | None = None
) -> tuple[threading.Thread, dict[str, Any]]:
    """``run_load`` in the background; ``joined()`` returns its result."""
    return in_background(lambda: run_load(ns, name, spec, secret))
