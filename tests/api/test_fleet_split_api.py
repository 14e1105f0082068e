"""A BlazenFleet's split runs against a real kube-apiserver, the operator under the Helm chart's RBAC
(tests/api/conftest.py): a token-only fleet's router token (generated once, mounted in the router and the
pools, pruned when mutual TLS takes over) and the router's split counts in the status, read from a real HTTP
server answering /v1/info as the router pod would."""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from typing import Any

import pytest
from blazen_operator.apply import Api

from tests.api.conftest import json_http_server
from tests.api.test_fleet_api import SPEC, create_fleet, fleet, fleet_manifest
from tests.api.test_operator_api import _mark_pods_ready, get, merge_patch
from tests.support.controlplane import eventually

pytestmark = pytest.mark.api

TOKEN_SECRET = "demo-router-token"


def _container(api: Api, namespace: str, deployment: str) -> tuple[list[str], dict[str, Any]]:
    dep = eventually(lambda: get(api, "Deployment", namespace, deployment), what=deployment)
    pod = dep["spec"]["template"]["spec"]
    return pod["containers"][0]["args"], {v["name"]: v for v in pod["volumes"]}


def test_a_token_only_fleet_gets_a_router_token_of_its_own(api, operator, namespace):
    api.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        body={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "fleet-token", "namespace": namespace},
            "stringData": {"token": "shared-by-every-caller"},
        },
    )
    spec = copy.deepcopy(SPEC)
    spec["tls"] = {"enabled": False}
    spec["auth"] = {"tokenSecretRef": {"name": "fleet-token", "key": "token"}}
    uid = create_fleet(api, fleet_manifest("demo", namespace, spec))["metadata"]["uid"]

    secret = eventually(lambda: api.get("v1", "Secret", namespace, TOKEN_SECRET), what="router token")
    assert [r["uid"] for r in secret["metadata"]["ownerReferences"]] == [uid]
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 32
    assert token != "shared-by-every-caller"
    for deployment in ("demo-router", "demo-cpu", "demo-gpu"):
        args, volumes = _container(api, namespace, deployment)
        assert "--fleet-router-token-file" in args, deployment
        assert "--fleet-router-identity" not in args
        assert volumes["fleet-router-token"]["secret"]["secretName"] == TOKEN_SECRET

    # later passes (a spec change) keep it: generated once, never rewritten
    merge_patch(api, "BlazenFleet", namespace, "demo", {"spec": {"router": {"replicas": 2}}})
    eventually(
        lambda: get(api, "Deployment", namespace, "demo-router")["spec"]["replicas"] == 2,
        what="router scaled",
    )
    again = api.get("v1", "Secret", namespace, TOKEN_SECRET)
    assert again["data"] == secret["data"]

    # mutual TLS names the router by its certificate: the token goes
    merge_patch(api, "BlazenFleet", namespace, "demo", {"spec": {"tls": {"enabled": True}}})
    eventually(lambda: api.get("v1", "Secret", namespace, TOKEN_SECRET) is None, what="router token pruned")
    eventually(
        lambda: "--fleet-router-identity" in _container(api, namespace, "demo-cpu")[0], what="pool identity"
    )


@pytest.fixture
def router_info() -> Iterator[int]:
    """/v1/info as a router pod that ran split runs would answer it; its port."""
    split = {"runs": {"ok": 4, "error": 1}, "steps": {"cpu": 8, "gpu": 5}}
    with json_http_server({"steps": [], "router": {"pools": {}, "split": split}}) as port:
        yield port


def test_status_shows_the_routers_split_runs(api, operator, namespace, router_info):
    spec = copy.deepcopy(SPEC)
    spec["router"] = {"replicas": 1, "ports": {"admin": router_info}}
    create_fleet(api, fleet_manifest("demo", namespace, spec))
    eventually(lambda: len(api.collect("v1", "Pod", namespace).items) == 4, what="four pods")
    assert "splitRuns" not in (fleet(api, namespace).get("status") or {}).get("router", {})
    _mark_pods_ready(
        api,
        namespace,
        ips={p["metadata"]["name"]: "127.0.0.1" for p in api.collect("v1", "Pod", namespace).items},
    )

    def router() -> dict[str, Any]:
        out = (fleet(api, namespace).get("status") or {}).get("router") or {}
        assert "splitRuns" in out, out
        return out

    out = eventually(router, timeout=60, what="split counts in the status")
    assert out["splitRuns"] == {"error": 1, "ok": 4}
    assert out["splitSteps"] == {"cpu": 8, "gpu": 5}
