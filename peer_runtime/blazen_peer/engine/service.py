"""``PeerService``: the one engine behind the gRPC server and the HTTP/JSON shim.

It takes decoded payload structs and returns payload structs, or raises ``PeerStatusError`` with the status
and the
exact message Blazen's server uses, checked in Blazen's order.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from ..wire.errors import PeerError, PeerStatusError, Status, exception_text
from ..wire.messages import (
    RemoteRefDescriptor,
    SubWorkflowRequest,
    SubWorkflowResponse,
    dumps_json,
    json_encoder,
)
from ..wire.protocol import ENVELOPE_VERSION
from .context import Context
from .executor import Slots, StepExecutor, StepWorkersSaturated, default_workers
from .refs import (
    REF_MARKER,
    RefLifetime,
    SessionRefHandle,
    SessionRefLimitError,
    SessionRefStore,
    next_run_id,
)
from .registry import START_EVENT, StepRegistry, StepSpec
from .runner import EventSink, WorkflowFailed, run_workflow

log = logging.getLogger("blazen_peer.engine")

EMPTY_WORKFLOW = "workflow build failed: workflow validation failed: workflow must have at least one step"
#: distinct step-id lists whose event index is kept (least recently used ones go first)
INDEX_CACHE_SIZE = 1024


class _NeedsRun(Exception):
    """A value to encode becomes a new session ref, which needs the run's context."""


class Unencodable(PeerError):
    """A result, state value or event that cannot be written as JSON; ``str()`` says why."""


def _marker(obj: Any) -> Any:
    if isinstance(obj, SessionRefHandle):
        return obj.marker
    if hasattr(obj, "__blazen_serialize__"):
        raise _NeedsRun
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_RESULT_ENCODER = json_encoder(_marker)


class Forwarder(Protocol):
    """Reaches sibling replicas for refs this one does not hold (see transport/forwarding.py)."""

    async def deref(self, ref_uuid: str) -> bytes | None: ...

    async def release(self, ref_uuid: str) -> bool: ...


def check_version(version: int) -> None:
    if version > ENVELOPE_VERSION:
        raise PeerStatusError(
            Status.FAILED_PRECONDITION,
            f"envelope version {version} is newer than supported {ENVELOPE_VERSION}",
        )


def _abandoned_run_ended(slots: Slots | None, task: asyncio.Task[Any]) -> None:
    """Done callback of a run abandoned at its timeout: give back the slot it kept, and fetch its exception
    so asyncio logs no "never retrieved"."""
    if slots is not None:
        slots.release()
    if not task.cancelled():
        task.exception()


def _wake(waiter: asyncio.Future[Any], *_: Any) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def run_within(run: Coroutine[Any, Any, Any], secs: float, slots: Slots | None) -> Any:
    """``await run``, or TimeoutError after ``secs`` without waiting for the run to stop: a step that
    swallows its cancellation cannot stretch the call past its ``timeout_secs``. Until the abandoned run
    does stop, it keeps a slot of the concurrency limiter (``slots``), like a sync step that outlives its
    run (executor.py). (A waiter future woken by the task or a timer: about half the cost of
    ``asyncio.wait``.)"""
    loop = asyncio.get_running_loop()
    task = loop.create_task(run)
    waiter = loop.create_future()
    wake = functools.partial(_wake, waiter)
    task.add_done_callback(wake)
    timer = loop.call_later(secs, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        abandoned = not task.done()
        if abandoned:  # timed out, or the call itself was cancelled
            task.remove_done_callback(wake)
            task.cancel()
            if slots is not None:
                slots.occupy()
            task.add_done_callback(functools.partial(_abandoned_run_ended, slots))
    if abandoned:
        raise TimeoutError
    return task.result()


def start_event(input_json: bytes) -> dict[str, Any]:
    """The run's start event from the request's input: a JSON object's keys with ``type`` set, anything
    else under ``input``; INVALID_ARGUMENT for bad JSON (a router splitting a run builds it the same way)."""
    try:
        # Decoded as UTF-8 here: json.loads(bytes) sniffs UTF-16/32 first, which Blazen never sends.
        data = json.loads(input_json.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included; RecursionError: nesting
        raise PeerStatusError(Status.INVALID_ARGUMENT, f"invalid input JSON: {exc}") from None
    return {**data, "type": START_EVENT} if isinstance(data, dict) else {"type": START_EVENT, "input": data}


class PeerService:
    def __init__(
        self,
        node_id: str,
        registry: StepRegistry,
        *,
        served_steps: Iterable[str] | None = None,
        refs: SessionRefStore | None = None,
        executor: StepExecutor | None = None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.node_id = node_id
        self.registry = registry
        self.refs = refs or SessionRefStore()
        self.executor = executor or StepExecutor(default_workers(None))
        self.forwarder = forwarder
        self._allow = frozenset(served_steps) if served_steps is not None else None
        self._index_cache: OrderedDict[tuple[str, ...], dict[str, list[StepSpec]]] = OrderedDict()

    # -- served steps ----------

    def served_step_ids(self) -> list[str]:
        ids = self.registry.step_ids()
        if self._allow is None:
            return ids
        return [s for s in ids if s in self._allow]

    def _spec(self, step_id: str) -> StepSpec | None:
        if self._allow is not None and step_id not in self._allow:
            return None
        return self.registry.get(step_id)

    def _index(self, step_ids: list[str]) -> dict[str, list[StepSpec]]:
        """Event type -> the steps accepting it. A step id listed twice runs once. Cached per step-id list
        (LRU, ``INDEX_CACHE_SIZE``), only once every id is validated and only for lists without repeats, so
        a cached key is never longer than the served step set."""
        key = tuple(step_ids)
        cache = self._index_cache
        index = cache.get(key)
        if index is not None:
            try:  # noqa: SIM105 - contextlib.suppress costs more, on every call
                cache.move_to_end(key)
            except KeyError:  # evicted meanwhile by another thread (``precheck``)
                pass
            return index
        unique = dict.fromkeys(step_ids)
        index = {}
        for sid in unique:
            spec = self._spec(sid)
            if spec is None:
                raise PeerStatusError(Status.NOT_FOUND, f"unknown step id `{sid}`")
            for accepted in spec.accepts:
                index.setdefault(accepted, []).append(spec)
        if len(unique) == len(key):
            cache[key] = index
            if len(cache) > INDEX_CACHE_SIZE:
                cache.popitem(last=False)
        return index

    def forget_cached_indexes(self) -> None:
        """Call after registering steps while serving."""
        self._index_cache.clear()

    def precheck(self, req: SubWorkflowRequest) -> None:
        """The checks ``invoke`` runs before anything else (version, step ids), callable from any thread."""
        if req.envelope_version > ENVELOPE_VERSION:
            check_version(req.envelope_version)
        if req.step_ids:
            self._index(req.step_ids)

    # -- InvokeSubWorkflow ----------

    async def invoke(
        self, req: SubWorkflowRequest, *, caller_node_id: str | None = None, on_event: EventSink | None = None
    ) -> SubWorkflowResponse:
        """The response, or ``PeerStatusError``; nothing else escapes (a cancellation aside), whatever the
        steps do."""
        if req.envelope_version > ENVELOPE_VERSION:
            check_version(req.envelope_version)
        step_ids = req.step_ids
        if not step_ids:
            step_ids = self.registry.workflow_steps(req.workflow_name) or []
            for sid in step_ids:  # the default set is subject to --steps like anything else
                if self._spec(sid) is None:
                    raise PeerStatusError(Status.NOT_FOUND, f"unknown step id `{sid}`")
            if not step_ids:
                raise PeerStatusError(Status.INTERNAL, EMPTY_WORKFLOW)
        index = self._index(step_ids)
        start = start_event(req.input_json)
        ctx = Context(self.refs, next_run_id(), self.node_id, req.workflow_name, caller_node_id)
        try:
            return await self._run(req, index, start, ctx, on_event)
        finally:
            ctx.end()  # however the run ended: cancelled, refused, failed

    async def _run(
        self,
        req: SubWorkflowRequest,
        index: dict[str, list[StepSpec]],
        start: dict[str, Any],
        ctx: Context,
        on_event: EventSink | None,
    ) -> SubWorkflowResponse:
        error: str | None = None
        result_json: bytes | None = None
        state_json: dict[str, bytes] = {}
        try:
            run = run_workflow(index, start, ctx, self.executor, on_event)
            if req.timeout_secs is not None:
                run = run_within(run, req.timeout_secs, self.executor.slots)
            result = await run
            result_json = self.encode_json(result, ctx)
            if ctx.state:
                state_json = {str(k): self.encode_json(v, ctx) for k, v in ctx.state.items()}
        except WorkflowFailed as exc:
            error = f"workflow error: {exc}"
        except TimeoutError:
            error = f"workflow timed out after {req.timeout_secs}s"
        except Unencodable as exc:
            error = f"workflow error: result is not JSON-serializable: {exc}"
        except (SessionRefLimitError, StepWorkersSaturated) as exc:
            # A limit, not a bug: the session-ref cache is full (an insert a step did not catch, or a ref the
            # result needs) or every step thread is busy. The message names the flag; the whole call answers
            # RESOURCE_EXHAUSTED / 429.
            log.info("workflow %r refused: %s", req.workflow_name, exc)
            raise PeerStatusError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        if error is not None:
            result_json = None
            state_json = {}
            log.info("workflow %r failed: %s", req.workflow_name, error)
        refs: dict[str, RemoteRefDescriptor] = {}
        for key, tag, created in ctx.end():
            refs[key] = RemoteRefDescriptor(self.node_id, tag, created)
        return SubWorkflowResponse(state_json, result_json, refs, error)

    def encode_json(self, value: Any, ctx: Context) -> bytes:
        """JSON for results, state and streamed events. Session-ref handles become ref markers; an object with
        ``__blazen_serialize__`` becomes a new ``UntilParentFinish`` ref owned by this run. ``Unencodable``
        when the value cannot be written (the refs made for it are released), ``SessionRefLimitError`` when
        a ref it needs does not fit."""
        try:
            return _RESULT_ENCODER.encode(value).encode("utf-8")
        except _NeedsRun:
            pass
        except BaseException as exc:  # user objects can raise anything (see runner.py)
            raise Unencodable(exception_text(exc)) from None
        # Only values that become new refs need the run; the first pass stopped before inserting any.
        made: list[SessionRefHandle] = []

        def default(obj: Any) -> Any:
            try:
                return _marker(obj)
            except _NeedsRun:
                handle = ctx.session_refs.insert(obj, lifetime=RefLifetime.UntilParentFinish)
                made.append(handle)
                return handle.marker

        try:
            return dumps_json(value, default)
        except BaseException as exc:
            for handle in made:
                self.refs.release(handle.uuid)
            if isinstance(exc, SessionRefLimitError):
                raise
            raise Unencodable(exception_text(exc)) from None

    def encode_event(self, step_id: str, event: dict[str, Any], ctx: Context) -> bytes:
        """``encode_json`` for a streamed event; one that cannot be written fails the run."""
        try:
            return self.encode_json(event, ctx)
        except Unencodable as exc:
            raise WorkflowFailed(
                f"event '{event['type']}' from step '{step_id}' is not JSON-serializable: {exc}"
            ) from None

    # -- DerefSessionRef / ReleaseSessionRef ----------

    async def deref(
        self, ref_uuid: str, *, version: int = ENVELOPE_VERSION, forwarded: bool = False
    ) -> bytes:
        check_version(version)
        payload = self.refs.payload(ref_uuid)
        if payload is not None:
            return payload
        if not forwarded and self.forwarder is not None and not self.refs.holds(ref_uuid):
            payload = await self.forwarder.deref(ref_uuid)
            if payload is not None:
                return payload
        raise PeerStatusError(Status.NOT_FOUND, f"session ref {ref_uuid} not found")

    async def release(
        self, ref_uuid: str, *, version: int = ENVELOPE_VERSION, forwarded: bool = False
    ) -> bool:
        check_version(version)
        if self.refs.release(ref_uuid):
            return True
        if not forwarded and self.forwarder is not None:
            return await self.forwarder.release(ref_uuid)
        return False


__all__ = [
    "EMPTY_WORKFLOW",
    "REF_MARKER",
    "Forwarder",
    "PeerService",
    "Unencodable",
    "check_version",
    "run_within",
    "start_event",
]
