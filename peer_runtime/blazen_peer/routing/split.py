"""Split runs: a sub-workflow whose step ids no single pool serves, but the pools do together, run by the
router itself (docs/router.md, "Split runs").

The router runs Blazen's event routing - the engine's own ``route_events``, not a copy - over the requested
steps as the pools described them (step id -> accepted event types), and runs each step on a replica of a
pool that serves it (``blazen.fleet.v1.Fleet/RunStep``, chosen and retried per call like any forwarded
call: ``Router.unary``). A step gets the run's current state (JSON per key, as ``state_json``) and answers
with the events it emitted and a state delta; events travel as the JSON bytes the step's peer wrote, so the
response's ``state_json`` and a stream's events are the very bytes one peer would have sent.

Semantics are one peer's: a step's failure, or an event type no requested step accepts, is an OK answer
with ``error``; ``timeout_secs`` bounds the whole run (``run_within``) and cancels the step in flight
(the hop's cancellation reaches the peer's step); whatever ends the run, every replica that ran (or may
have started) one of its steps gets ``EndRun``, which drops its ``UntilContextDrop`` refs and returns the
refs that survive: they are the response's ``remote_refs``, with their real origins, remembered in the
router's ref-owner map so that deref/release through the router go straight to them.

State deltas: a replica that says ``state_deltas`` may keep the run's state after a step (it answers
``state_kept``; large states only, within its budget). The run's next step that a replica keeping its
state serves goes there unless it is much busier (``balance.AFFINITY_SLACK``), with only the keys changed
since (``base``); a replica that no longer holds that state (restarted, evicted) refuses ``STATE_NOT_HELD``
before running anything, and the step goes again with whole state. A replica keeping only state gets its
``EndRun`` after the answer, off the caller's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, Metric

from ..engine.runner import WorkflowFailed, route_events
from ..engine.service import run_within, start_event
from ..wire.envelope import unwrap, wrap
from ..wire.errors import PeerStatusError, Status, exception_text
from ..wire.fleet import EndRunRequest, EndRunResponse, RunStepRequest, RunStepResponse, state_size
from ..wire.messages import (
    RemoteRefDescriptor,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
    dumps_json,
    encode_stream_event,
    encode_stream_final,
)
from ..wire.postcard import parse_uuid
from ..wire.protocol import FLEET_ROUTER_TOKEN_METADATA, PATH_END_RUN, PATH_RUN_STEP, STATE_NOT_HELD
from .balance import Replica
from .forward import Router, UpstreamError

__all__ = ["SplitRunner"]

log = logging.getLogger("blazen_peer.routing.split")

#: how long the end of a run may take on one replica (it only drops refs).
END_RUN_TIMEOUT = 5.0
#: frames a split stream buffers ahead of its client before the run waits (as a peer's stream).
STREAM_QUEUE_EVENTS = 64


class RemoteStep:
    """A requested step as the router routes it: its id and the pools that serve it."""

    __slots__ = ("pools", "step_id")

    def __init__(self, step_id: str, pools: tuple[str, ...]) -> None:
        self.step_id = step_id
        self.pools = pools


class Event(dict[str, Any]):
    """An event as a step's peer wrote it: decoded (to route it) and its JSON bytes (to pass it on)."""

    __slots__ = ("raw",)

    raw: bytes

    @classmethod
    def of(cls, raw: bytes) -> Event:
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise WorkflowFailed(f"a step's event is not JSON: {exc}") from None
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise WorkflowFailed('a step emitted an event without a string "type" key')
        ev = cls(value)
        ev.raw = raw
        return ev


class _Run:
    """One split run: its id on the peers, its state, the replicas it reached."""

    def __init__(self, runner: SplitRunner, req: SubWorkflowRequest, metadata: list[tuple[str, str]]) -> None:
        self.runner = runner
        self.req = req
        self.metadata = metadata
        self.run_id = str(uuid.uuid4())
        self.state: dict[str, bytes] = {}
        #: every replica a step was sent to, and how many steps it was sent and answered: one that did not
        #: answer a step (it may have started it) or answered ``keeps_run`` gets ``EndRun``
        self.reached: dict[str, Replica] = {}
        self._sent: Counter[str] = Counter()
        self._answered: Counter[str] = Counter()
        self._keeping: set[str] = set()
        #: replicas keeping the run's state (``state_kept``), which get ``EndRun`` off the caller's path
        self._state_kept: set[str] = set()
        #: replica -> the step (``seq``) after which it keeps the run's state, and that state
        self.held: dict[str, tuple[int, dict[str, bytes]]] = {}
        self.seq = 0
        self.deadline: float | None = None
        self._last: Replica | None = None

    def _reach(self, replica: Replica) -> None:
        self.reached[replica.addr] = replica
        self._sent[replica.addr] += 1
        self._last = replica

    def _request(
        self,
        step: RemoteStep,
        raw_event: bytes,
        state: dict[str, bytes],
        seq: int | None,
        held: tuple[int, dict[str, bytes]] | None,
    ) -> bytes:
        """The RunStep bytes: ``state`` whole, or (``held``) its change from the state a replica keeps."""
        if held is None:
            req = RunStepRequest(self.run_id, self.req.workflow_name, step.step_id, raw_event, state, seq=seq)
            kind = "whole"
        else:
            base, before = held
            # a key the run did not change since holds the very bytes object: no comparison of contents
            changed = {k: v for k, v in state.items() if before.get(k) is not v}
            deleted = [k for k in before if k not in state]
            req = RunStepRequest(
                self.run_id, self.req.workflow_name, step.step_id, raw_event, changed,
                seq=seq, base=base, state_deleted=deleted,
            )  # fmt: skip
            kind = "delta"
        self.runner.count_state(kind, req.state_json, req.state_deleted)
        return wrap(req.encode())

    async def call(self, step: RemoteStep, event: dict[str, Any]) -> list[dict[str, Any]]:
        runner = self.runner
        raw_event = event.raw if isinstance(event, Event) else dumps_json(event)
        pools = runner.router.pools.pools  # (a discovered pool may have gone since the run began)
        cands = [r for p in step.pools for r in pools.get(p, ())]
        # deltas only when every candidate takes them: an older peer must get whole state
        deltas = bool(cands) and all(r.description is not None and r.description.state_deltas for r in cands)
        prefer = next((r for r in cands if r.addr in self.held), None) if deltas else None
        self.seq += 1
        seq = self.seq if deltas else None
        sent = self.state
        unary = runner.router.unary
        request = self._request(
            step, raw_event, sent, seq, None if prefer is None else self.held[prefer.addr]
        )
        try:
            raw, replica = await unary(
                cands, PATH_RUN_STEP, request, self.metadata, self.deadline, self._reach, prefer
            )
        except UpstreamError as exc:
            if not (prefer is not None and _not_held(exc) and self._last is not None):
                raise
            # restarted, evicted, or another replica than the one holding it: nothing ran; whole state (as
            # the step started: another step of its wave may have changed the run's state meanwhile)
            self.held.pop(self._last.addr, None)
            self._answered[self._last.addr] += 1  # it answered, and holds nothing more of the run
            request = self._request(step, raw_event, sent, seq, None)
            raw, replica = await unary(
                cands, PATH_RUN_STEP, request, self.metadata, self.deadline, self._reach
            )
        runner.steps[replica.pool] += 1
        try:
            resp = RunStepResponse.decode(unwrap(raw))
        except ValueError as exc:  # postcard or envelope: a peer that speaks another RunStep
            raise UpstreamError(
                grpc.StatusCode.INTERNAL, f"malformed RunStep reply from {replica.addr}: {exc}"
            ) from None
        self._answered[replica.addr] += 1
        if resp.keeps_run:
            self._keeping.add(replica.addr)
        if resp.state_kept:
            self._state_kept.add(replica.addr)
        if resp.error is not None:
            raise WorkflowFailed(resp.error)
        state = self.state
        # the replica keeps (its state before the step) + (the step's change): the run's state once that
        # change is applied, unless another step of the wave changed the state meanwhile
        same = state is sent
        if resp.state_set or resp.state_deleted:
            state = self.state = dict(state)  # a step of the same wave still holds the previous one
            state.update(resp.state_set)
            for key in resp.state_deleted:
                state.pop(key, None)
        if resp.state_kept and same and seq is not None:
            self.held[replica.addr] = (seq, state)
        else:
            self.held.pop(replica.addr, None)
        return [Event.of(b) for b in resp.events_json]

    async def end(self) -> dict[str, RemoteRefDescriptor]:
        """``EndRun`` on every replica that may hold something of the run; the refs that survive, remembered
        as theirs."""
        replicas = [
            r
            for addr, r in self.reached.items()
            if addr in self._keeping or self._sent[addr] > self._answered[addr]
        ]
        router = self.runner.router
        request = wrap(EndRunRequest(self.run_id).encode())
        for addr in self._state_kept:  # it frees memory, returns no refs: the caller need not wait for it
            replica = self.reached[addr]
            if replica not in replicas:
                self.runner.background(
                    router._one(replica, PATH_END_RUN, request, self.metadata, END_RUN_TIMEOUT)
                )
        if not replicas:
            return {}
        answers = await asyncio.gather(
            *(router._one(r, PATH_END_RUN, request, self.metadata, END_RUN_TIMEOUT) for r in replicas),
            return_exceptions=True,
        )
        refs: dict[str, RemoteRefDescriptor] = {}
        for replica, answer in zip(replicas, answers, strict=True):
            if isinstance(answer, BaseException):
                detail = answer.details() if isinstance(answer, grpc.aio.AioRpcError) else answer
                log.warning("split run %s: EndRun on %s failed: %s", self.run_id, replica.addr, detail)
                continue
            try:
                survivors = EndRunResponse.decode(unwrap(answer)).remote_refs
            except ValueError as exc:
                log.warning("split run %s: bad EndRun reply from %s: %s", self.run_id, replica.addr, exc)
                continue
            if survivors:
                router.owners.remember([parse_uuid(k) for k in survivors], replica.addr)
                refs.update(survivors)
        return refs


class _Final:
    __slots__ = ("frame",)

    def __init__(self, frame: bytes) -> None:
        self.frame = frame


class SplitRunner:
    """The router's split runs (``Router.split``), with their counters for ``/metrics`` and ``/v1/info``."""

    def __init__(self, router: Router, router_token: Any = None) -> None:
        """``router_token``: the fleet router token source (``--fleet-router-token-file``) or None."""
        self.router = router
        self._token = router_token
        self.runs: Counter[str] = Counter()  # by outcome
        self.steps: Counter[str] = Counter()  # by pool
        #: RunStep requests and their state bytes (keys and JSON values), by kind: whole state or a delta
        self.state_sends: Counter[str] = Counter()
        self.state_bytes: Counter[str] = Counter()
        self._tasks: set[asyncio.Future[Any]] = set()

    def count_state(self, kind: str, state: dict[str, bytes], deleted: list[str]) -> None:
        self.state_sends[kind] += 1
        self.state_bytes[kind] += state_size(state) + sum(map(len, deleted))

    def background(self, work: Any) -> None:
        """Run ``work`` (an EndRun nobody waits for) to its end, failures logged."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
            log.info("split run: EndRun of a kept state failed (the peer drops it when idle): %s", detail)

    def _step_pools(self, step_id: str) -> tuple[str, ...]:
        """The pools that serve ``step_id`` and run single steps for this router (their replicas said
        ``run_steps``: they know the router's identity)."""
        pools = self.router.pools
        return tuple(
            name
            for name in pools.table.step_pools.get(step_id, ())
            if any(r.description is not None and r.description.run_steps for r in pools.pools.get(name, ()))
        )

    def applies(self, req: SubWorkflowRequest, refusal: PeerStatusError) -> bool:
        """A request refused only because no single pool serves all its step ids, though each is served by
        a pool that runs single steps for this router."""
        if refusal.status is not Status.NOT_FOUND or not req.step_ids:
            return False
        return all(self._step_pools(s) for s in req.step_ids)

    def _index(self, step_ids: list[str]) -> dict[str, list[RemoteStep]]:
        """Event type -> the requested steps accepting it (a step id listed twice runs once), as the pools
        described their steps."""
        views = self.router.pools.table.views
        index: dict[str, list[RemoteStep]] = {}
        for sid in dict.fromkeys(step_ids):
            pools = self._step_pools(sid)
            if not pools:  # its pools changed since ``applies``: no step accepts its events now
                continue
            step = RemoteStep(sid, pools)
            for accepted in views[pools[0]].steps.get(sid, ()):
                index.setdefault(accepted, []).append(step)
        return index

    def _metadata(self, metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if self._token is None:
            return metadata
        return [*metadata, (FLEET_ROUTER_TOKEN_METADATA, self._token.authorization())]

    async def _run(self, run: _Run, time_left: float | None, on_event: Any = None) -> SubWorkflowResponse:
        req = run.req
        run.deadline = None if time_left is None else time.monotonic() + time_left
        start = start_event(req.input_json)
        index = self._index(req.step_ids)
        error: str | None = None
        result_json: bytes | None = None
        outcome = "failed"
        try:
            routing = route_events(index, start, run.call, run, on_event)
            if req.timeout_secs is not None:
                routing = run_within(routing, req.timeout_secs, None)
            result_json = dumps_json(await routing)
            outcome = "ok"
        except WorkflowFailed as exc:
            error = f"workflow error: {exc}"
            outcome = "error"
        except TimeoutError:
            error = f"workflow timed out after {req.timeout_secs}s"
            outcome = "timeout"
        except BaseException:
            # Cancelled (the caller went) or a hop failed: end the run without holding the answer up.
            asyncio.ensure_future(run.end()).add_done_callback(_retrieve)
            raise
        finally:
            self.runs[outcome] += 1
        refs = await run.end()
        if error is not None:
            log.info("split workflow %r failed: %s", req.workflow_name, error)
            return SubWorkflowResponse({}, None, refs, error)
        return SubWorkflowResponse(run.state, result_json, refs, None)

    async def invoke(
        self, req: SubWorkflowRequest, metadata: list[tuple[str, str]], time_left: float | None
    ) -> SubWorkflowResponse:
        return await self._run(_Run(self, req, self._metadata(metadata)), time_left)

    async def stream(
        self, req: SubWorkflowRequest, metadata: list[tuple[str, str]], time_left: float | None
    ) -> AsyncIterator[bytes]:
        """Every step's events in order, as ``SubWorkflowStreamFrame``s, then the final frame."""
        queue: asyncio.Queue[bytes | _Final | BaseException] = asyncio.Queue(STREAM_QUEUE_EVENTS)
        seq = 0

        async def on_event(step_id: str, event: dict[str, Any], ctx: Any) -> None:
            nonlocal seq
            raw = event.raw if isinstance(event, Event) else dumps_json(event)
            frame = SubWorkflowEvent(seq, step_id, event["type"], raw, int(time.time() * 1000))
            await queue.put(wrap(encode_stream_event(frame)))
            seq += 1

        async def run() -> None:
            try:
                final = await self._run(_Run(self, req, self._metadata(metadata)), time_left, on_event)
            except (UpstreamError, PeerStatusError) as exc:
                await queue.put(exc)
                return
            except Exception as exc:  # a bug must still end the stream with a status, as a peer's does
                log.exception("split stream %r failed", req.workflow_name)
                await queue.put(PeerStatusError(Status.INTERNAL, f"internal error: {exception_text(exc)}"))
                return
            await queue.put(_Final(wrap(encode_stream_final(final))))

        task = asyncio.ensure_future(run())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Final):
                    yield item.frame
                    return
                yield item
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- observability ----------
    def info(self) -> dict[str, Any]:
        return {
            "runs": dict(self.runs),
            "steps": dict(self.steps),
            "state_sends": dict(self.state_sends),
            "state_bytes": dict(self.state_bytes),
        }

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "blazen_router_split_runs",
            "Runs whose steps no single pool serves, run step by step over the pools, by outcome.",
            labels=["outcome"],
        )
        for outcome, n in sorted(self.runs.items()):
            runs.add_metric([outcome], n)
        steps = CounterMetricFamily(
            "blazen_router_split_steps",
            "Steps of split runs run on a pool (each is one hop: router -> replica -> router).",
            labels=["pool"],
        )
        for pool, n in sorted(self.steps.items()):
            steps.add_metric([pool], n)
        sends = CounterMetricFamily(
            "blazen_router_split_state_sends",
            "RunStep requests of split runs, by how they carried the run's state: whole, or a delta from "
            "the state the replica kept after the run's previous step there.",
            labels=["kind"],
        )
        size = CounterMetricFamily(
            "blazen_router_split_state_bytes",
            "Bytes of run state (keys and JSON values) sent in RunStep requests, by kind (whole, delta).",
            labels=["kind"],
        )
        for kind in sorted(self.state_sends):
            sends.add_metric([kind], self.state_sends[kind])
            size.add_metric([kind], self.state_bytes[kind])
        yield from (runs, steps, sends, size)


def _not_held(exc: UpstreamError) -> bool:
    return exc.code == grpc.StatusCode.FAILED_PRECONDITION and exc.details.startswith(STATE_NOT_HELD)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
