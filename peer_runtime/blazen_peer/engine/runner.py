"""Event-type routing, as Blazen runs a sub-workflow.

The start event goes to every step that accepts ``blazen::StartEvent``; each step's output events go to every
step
that accepts their type, and so on. A ``blazen::StopEvent`` ends the run with its ``result``. Events pending
at the
same time are handled concurrently (one "wave"); an event type nobody accepts fails the run. Async handlers
run
on the event loop; plain ``def`` handlers run on the ``StepExecutor``'s threads, so a CPU-heavy step does not
stall other calls.

Whatever a step raises fails the run as ``WorkflowFailed`` (Blazen's step failure), ``BaseException``
subclasses included: a step's ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` or its own
``CancelledError`` must not reach the event loop, which would stop serving. Only a real cancellation of the
run (timeout, client gone) propagates as such. Two limits also propagate unchanged, so the service answers
RESOURCE_EXHAUSTED / 429: ``SessionRefLimitError`` escaping a step (a full session-ref cache is a limit, not a
bug in the step; a step that catches it carries on as usual) and ``StepWorkersSaturated``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ..wire.errors import PeerError, exception_text
from .executor import StepExecutor, StepWorkersSaturated
from .refs import SessionRefLimitError
from .registry import STOP_EVENT, StepSpec

#: ``await on_event(step_id, event, ctx)`` for each emitted event, before the next wave starts: a sink that
#: waits (a full stream queue) holds the run back.
EventSink = Callable[[str, dict[str, Any], Any], Awaitable[None]]


class WorkflowFailed(PeerError):
    """The run failed; ``str()`` is the Display text that follows ``workflow error: ``."""


def _normalize(spec: StepSpec, out: Any) -> list[dict[str, Any]]:
    if out is None:
        return []
    if isinstance(out, dict):
        events = [out]
    elif isinstance(out, list | tuple):
        events = list(out)
    else:
        raise WorkflowFailed(
            f"step '{spec.step_id}' failed: returned {type(out).__name__}; "
            "expected an event dict, a list of them, "
            "or None"
        )
    for ev in events:
        if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
            raise WorkflowFailed(
                f"step '{spec.step_id}' failed: emitted an event without a string \"type\" key"
            )
    return events


async def call_step(
    spec: StepSpec, event: dict[str, Any], ctx: Any, executor: StepExecutor
) -> list[dict[str, Any]]:
    try:
        if spec.is_async:
            out = await spec.handler(event, ctx)
        else:
            out = await executor.run(spec.handler, event, ctx)
            if asyncio.iscoroutine(out):
                out = await out
    except (WorkflowFailed, SessionRefLimitError, StepWorkersSaturated):
        raise  # a cap hit the step did not handle is the call's answer (see the module docstring)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the run itself is being cancelled
        raise WorkflowFailed(f"step '{spec.step_id}' failed: {exception_text(exc)}") from exc
    except BaseException as exc:  # see the module docstring
        raise WorkflowFailed(f"step '{spec.step_id}' failed: {exception_text(exc)}") from exc
    return _normalize(spec, out)


class Routable(Protocol):
    """What event routing needs of a step: its id (a ``StepSpec`` here; a remote step in a router)."""

    @property
    def step_id(self) -> str: ...


S = TypeVar("S", bound=Routable)
#: ``await call(step, event)``: run one step on one event, return the events it emitted (``WorkflowFailed``
#: when it failed).
StepCall = Callable[[S, dict[str, Any]], Awaitable[list[dict[str, Any]]]]


async def route_events(
    index: Mapping[str, Sequence[S]],
    start_event: dict[str, Any],
    call: StepCall[S],
    ctx: Any = None,
    on_event: EventSink | None = None,
) -> Any:
    """Blazen's event routing, wherever the steps run: from ``start_event`` to the first stop event, whose
    ``result`` it returns; ``WorkflowFailed`` otherwise. ``index`` maps an event type to the steps accepting
    it, ``call`` runs one of them (here: on this peer; in a router: on a replica of the pool that serves it,
    ``routing.split``); ``on_event`` sees each emitted event with ``ctx``."""
    pending = [start_event]
    wave = 0
    while pending:
        for ev in pending:
            if ev["type"] == STOP_EVENT:
                return ev.get("result")
        if wave:
            # Steps that never suspend would otherwise chain waves without giving the loop a turn: a cycle
            # of them would hold it (no timeout, no other call) until the watchdog ends the process.
            await asyncio.sleep(0)
        wave += 1
        jobs: list[tuple[S, dict[str, Any]]] = []
        for ev in pending:
            specs = index.get(ev["type"])
            if not specs:
                raise WorkflowFailed(f"no handler for event type: {ev['type']}")
            for spec in specs:
                jobs.append((spec, ev))
        if len(jobs) == 1:
            spec, ev = jobs[0]
            pending = await call(spec, ev)
            if on_event is not None:
                for out in pending:
                    await on_event(spec.step_id, out, ctx)
            continue
        tasks = [asyncio.ensure_future(call(spec, ev)) for spec, ev in jobs]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            raise
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if failed:
            for t in tasks:
                t.cancel()
            raise failed[0].exception()  # type: ignore[misc]
        pending = []
        for (spec, _), t in zip(jobs, tasks, strict=True):
            outs = t.result()
            if on_event is not None:
                for out in outs:
                    await on_event(spec.step_id, out, ctx)
            pending.extend(outs)
    raise WorkflowFailed(f"the run ended without a {STOP_EVENT}: no step emitted an event")


def run_workflow(
    index: dict[str, list[StepSpec]],
    start_event: dict[str, Any],
    ctx: Any,
    executor: StepExecutor,
    on_event: EventSink | None = None,
) -> Coroutine[Any, Any, Any]:
    """The run on this peer (``route_events`` with ``call_step``): to the first stop event, whose ``result``
    it returns; ``WorkflowFailed`` otherwise. A plain function returning the coroutine: no extra frame per
    call on the hot path."""

    def call(spec: StepSpec, event: dict[str, Any]) -> Coroutine[Any, Any, list[dict[str, Any]]]:
        return call_step(spec, event, ctx, executor)

    return route_events(index, start_event, call, ctx, on_event)
