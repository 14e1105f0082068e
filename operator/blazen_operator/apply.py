"""The one module that talks to the Kubernetes API (and to the peers' admin port).

Every child is written with one server-side apply call (fixed field manager, ``force``), which creates
it, updates it and reverts drift alike. All calls are blocking; callers run them in worker threads.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import spec as s

FIELD_MANAGER = "blazen-operator"
STUB_MANAGER = "blazen-operator-stub"
log = logging.getLogger(__name__)

# (apiVersion, kind) -> plural. Only the kinds the operator manages or reads.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "ReplicaSet"): "replicasets",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("cert-manager.io/v1", "Certificate"): "certificates",
    ("cert-manager.io/v1", "Issuer"): "issuers",
    (s.API_VERSION, s.KIND): s.PLURAL,
}

# Kinds whose per-peer objects are pruned when no longer desired (PDB on scale-down, NetworkPolicy off, ...).
PRUNABLE: tuple[tuple[str, str], ...] = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("cert-manager.io/v1", "Certificate"),
    ("v1", "Secret"),
)


class ApiError(Exception):
    """A failed API call. ``transient`` errors are retried; the rest are reported in the status."""

    def __init__(self, status: int, reason: str, message: str, what: str = "") -> None:
        super().__init__(f"{what}: {status} {reason}: {message}" if what else f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500

    @property
    def namespace_terminating(self) -> bool:
        """The namespace is being deleted or is gone: nothing to reconcile, nothing to report."""
        return (self.status == 403 and "being terminated" in self.message) or (
            self.status == 404 and self.message.startswith('namespaces "')
        )

    @property
    def not_found(self) -> bool:
        return self.status == 404


def path_for(
    api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str = ""
) -> str:
    plural = PLURALS[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def load_client_configuration() -> client.Configuration:
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        # KUBECONFIG is read now, not when the kubernetes package was imported
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    return cfg


def bearer_token(cfg: client.Configuration) -> str | None:
    # The in-cluster loader stores "bearer <token>" (lower case), kubeconfig loaders "Bearer <token>";
    # kopf adds its own scheme, so the token goes out bare.
    for key in ("authorization", "BearerToken"):
        value = (cfg.api_key or {}).get(key)
        if value:
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token else value.strip()
    return None


class Api:
    """Thin, thread-safe wrapper over the Kubernetes REST API for the calls the operator makes."""

    def __init__(self, configuration: client.Configuration | None = None, timeout: float = 15.0) -> None:
        self.configuration = configuration or load_client_configuration()
        self.configuration.connection_pool_maxsize = max(self.configuration.connection_pool_maxsize or 0, 16)
        self._client = client.ApiClient(self.configuration)
        self._timeout = timeout
        self._lock = threading.Lock()

    # ------------------------------------------------------------ raw
    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        what: str = "",
    ) -> dict[str, Any]:
        url_path = path + (("?" + urlencode(query)) if query else "")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            method_, url, headers, body_, _post = self._client.param_serialize(
                method=method,
                resource_path=url_path,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self._client.call_api(
                method_, url, header_params=headers, body=body_, _request_timeout=self._timeout
            )
            raw = resp.read()
        except ApiException as exc:
            raise _api_error(exc.status or 0, exc.reason or "", exc.body, what) from exc
        except Exception as exc:  # connection refused, timeouts, TLS
            raise ApiError(0, type(exc).__name__, str(exc), what) from exc
        if resp.status >= 400:
            raise _api_error(resp.status, resp.reason or "", raw, what)
        return json.loads(raw) if raw else {}

    # ------------------------------------------------------------ objects
    def apply(self, manifest: dict[str, Any], manager: str = FIELD_MANAGER, sub: str = "") -> dict[str, Any]:
        """Server-side apply with force: create, update and revert drift in one idempotent call."""
        meta = manifest["metadata"]
        path = path_for(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"], sub)
        return self.request(
            "PATCH",
            path,
            query={"fieldManager": manager, "force": "true"},
            body=manifest,
            content_type="application/apply-patch+yaml",
            what=f"apply {manifest['kind']} {meta.get('namespace')}/{meta['name']}",
        )

    def replace(self, manifest: dict[str, Any], manager: str = FIELD_MANAGER) -> dict[str, Any] | None:
        """PUT the manifest over the live object (immutable Service addresses kept).

        The fallback when a server-side apply is refused because another manager added list items (e.g. a
        Service port keyed by a different port number): an update replaces whole lists, which apply never
        does for items it does not own."""
        meta = manifest["metadata"]
        live = self.get(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        if live is None:
            return None
        body = copy.deepcopy(manifest)
        body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        if manifest["kind"] == "Service":
            for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                if key in live.get("spec", {}) and key not in body["spec"]:
                    body["spec"][key] = live["spec"][key]
        path = path_for(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        return self.request(
            "PUT",
            path,
            query={"fieldManager": manager},
            body=body,
            what=f"replace {manifest['kind']} {meta['name']}",
        )

    def create_if_absent(self, manifest: dict[str, Any], manager: str = STUB_MANAGER) -> bool:
        meta = manifest["metadata"]
        path = path_for(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        try:
            self.request(
                "POST",
                path,
                query={"fieldManager": manager},
                body=manifest,
                what=f"create {manifest['kind']}",
            )
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False
            raise

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request(
                "GET", path_for(api_version, kind, namespace, name), what=f"get {kind} {name}"
            )
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        return self.request(
            "GET", path_for(api_version, kind, namespace), query=query, what=f"list {kind}"
        ).get("items", [])

    def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request(
                "DELETE", path_for(api_version, kind, namespace, name), body=body, what=f"delete {kind}"
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def apply_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        body = {
            "apiVersion": s.API_VERSION,
            "kind": s.KIND,
            "metadata": {"name": name, "namespace": namespace},
        }
        body["status"] = status
        try:
            return self.apply(body, sub="status")
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", s.API_VERSION),
                "kind": obj.get("kind", s.KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason[:128],
            "message": message[:1024],
            "type": type_,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", path_for("v1", "Event", meta["namespace"]), body=event, what="post event")
        except ApiError as exc:  # events are best effort
            log.warning("could not post event %s: %s", reason, exc)


def _api_error(status: int, reason: str, raw: Any, what: str) -> ApiError:
    message = ""
    try:
        payload = json.loads(raw)
        message = payload.get("message", "")
    except Exception:
        message = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    return ApiError(status, reason, message, what)


# ---------------------------------------------------------------------------------------------------- peers


def read_peer_info(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET a peer's /v1/info; None when it does not answer properly (the status then says 'unknown')."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # plain HTTP admin port, by contract
            if resp.status != 200:
                return None
            data = json.loads(resp.read(1 << 20))
            return data if isinstance(data, dict) else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


_info_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer-info")


def read_peer_infos(urls: Iterable[str]) -> list[dict[str, Any] | None]:
    return list(_info_pool.map(read_peer_info, urls))
