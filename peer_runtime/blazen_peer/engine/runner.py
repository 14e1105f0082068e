"""Event-type routing, as Blazen runs a sub-workflow.

The start event goes to every step that accepts ``blazen::StartEvent``; each step's output events go to every
step
that accepts their type, and so on. A ``blazen::StopEvent`` ends the run with its ``result``. Events pending
at the
same time are handled concurrently (one "wave"); an event type nobody accepts fails the run. Async handlers
run
on the event loop; plain ``def`` handlers run in the executor, so a CPU-heavy step does not stall other calls.

A step's exception fails the run as ``WorkflowFailed`` (Blazen's step failure), except
``SessionRefLimitError`` escaping a step: a full session-ref cache is a resource limit, not a bug in the
step, so it propagates unchanged and the service answers RESOURCE_EXHAUSTED / 429. A step that catches it
carries on as usual.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from .refs import SessionRefLimitError
from .registry import STOP_EVENT, StepSpec

EventSink = Callable[[str, dict, Any], None]


class WorkflowFailed(Exception):
    """The run failed; ``str()`` is the Display text that follows ``workflow error: ``."""


def _normalize(spec: StepSpec, out: Any) -> list[dict]:
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


async def _call(spec: StepSpec, event: dict, ctx: Any, executor: Executor | None) -> list[dict]:
    try:
        if spec.is_async:
            out = await spec.handler(event, ctx)
        else:
            # In the caller's context, so that log records carry its caller node id and request id.
            run = contextvars.copy_context().run
            out = await asyncio.get_running_loop().run_in_executor(executor, run, spec.handler, event, ctx)
            if asyncio.iscoroutine(out):
                out = await out
    except (WorkflowFailed, SessionRefLimitError):
        raise  # a cap hit the step did not handle is the call's answer (see the module docstring)
    except Exception as exc:
        raise WorkflowFailed(f"step '{spec.step_id}' failed: {exc}") from exc
    return _normalize(spec, out)


async def run_workflow(
    index: dict[str, list[StepSpec]],
    start_event: dict,
    ctx: Any,
    executor: Executor | None = None,
    on_event: EventSink | None = None,
) -> Any:
    """Run to the first stop event and return its ``result``; raise ``WorkflowFailed`` otherwise."""
    pending = [start_event]
    while pending:
        for ev in pending:
            if ev["type"] == STOP_EVENT:
                return ev.get("result")
        jobs: list[tuple[StepSpec, dict]] = []
        for ev in pending:
            specs = index.get(ev["type"])
            if not specs:
                raise WorkflowFailed(f"no handler for event type: {ev['type']}")
            for spec in specs:
                jobs.append((spec, ev))
        if len(jobs) == 1:
            spec, ev = jobs[0]
            pending = await _call(spec, ev, ctx, executor)
            if on_event is not None:
                for out in pending:
                    on_event(spec.step_id, out, ctx)
            continue
        tasks = [asyncio.ensure_future(_call(spec, ev, ctx, executor)) for spec, ev in jobs]
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
                    on_event(spec.step_id, out, ctx)
            pending.extend(outs)
    raise WorkflowFailed(f"the run ended without a {STOP_EVENT}: no step emitted an event")
