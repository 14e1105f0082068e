"""The one module that talks to the Kubernetes API (and to the peers' admin port).

Every child is written with one server-side apply call (fixed field manager, ``force``), which creates
it, updates it and reverts drift alike (reconcile.py decides when one is needed). All calls are blocking;
callers run them in worker threads.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import kinds
from . import spec as s

FIELD_MANAGER = "blazen-operator"
STUB_MANAGER = "blazen-operator-stub"
PAGE = 250  # objects per list page: a list of 1,000 BlazenPeers' children is never decoded at once
log = logging.getLogger(__name__)
T = TypeVar("T")


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
    plural = kinds.plural(api_version, kind)
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def load_client_configuration(kubeconfig: str | None = None) -> client.Configuration:
    """An explicit kubeconfig; else the in-cluster ServiceAccount; else $KUBECONFIG (read now, not when the
    kubernetes package was imported)."""
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        return cfg
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
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

    # ------------------------------------------------------------ raw
    def _send(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None,
        body: Any,
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> Any:
        """The response, its body not read yet (urllib3 does not preload it)."""
        url_path = path + (("?" + urlencode(query)) if query else "")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method_, url, headers, body_, _post = self._client.param_serialize(
            method=method,
            resource_path=url_path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        return self._client.call_api(
            method_, url, header_params=headers, body=body_, _request_timeout=timeout
        )

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
        try:
            resp = self._send(method, path, query, body, content_type, self._timeout)
            raw = resp.read()
        except ApiException as exc:
            raise _api_error(exc.status or 0, exc.reason or "", exc.body, what) from exc
        except Exception as exc:  # connection refused, timeouts, TLS
            raise ApiError(0, type(exc).__name__, str(exc), what) from exc
        if resp.status >= 400:
            raise _api_error(resp.status, resp.reason or "", raw, what)
        return json.loads(raw) if raw else {}

    def watch(
        self,
        api_version: str,
        kind: str,
        label_selector: str,
        resource_version: str,
        *,
        server_timeout: int,
        inactivity_timeout: float,
    ) -> Iterator[dict[str, Any]]:
        """Open a watch from ``resource_version`` (bookmarks included), every namespace: the request is made
        now (errors raise here), the events are decoded one at a time as the iterator reads them. The stream
        ends when the API server closes it (``server_timeout``); ``inactivity_timeout`` bounds each wait for
        bytes (the API server sends a bookmark about once a minute), so a frozen connection raises
        ``ApiError`` (status 0) instead of hanging."""
        query = {
            "watch": "true",
            "labelSelector": label_selector,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(server_timeout),
        }
        what = f"watch {kind}"
        path = path_for(api_version, kind, None)
        try:
            # a connect (TLS handshake included) into a black hole fails as fast as a frozen stream
            resp = self._send("GET", path, query, None, "", (inactivity_timeout, inactivity_timeout))
        except ApiException as exc:
            raise _api_error(exc.status or 0, exc.reason or "", exc.body, what) from exc
        except Exception as exc:
            raise ApiError(0, type(exc).__name__, str(exc), what) from exc
        if resp.status >= 400:
            try:
                raise _api_error(resp.status, resp.reason or "", resp.read(), what)
            finally:
                resp.response.release_conn()
        return _events(resp.response, what)

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

    def merge_replace(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Overwrite the live object's fields with the manifest's by a JSON merge patch (None: it is gone).

        The fallback when a server-side apply is refused because another manager added list items (e.g. a
        Service port keyed by a different port number): a merge patch replaces whole lists, which apply never
        does for items it does not own. Maps merge, so fields the manifest does not set (a Service's
        clusterIP) stay. A patch, not a PUT: the operator is granted `patch`, never `update`."""
        meta = manifest["metadata"]
        path = path_for(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        try:
            return self.request(
                "PATCH",
                path,
                query={"fieldManager": FIELD_MANAGER},
                body=manifest,
                content_type="application/merge-patch+json",
                what=f"merge-patch {manifest['kind']} {meta['name']}",
            )
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def create_if_absent(self, manifest: dict[str, Any], manager: str = STUB_MANAGER) -> bool:
        """True when created, False when one of that name exists already."""
        return self.create(manifest, manager) is not None

    def create(self, manifest: dict[str, Any], manager: str = STUB_MANAGER) -> dict[str, Any] | None:
        """The created object; None when one of that name exists already."""
        meta = manifest["metadata"]
        path = path_for(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        try:
            return self.request(
                "POST",
                path,
                query={"fieldManager": manager},
                body=manifest,
                what=f"create {manifest['kind']}",
            )
        except ApiError as exc:
            if exc.status == 409:
                return None
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

    def each(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        label_selector: str | None = None,
        *,
        restarted: Callable[[], None] | None = None,
    ) -> Paged:
        """The objects of a list, page by page (see :class:`Paged`)."""
        return Paged(self.request, api_version, kind, namespace, label_selector, restarted)

    def collect(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> Listing:
        """The whole list at once: for callers that need every object together (tests, tools)."""
        paged = self.each(api_version, kind, namespace, label_selector)
        return Listing(paged.keep(lambda obj: obj), paged.resource_version)

    def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request(
                "DELETE", path_for(api_version, kind, namespace, name), body=body, what=f"delete {kind}"
            )
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def apply_status(
        self, namespace: str, name: str, status: dict[str, Any], kind: str = s.KIND
    ) -> dict[str, Any] | None:
        """None: the object is gone."""
        body = {
            "apiVersion": s.API_VERSION,
            "kind": kind,
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


class Request(Protocol):
    """:meth:`Api.request` (a fake's in the unit tests)."""

    def __call__(
        self, method: str, path: str, *, query: dict[str, Any] | None = ..., what: str = ...
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Listing:
    """A whole list: its items and the resourceVersion it was read at."""

    items: list[dict[str, Any]]
    resource_version: str


class Paged:
    """The one way the operator lists: the items of one list, ``PAGE`` per request following ``continue``
    tokens, so at most one page of decoded objects is alive while a caller keeps only what it reads of each.

    An expired continue token (410 Gone: the API server compacted the list's snapshot away) starts the list
    over from the beginning, and ``restarted`` is told first: a caller that accumulated state from the items
    so far resets it, since they are returned again. After the last page ``resource_version`` is the list's
    (a watch resumes from it). List items carry no apiVersion/kind; they are set from the request."""

    def __init__(
        self,
        request: Request,
        api_version: str,
        kind: str,
        namespace: str | None,
        label_selector: str | None = None,
        restarted: Callable[[], None] | None = None,
    ) -> None:
        self._request = request
        self.api_version = api_version
        self.kind = kind
        self._path = path_for(api_version, kind, namespace)
        self._selector = label_selector
        self._restarted = restarted
        self.resource_version = ""
        self.pages = 0  # requests answered, the restarted ones included

    def __iter__(self) -> Iterator[dict[str, Any]]:
        token = ""
        while True:
            query: dict[str, Any] = {"limit": PAGE}
            if self._selector:
                query["labelSelector"] = self._selector
            if token:
                query["continue"] = token
            try:
                page = self._request("GET", self._path, query=query, what=f"list {self.kind}")
            except ApiError as exc:
                if exc.status == 410 and token:
                    token = ""
                    if self._restarted is not None:
                        self._restarted()
                    continue
                raise
            self.pages += 1
            meta = page.get("metadata") or {}
            items = page.get("items") or []
            del page
            items.reverse()
            while items:  # handed out one by one, the page shrinking as the caller drops them
                obj = items.pop()
                obj.setdefault("apiVersion", self.api_version)
                obj.setdefault("kind", self.kind)
                yield obj
            token = meta.get("continue") or ""
            if not token:
                self.resource_version = str(meta.get("resourceVersion") or "")
                return

    def keep(self, project: Callable[[dict[str, Any]], T]) -> list[T]:
        """What ``project`` keeps of each item, in list order: the objects themselves go with their page.
        A restart drops what was kept so far (the items come again), then tells ``restarted``."""
        out: list[T] = []
        told = self._restarted

        def restarted() -> None:
            out.clear()
            if told is not None:
                told()

        self._restarted = restarted
        for obj in self:
            out.append(project(obj))
        return out


def _events(raw: Any, what: str) -> Iterator[dict[str, Any]]:
    """A watch stream's events from urllib3's response ``raw``, one per line."""
    pending = b""
    try:
        for chunk in raw.stream(1 << 16):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)
    except Exception as exc:  # a read timeout (inactivity), a reset connection, a torn line
        raise ApiError(0, type(exc).__name__, str(exc), what) from exc
    finally:
        # a stream left half-read is never reused: close it, then hand the slot back to the pool
        raw.close()
        raw.release_conn()


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
    """GET a peer's /v1/info; None when it does not answer properly (the status then says 'unknown').

    One plain request to the pod's own address: no redirect is followed (a pod cannot send the operator to
    another host), no proxy from the environment is used, and at most 1 MiB is read."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/", headers={"Accept": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        data = json.loads(resp.read(1 << 20))
        return data if isinstance(data, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


_info_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="peer-info")


def read_peer_infos(urls: Iterable[str]) -> list[dict[str, Any] | None]:
    return list(_info_pool.map(read_peer_info, urls))
