"""``PeerService``: the one engine behind the gRPC server and the HTTP/JSON shim.

It takes decoded payload structs and returns payload structs, or raises ``PeerStatusError`` with the status
and the
exact message Blazen's server uses, checked in Blazen's order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any, Protocol

from ..errors import PeerStatusError, Status
from ..wire.messages import (
    ENVELOPE_VERSION,
    RemoteRefDescriptor,
    SubWorkflowRequest,
    SubWorkflowResponse,
    dumps_json,
    json_encoder,
)
from .context import Context
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


class _NeedsRun(Exception):
    """A value to encode becomes a new session ref, which needs the run's context."""


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


class PeerService:
    def __init__(
        self,
        node_id: str,
        registry: StepRegistry,
        *,
        served_steps: Iterable[str] | None = None,
        refs: SessionRefStore | None = None,
        executor: Executor | None = None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.node_id = node_id
        self.registry = registry
        self.refs = refs or SessionRefStore()
        self.executor = executor
        self.forwarder = forwarder
        self._allow = frozenset(served_steps) if served_steps is not None else None
        self._index_cache: dict[tuple[str, ...], dict[str, list[StepSpec]]] = {}

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
        key = tuple(step_ids)
        index = self._index_cache.get(key)
        if index is not None:
            return index
        index = {}
        for sid in step_ids:
            spec = self._spec(sid)
            if spec is None:
                raise PeerStatusError(Status.NOT_FOUND, f"unknown step id `{sid}`")
            for accepted in spec.accepts:
                index.setdefault(accepted, []).append(spec)
        if len(self._index_cache) > 4096:
            self._index_cache.clear()
        self._index_cache[key] = index
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
        try:
            # Decoded as UTF-8 here: json.loads(bytes) sniffs UTF-16/32 first, which Blazen never sends.
            data = json.loads(req.input_json.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError included
            raise PeerStatusError(Status.INVALID_ARGUMENT, f"invalid input JSON: {exc}") from None
        start = (
            {**data, "type": START_EVENT} if isinstance(data, dict) else {"type": START_EVENT, "input": data}
        )

        run_id = next_run_id()
        ctx = Context(self.refs, run_id, self.node_id, req.workflow_name, caller_node_id)
        error: str | None = None
        result_json: bytes | None = None
        state_json: dict[str, bytes] = {}
        try:
            if req.timeout_secs is None:
                result = await run_workflow(index, start, ctx, self.executor, on_event)
            else:
                async with asyncio.timeout(req.timeout_secs):
                    result = await run_workflow(index, start, ctx, self.executor, on_event)
            result_json = self.encode_json(result, ctx)
            if ctx.state:
                state_json = {str(k): self.encode_json(v, ctx) for k, v in ctx.state.items()}
        except WorkflowFailed as exc:
            error = f"workflow error: {exc}"
        except TimeoutError:
            error = f"workflow timed out after {req.timeout_secs}s"
        except (TypeError, ValueError) as exc:
            error = f"workflow error: result is not JSON-serializable: {exc}"
        except SessionRefLimitError as exc:
            # The session-ref cache is full (--ref-max-count / --ref-max-bytes, named in the message): an
            # insert a step did not catch, or a ref the result needs (an object with __blazen_serialize__).
            # A limit, not a bug: the whole call answers RESOURCE_EXHAUSTED / 429. The run's
            # UntilContextDrop refs go as after any run.
            self.refs.end_run(run_id)
            log.info("workflow %r refused: %s", req.workflow_name, exc)
            raise PeerStatusError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        if error is not None:
            result_json = None
            state_json = {}
            log.info("workflow %r failed: %s", req.workflow_name, error)
        refs: dict[str, RemoteRefDescriptor] = {}
        if ctx.refs_used:
            for key, tag, created in self.refs.end_run(run_id):
                refs[key] = RemoteRefDescriptor(self.node_id, tag, created)
        return SubWorkflowResponse(state_json, result_json, refs, error)

    def encode_json(self, value: Any, ctx: Context) -> bytes:
        """JSON for results, state and streamed events. Session-ref handles become ref markers; an object with
        ``__blazen_serialize__`` becomes a new ``UntilParentFinish`` ref owned by this run."""
        try:
            return _RESULT_ENCODER.encode(value).encode("utf-8")
        except _NeedsRun:
            pass

        # Only values that become new refs need the run; the first pass stopped before inserting any.
        def default(obj: Any) -> Any:
            try:
                return _marker(obj)
            except _NeedsRun:
                return ctx.session_refs.insert(obj, lifetime=RefLifetime.UntilParentFinish).marker

        return dumps_json(value, default)

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


__all__ = ["EMPTY_WORKFLOW", "REF_MARKER", "Forwarder", "PeerService", "check_version"]
