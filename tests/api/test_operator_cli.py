"""`blazen-operator run` as a real process: namespace scoping, liveness, metrics, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from blazen_operator.apply import path_for

from tests.support.controlplane import eventually
from tests.support.ports import free_port

pytestmark = pytest.mark.api


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def test_run_cli_scoped_to_a_namespace(api, control_plane, namespace, tmp_path):
    live, prom = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    log = open(tmp_path / "operator.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blazen_operator",
            "run",
            "--namespace",
            namespace,
            "--liveness-port",
            str(live),
            "--metrics-port",
            str(prom),
            "--resync-seconds",
            "2",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        eventually(lambda: _get(f"http://127.0.0.1:{live}/healthz")[0] == 200, timeout=30, what="healthz")
        body = {
            "apiVersion": "blazen.dev/v1alpha1",
            "kind": "BlazenPeer",
            "metadata": {"name": "cli", "namespace": namespace},
            "spec": {"image": "i:1", "entrypoint": "m"},
        }
        api.request("POST", path_for("blazen.dev/v1alpha1", "BlazenPeer", namespace), body=body)
        eventually(lambda: api.get("apps/v1", "Deployment", namespace, "cli"), what="deployment")

        def reconciled() -> bool:
            status, text = _get(f"http://127.0.0.1:{prom}/metrics")
            assert status == 200
            text_lines = text.splitlines()
            ok = [x for x in text_lines if x.startswith('blazen_operator_reconciles_total{result="ok"}')]
            assert ok, text[-3000:]
            assert float(ok[0].split()[-1]) >= 1
            peers = [x for x in text_lines if x.startswith("blazen_operator_blazenpeers ")]
            assert peers, text[-3000:]
            assert float(peers[0].split()[-1]) == 1, "only its own namespace is listed"
            return True

        eventually(reconciled, timeout=20, what="metrics show a reconcile")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    output = (tmp_path / "operator.log").read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_run_cli_requires_a_scope():
    proc = subprocess.run(
        [sys.executable, "-m", "blazen_operator", "run"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "--all-namespaces" in proc.stderr
