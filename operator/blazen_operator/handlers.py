"""Thin kopf handlers. All decisions live in builders/ and status.py; all API calls in apply.py.

Every trigger is a request to one :class:`~.workqueue.WorkQueue`, which owns the one retry policy:

* BlazenPeer create/update/resume (a first pass);
* changes of owned children (Deployments, Services, Certificates, ...), seen by the operator's own watches
  (watches.py, not kopf's: only objects labelled ``app.kubernetes.io/managed-by=blazen-operator``, asked of
  the API server): they keep the child cache (cache.py) the reconciler reads instead of the API; drift is
  reverted, deleted children come back, status follows the Deployment. Their passes are follow-ups, which go
  before first passes (workqueue.py);
* a resync loop (a plain asyncio task, not a kopf timer: timers would add finalizers) that re-requests every
  BlazenPeer periodically, refreshes the served step ids and the referenced token Secrets (which are read by
  name, never watched), and feeds the liveness probe;
* a trust loop that runs the namespace trust passes that are due (``trust.Trust``: every few seconds while a
  namespace CA rotation runs, every 30 s otherwise, so a ``blazen.dev/rotate-ca`` request is seen);
* a trim loop that hands the heap the passes freed back to the OS (memory.py).

Options and shared state live in kopf's ``memo`` (``memo.options`` is set by ``operator.run``). No handler
here adds a finalizer: there are no on.delete handlers, timers or daemons; children are removed by the garbage
collector through their ownerReferences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import kopf

# kopf's own matcher, so that --namespace patterns mean in the resync loop exactly what they mean to kopf
from kopf._cogs.structs.references import NamespaceName, match_namespace, select_specific_namespaces

from . import fleet_spec as fs
from . import kinds, memory, metrics
from . import spec as s
from .apply import Api, ApiError, bearer_token, load_client_configuration
from .builders.common import OperatorIdentity
from .cache import ChildCache
from .fleet_reconcile import FleetReconciler
from .reconcile import Reconciler
from .trust import Trust
from .watches import ChildWatches
from .workqueue import Key, WorkQueue

log = logging.getLogger("blazen_operator")

PREFIX = "blazen.dev"


@dataclass(frozen=True)
class Options:
    """What `blazen-operator run` was told; kopf hands it to every handler as ``memo.options``."""

    namespaces: tuple[str, ...] = ()  # kopf namespace patterns (globs, !negations); () = every namespace
    liveness_port: int = 8081
    metrics_port: int = 8000
    resync_seconds: float = 60.0
    # A watch stream that delivers nothing, not even a bookmark (the apiserver sends one every ~60 s), for
    # this long is presumed frozen (a dropped NAT entry, a stalled proxy) and reconnected from its last
    # resourceVersion, so no change is lost (kopf's watches and the child watches alike). A child watch
    # silent for twice this long fails the liveness probe.
    watch_inactivity_seconds: float = 70.0
    # Trusting and Reissuing of a namespace CA rotation last at least this long (callers outside the pods).
    ca_rotation_settle_seconds: float = 120.0
    verbose: bool = False
    kubeconfig: str | None = None  # None: in-cluster, else $KUBECONFIG
    operator: OperatorIdentity | None = None  # admitted to the peers' admin port by their NetworkPolicy
    concurrency: int = 8  # reconcile passes at once


@dataclass
class Health:
    started: float = field(default_factory=time.monotonic)
    last_resync_ok: float = 0.0


@dataclass
class Runtime:
    """The operator's shared state, one per process, in ``memo.runtime``."""

    options: Options
    api: Api
    queue: WorkQueue
    cache: ChildCache
    health: Health = field(default_factory=Health)
    resync_task: asyncio.Task[None] | None = None
    trust_task: asyncio.Task[None] | None = None
    trim_task: asyncio.Task[None] | None = None
    fleets: WorkQueue | None = None  # BlazenFleet passes: a queue of their own, keys (namespace, name)
    watches: ChildWatches | None = None


def _options(memo: kopf.Memo) -> Options:
    options = getattr(memo, "options", None)
    return options if isinstance(options, Options) else Options()


def _runtime(memo: kopf.Memo) -> Runtime | None:
    runtime = getattr(memo, "runtime", None)
    return runtime if isinstance(runtime, Runtime) else None


def _owner_names(body: Any, kind: str = s.KIND) -> list[str]:
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return [
        r["name"]
        for r in refs
        if r.get("kind") == kind and str(r.get("apiVersion", "")).startswith(f"{s.GROUP}/")
    ]


# ---------------------------------------------------------------------------------------------- lifecycle


def configure(settings: kopf.OperatorSettings, options: Options) -> None:
    # No finalizers: the marker below is never added because nothing here needs one (no deletion handlers,
    # no timers, no daemons). Keep kopf's bookkeeping in our own annotation namespace, not in status (which
    # our schema would prune).
    settings.persistence.finalizer = f"{PREFIX}/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.inactivity_timeout = options.watch_inactivity_seconds
    settings.watching.connect_timeout = 10  # a reconnect into a black hole fails fast and is retried
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 8


def use_pass_threads(loop: asyncio.AbstractEventLoop, options: Options) -> None:
    """Passes run in worker threads (``asyncio.to_thread``): enough of them for both queues' passes at once,
    the trust pass and a list, so ``--concurrency`` holds (the default pool has min(32, CPUs + 4) threads:
    6 on 2 cores, fewer than 8 passes)."""
    workers = 2 * options.concurrency + 2
    loop.set_default_executor(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blazen-pass"))


@kopf.on.startup()
async def operator_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    options = _options(memo)
    configure(settings, options)
    use_pass_threads(asyncio.get_running_loop(), options)
    api = Api(load_client_configuration(options.kubeconfig))
    # the children's kinds and BlazenPeers, of which pool_event keeps the fleets' pools
    cache = ChildCache([*((k.api_version, k.kind) for k in kinds.WATCHED_CHILDREN), (s.API_VERSION, s.KIND)])
    loop = asyncio.get_running_loop()

    def trust_changed(namespace: str, names: list[str]) -> None:
        # a pass whose outcome the BlazenPeers show changed: each gets a follow-up pass (trust passes run in
        # worker threads; the queue lives on the event loop)
        for name in names:
            loop.call_soon_threadsafe(partial(runtime.queue.request, (namespace, name), follow_up=True))

    trust = Trust(api, cache=cache, settle=options.ca_rotation_settle_seconds, on_change=trust_changed)
    # what no watch reports (pods, their /v1/info, the Secret stubs) is re-read at most once per resync
    # period, unless a watched object says it changed
    reconciler = Reconciler(api, options.operator, trust, cache, recheck_seconds=options.resync_seconds)

    async def work(key: Key) -> bool:
        outcome = await asyncio.to_thread(reconciler.reconcile, *key)
        return outcome.error is None

    fleets = FleetReconciler(api, options.operator, cache, recheck_seconds=options.resync_seconds)

    async def fleet_work(key: Key) -> bool:
        outcome = await asyncio.to_thread(fleets.reconcile, *key)
        return outcome.error is None

    runtime = Runtime(
        options=options,
        api=api,
        queue=WorkQueue(work, concurrency=options.concurrency),
        cache=cache,
        fleets=WorkQueue(fleet_work, concurrency=options.concurrency),
    )
    memo.runtime = runtime

    def child_changed(obj: dict[str, Any]) -> None:
        # called in a watch thread: only the owners' keys go to the event loop, not the object
        namespace = (obj.get("metadata") or {}).get("namespace")
        if namespace:  # every child we label is namespaced
            owners = (_owner_names(obj), _owner_names(obj, fs.KIND))
            loop.call_soon_threadsafe(_request_owners, runtime, namespace, *owners)

    # a pool of its own: the watches' long-lived streams never hold the passes' connections
    watch_api = Api(load_client_configuration(options.kubeconfig))
    runtime.watches = ChildWatches(
        watch_api, kinds.WATCHED_CHILDREN, cache, child_changed, options.watch_inactivity_seconds
    )
    runtime.watches.start()
    if options.metrics_port:
        import prometheus_client

        prometheus_client.start_http_server(options.metrics_port)
    runtime.resync_task = asyncio.create_task(_resync_loop(runtime), name="blazen-resync")
    runtime.trust_task = asyncio.create_task(_trust_loop(trust), name="blazen-trust")
    queues = (runtime.queue, runtime.fleets)
    trimmer = memory.Trimmer(lambda: sum(q.completed for q in queues if q is not None))
    runtime.trim_task = asyncio.create_task(memory.run(trimmer), name="blazen-trim")


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """The operator's kubeconfig, else the in-cluster ServiceAccount, else $KUBECONFIG (apply.py's loader)."""
    cfg = load_client_configuration(_options(memo).kubeconfig)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        token=bearer_token(cfg),
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.cleanup()
async def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    if runtime is None:
        return
    for task in (runtime.resync_task, runtime.trust_task, runtime.trim_task):
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if runtime.watches is not None:
        runtime.watches.stop()
    await runtime.queue.close()
    if runtime.fleets is not None:
        await runtime.fleets.close()


async def _resync_loop(runtime: Runtime) -> None:
    while True:
        try:
            peers = await asyncio.to_thread(list_peers, runtime.api, runtime.options.namespaces)
            fleets = await asyncio.to_thread(list_peers, runtime.api, runtime.options.namespaces, fs.KIND)
            runtime.health.last_resync_ok = time.monotonic()
            metrics.PEERS.set(len(peers))
            metrics.LAST_RESYNC.set_to_current_time()
            for key in peers:
                runtime.queue.request(key)
            if runtime.fleets is not None:
                for key in fleets:
                    runtime.fleets.request(key)
        except Exception:
            log.exception("resync failed")
        await asyncio.sleep(runtime.options.resync_seconds)


async def _trust_loop(trust: Trust, tick: float = 2.0) -> None:
    while True:
        for namespace in trust.due():
            try:
                await asyncio.to_thread(trust.sync, namespace)
            except ApiError as exc:
                if exc.transient or exc.namespace_terminating:
                    log.info("trust pass of namespace %s: %s; retried", namespace, exc)
                else:
                    log.exception("trust pass of namespace %s failed", namespace)
            except Exception:
                log.exception("trust pass of namespace %s failed", namespace)
        await asyncio.sleep(tick)


def list_peers(api: Api, patterns: tuple[str, ...], kind: str = s.KIND) -> list[Key]:
    """Every BlazenPeer (or BlazenFleet) in the namespaces the patterns select, as kopf selects them: plain
    names are listed directly; globs and negations are matched against the cluster's namespaces."""
    if not patterns:
        scopes: list[str | None] = [None]
    else:
        specific = select_specific_namespaces(patterns)
        if len(specific) == len(patterns):
            scopes = [str(ns) for ns in sorted(specific)]
        else:
            names = api.each("v1", "Namespace", None).keep(lambda n: str(n["metadata"]["name"]))
            scopes = [n for n in names if any(match_namespace(NamespaceName(n), p) for p in patterns)]
    out: list[Key] = []  # keys only: the objects of a page go as soon as it is read
    for ns in scopes:
        out.extend(api.each(s.API_VERSION, kind, ns).keep(_key))
    return out


def _key(item: dict[str, Any]) -> Key:
    return (item["metadata"]["namespace"], item["metadata"]["name"])


@kopf.on.probe(id="api")
def api_health(memo: kopf.Memo, **_: Any) -> str:
    """Liveness: the resync loop must have listed BlazenPeers through the API recently, and every child watch
    must have heard from the API server within twice the inactivity timeout (a frozen one is reconnected
    after one: watches.py). kopf's own watches (BlazenPeers, BlazenFleets) are kept honest by bookmarks and
    settings.watching.inactivity_timeout."""
    runtime = _runtime(memo)
    if runtime is None:
        raise kopf.PermanentError("the operator has not started")
    limit = 3 * runtime.options.resync_seconds + 30
    now = time.monotonic()
    last = runtime.health.last_resync_ok or runtime.health.started
    if now - last > limit:
        raise kopf.PermanentError(f"no successful API list for {now - last:.0f}s")
    dead = runtime.watches.dead() if runtime.watches is not None else []
    if dead:
        raise kopf.PermanentError("; ".join(dead))
    return f"last resync {now - last:.0f}s ago"


# ---------------------------------------------------------------------------------------------- BlazenPeer


@kopf.on.resume(s.GROUP, s.VERSION, s.PLURAL)
@kopf.on.create(s.GROUP, s.VERSION, s.PLURAL)
@kopf.on.update(s.GROUP, s.VERSION, s.PLURAL)
async def blazenpeer_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    # Returns nothing: kopf would store a result under status.<handler id>, which our schema prunes. Failures
    # are retried by the queue, not by kopf: one retry policy.
    runtime = _runtime(memo)
    if runtime is not None and namespace:  # BlazenPeers are namespaced: always set
        runtime.queue.request((namespace, name))


# ---------------------------------------------------------------------------------------------- children


def _request_owners(runtime: Runtime, namespace: str, peers: list[str], fleets: list[str]) -> None:
    """A child of these owners changed or went: a follow-up pass each (it has children, so it has been
    reconciled before)."""
    for owner in peers:
        runtime.queue.request((namespace, owner), follow_up=True)
    if runtime.fleets is not None:
        for owner in fleets:
            runtime.fleets.request((namespace, owner), follow_up=True)


def _wake_fleets(runtime: Runtime, namespace: str, obj: dict[str, Any]) -> None:
    if runtime.fleets is not None:
        for owner in _owner_names(obj, fs.KIND):
            runtime.fleets.request((namespace, owner), follow_up=True)


# ---------------------------------------------------------------------------------------------- BlazenFleet


@kopf.on.resume(s.GROUP, s.VERSION, fs.PLURAL)
@kopf.on.create(s.GROUP, s.VERSION, fs.PLURAL)
@kopf.on.update(s.GROUP, s.VERSION, fs.PLURAL)
async def blazenfleet_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    if runtime is not None and runtime.fleets is not None and namespace:
        runtime.fleets.request((namespace, name))


@kopf.on.event(s.GROUP, s.VERSION, s.PLURAL, id="pool-of-fleet")
async def pool_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every BlazenPeer event. The cache keeps the fleets' pools (the BlazenPeers labelled ours), so that a
    fleet pass finds a pool it no longer wants without listing BlazenPeers; every event, because a pool
    someone unlabelled or disowned must leave it. A pool's change (its status above all: replicas,
    readiness, served steps) wakes its fleet: the status follows, a pool edited or deleted by hand is put
    back."""
    runtime = _runtime(memo)
    if runtime is None:
        return
    obj: dict[str, Any] = dict(event["object"])
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if event["type"] == "DELETED" or labels.get(kinds.MANAGED_BY_LABEL) != kinds.MANAGED_BY:
        runtime.cache.forget(obj)
    else:
        runtime.cache.observe(obj)
    namespace = obj.get("metadata", {}).get("namespace")
    if namespace:
        _wake_fleets(runtime, namespace, obj)
