"""Thin kopf handlers. All decisions live in builders/ and status.py; all API calls in apply.py.

* BlazenPeer create/update/resume -> one reconcile pass, awaited; transient API errors ->
  kopf.TemporaryError (kopf retries with backoff).
* Events on owned children (Deployments, Services, Certificates, ...) and on referenced token Secrets
  -> a coalesced reconcile of the owner: drift is reverted, deleted children come back, status follows
  the Deployment.
* A resync loop (a plain asyncio task, not a kopf timer: timers would add finalizers) re-reconciles every
  BlazenPeer periodically, refreshes the served step ids, and feeds the liveness probe.

No handler here adds a finalizer: there are no on.delete handlers, timers or daemons; children are removed by
the garbage collector through their ownerReferences.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import metrics
from . import spec as s
from .apply import Api, ApiError, bearer_token, load_client_configuration
from .reconcile import Outcome, Reconciler

log = logging.getLogger("blazen_operator")

PREFIX = "blazen.dev"
CHILD_RESOURCES = [
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("", "v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
    ("cert-manager.io", "v1", "certificates"),
    ("cert-manager.io", "v1", "issuers"),
]


@dataclass
class Config:
    """Runtime options; `blazen-operator run` sets them through the environment before kopf starts."""

    resync_seconds: float = field(
        default_factory=lambda: float(os.environ.get("BLAZEN_OPERATOR_RESYNC_SECONDS", "60"))
    )
    # A watch stream that delivers nothing, not even a bookmark (the apiserver sends one every ~60 s), for
    # this long is presumed frozen (a dropped NAT entry, a stalled proxy) and reconnected from its last
    # resourceVersion, so no change is lost.
    watch_inactivity_seconds: float = field(
        default_factory=lambda: float(os.environ.get("BLAZEN_OPERATOR_WATCH_INACTIVITY_SECONDS", "70"))
    )
    metrics_port: int = field(
        default_factory=lambda: int(os.environ.get("BLAZEN_OPERATOR_METRICS_PORT", "0"))
    )
    namespaces: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            n for n in os.environ.get("BLAZEN_OPERATOR_NAMESPACES", "").split(",") if n and n != "*"
        )
    )


class Queue:
    """Coalesces reconcile requests per BlazenPeer: a burst of child events is one pass, passes for one object
    never overlap, transient failures retry with exponential backoff (1 s ... 60 s)."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self._dirty: set[tuple[str, str]] = set()
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def request(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self._dirty.add(key)
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._worker(key), name=f"reconcile:{namespace}/{name}")

    async def run_now(self, namespace: str, name: str) -> Outcome:
        self._dirty.discard((namespace, name))
        return await asyncio.to_thread(self.reconciler.reconcile, namespace, name)

    async def _worker(self, key: tuple[str, str]) -> None:
        backoff = 1.0
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                try:
                    outcome = await asyncio.to_thread(self.reconciler.reconcile, *key)
                except Exception:
                    log.exception("reconcile of %s/%s failed", *key)
                    outcome = Outcome(error=ApiError(0, "Exception", "unexpected"))
                if outcome.error is not None:
                    log.warning("reconcile of %s/%s will retry in %.0fs: %s", *key, backoff, outcome.error)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
                    self._dirty.add(key)
                else:
                    backoff = 1.0
        finally:
            self._tasks.pop(key, None)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


@dataclass
class State:
    config: Config | None = None
    api: Api | None = None
    queue: Queue | None = None
    resync_task: asyncio.Task[None] | None = None
    last_resync_ok: float = 0.0
    started: float = field(default_factory=time.monotonic)


STATE = State()


def _owner_names(body: Any) -> list[str]:
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return [
        r["name"]
        for r in refs
        if r.get("kind") == s.KIND and str(r.get("apiVersion", "")).startswith(s.GROUP)
    ]


def _owned_by_blazenpeer(body: Any, **_: Any) -> bool:
    return bool(_owner_names(body))


# ---------------------------------------------------------------------------------------------- lifecycle


@kopf.on.startup()
async def operator_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # No finalizers: the marker below is never added because nothing here needs one (no deletion handlers,
    # no timers, no daemons). Keep kopf's bookkeeping in our own annotation namespace, not in status (which
    # our schema would prune).
    settings.persistence.finalizer = f"{PREFIX}/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    config = Config()
    settings.watching.server_timeout = 300
    settings.watching.inactivity_timeout = config.watch_inactivity_seconds
    settings.watching.connect_timeout = 10  # a reconnect into a black hole fails fast and is retried
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 8

    STATE.config = config
    STATE.api = Api()
    STATE.queue = Queue(Reconciler(STATE.api))
    STATE.last_resync_ok = 0.0
    STATE.started = time.monotonic()
    if config.metrics_port:
        import prometheus_client

        prometheus_client.start_http_server(config.metrics_port)
    STATE.resync_task = asyncio.create_task(_resync_loop(config), name="blazen-resync")


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """In-cluster ServiceAccount, else $KUBECONFIG (read at login time), through apply.py's loader."""
    cfg = load_client_configuration()
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        token=bearer_token(cfg),
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.cleanup()
async def operator_cleanup(**_: Any) -> None:
    if STATE.resync_task is not None:
        STATE.resync_task.cancel()
        await asyncio.gather(STATE.resync_task, return_exceptions=True)
    if STATE.queue is not None:
        await STATE.queue.close()


async def _resync_loop(config: Config) -> None:
    while True:
        try:
            peers = await asyncio.to_thread(_list_peers, config)
            STATE.last_resync_ok = time.monotonic()
            metrics.PEERS.set(len(peers))
            metrics.LAST_RESYNC.set_to_current_time()
            for ns, name in peers:
                STATE.queue.request(ns, name)
        except Exception:
            log.exception("resync failed")
        await asyncio.sleep(config.resync_seconds)


def _list_peers(config: Config) -> list[tuple[str, str]]:
    scopes: tuple[str | None, ...] = config.namespaces or (None,)
    out = []
    for ns in scopes:
        for item in STATE.api.list(s.API_VERSION, s.KIND, ns):
            out.append((item["metadata"]["namespace"], item["metadata"]["name"]))
    return out


@kopf.on.probe(id="api")
def api_health(**_: Any) -> str:
    """Liveness: the resync loop must have listed BlazenPeers through the API recently. kopf's own watches are
    kept honest by bookmarks and settings.watching.inactivity_timeout."""
    config = STATE.config or Config()
    limit = 3 * config.resync_seconds + 30
    now = time.monotonic()
    last = STATE.last_resync_ok or STATE.started
    if now - last > limit:
        raise kopf.PermanentError(f"no successful API list for {now - last:.0f}s")
    return f"last resync {now - last:.0f}s ago"


# ---------------------------------------------------------------------------------------------- BlazenPeer


@kopf.index(s.GROUP, s.VERSION, s.PLURAL)
def token_secret_refs(namespace: str, name: str, spec: Any, **_: Any) -> dict[tuple[str, str], str] | None:
    ref = ((spec or {}).get("auth") or {}).get("tokenSecretRef") or {}
    return {(namespace, ref["name"]): name} if ref.get("name") else None


@kopf.on.resume(s.GROUP, s.VERSION, s.PLURAL)
@kopf.on.create(s.GROUP, s.VERSION, s.PLURAL)
@kopf.on.update(s.GROUP, s.VERSION, s.PLURAL)
async def blazenpeer_reconcile(namespace: str, name: str, retry: int, **_: Any) -> None:
    # Returns nothing: kopf would store a result under status.<handler id>, which our schema prunes.
    outcome = await STATE.queue.run_now(namespace, name)
    if outcome.error is not None:
        raise kopf.TemporaryError(str(outcome.error), delay=min(60.0, 2.0 ** min(retry, 6)))


# ---------------------------------------------------------------------------------------------- children


async def child_event(body: Any, type: str | None, **_: Any) -> None:
    if STATE.queue is None:
        return
    namespace = body.get("metadata", {}).get("namespace")
    for owner in _owner_names(body):
        STATE.queue.request(namespace, owner)


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, id=f"child-{_plural}", when=_owned_by_blazenpeer)(child_event)


@kopf.on.event("", "v1", "secrets")
async def secret_event(body: Any, namespace: str, name: str, token_secret_refs: kopf.Index, **_: Any) -> None:
    if STATE.queue is None:
        return
    for owner in _owner_names(body):  # our TLS Secret stubs
        STATE.queue.request(namespace, owner)
    for peer_name in token_secret_refs.get((namespace, name), []):  # status: TokenSecretMissing
        STATE.queue.request(namespace, peer_name)
