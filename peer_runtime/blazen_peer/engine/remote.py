"""The peer's side of a sub-workflow split over pools (docs/router.md): a router runs Blazen's event routing
itself and asks a replica to run ONE step (``blazen.fleet.v1.Fleet/RunStep``), then ends the run on every
replica that ran one (``EndRun``).

One step runs exactly as inside ``PeerService.invoke`` (``runner.call_step``: the same executor, the same
failure texts, the same limits), with a ``Context`` whose ``state`` is the run's current state and whose
session refs belong to the router's run: the steps a replica runs for one run share them, and its
``UntilContextDrop`` refs live until ``EndRun`` - or, should the router never send it (it died), until the
run has been idle ``idle_secs``. A run ended here refuses further steps (a step arriving late, after its run
was cancelled, must not open it again).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable

from ..wire.errors import PeerStatusError, Status
from ..wire.fleet import RunStepRequest, RunStepResponse
from ..wire.messages import RemoteRefDescriptor
from .context import Context
from .executor import StepWorkersSaturated
from .refs import SessionRefLimitError, next_run_id
from .runner import WorkflowFailed, call_step
from .service import PeerService, Unencodable, check_version

__all__ = ["RemoteRuns"]

#: a run whose router never ended it is ended this long after its last step here (a router that died).
IDLE_SECS = 3600.0
#: ended run ids remembered, so that a step of an ended run is refused (least recently ended go first).
ENDED_MEMORY = 10_000


class _Run:
    __slots__ = ("contexts", "last", "local_id", "running")

    def __init__(self, now: float) -> None:
        self.local_id = next_run_id()
        self.contexts: list[Context] = []
        self.running = 0
        self.last = now


class RemoteRuns:
    def __init__(
        self,
        service: PeerService,
        *,
        idle_secs: float = IDLE_SECS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.idle_secs = idle_secs
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    async def run_step(self, req: RunStepRequest, *, caller_node_id: str | None = None) -> RunStepResponse:
        """Run one step; a step failure is the response's ``error``, a cap the step hit is
        ``PeerStatusError`` RESOURCE_EXHAUSTED, as for a whole run."""
        service = self.service
        check_version(req.envelope_version)
        spec = service._spec(req.step_id)
        if spec is None:
            raise PeerStatusError(Status.NOT_FOUND, f"unknown step id `{req.step_id}`")
        if req.run_id in self._ended:
            raise PeerStatusError(Status.FAILED_PRECONDITION, f"run {req.run_id} has ended")
        try:
            event = json.loads(req.event_json.decode("utf-8"))
            state = {k: json.loads(v.decode("utf-8")) for k, v in req.state_json.items()}
        except (ValueError, RecursionError) as exc:
            raise PeerStatusError(Status.INVALID_ARGUMENT, f"invalid event or state JSON: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise PeerStatusError(Status.INVALID_ARGUMENT, 'an event is a JSON object with a string "type"')
        run = self._runs.get(req.run_id)
        if run is None:
            run = self._runs[req.run_id] = _Run(self._clock())
        ctx = Context(service.refs, run.local_id, service.node_id, req.workflow_name, caller_node_id)
        ctx.state = state
        run.contexts.append(ctx)
        run.running += 1
        try:
            outs = await call_step(spec, event, ctx, service.executor)
            events = [service.encode_event(spec.step_id, ev, ctx) for ev in outs]
            state_set, deleted = self._delta(req.state_json, ctx)
        except WorkflowFailed as exc:
            return RunStepResponse(error=str(exc), keeps_run=self._keeps(req.run_id, run))
        except Unencodable as exc:
            error = f"result is not JSON-serializable: {exc}"
            return RunStepResponse(error=error, keeps_run=self._keeps(req.run_id, run))
        except (SessionRefLimitError, StepWorkersSaturated) as exc:
            raise PeerStatusError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        finally:
            run.running -= 1
            run.last = self._clock()
        return RunStepResponse(events, state_set, deleted, keeps_run=self._keeps(req.run_id, run))

    def _keeps(self, run_id: str, run: _Run) -> bool:
        """After a step that returned: a run holding no refs and running no step here is forgotten at once
        (most runs: the router then needs no ``EndRun`` here); else it is kept until ``EndRun``."""
        if run.running or any(ctx.opened_refs for ctx in run.contexts):
            return True
        if self._runs.get(run_id) is run:
            del self._runs[run_id]
        for ctx in run.contexts:
            ctx.end()  # nothing to drop; closes it to inserts, as the end of the run would
        return False

    def _delta(self, before: dict[str, bytes], ctx: Context) -> tuple[dict[str, bytes], list[str]]:
        """The state keys the step set or changed (their JSON, as ``state_json`` carries it) and the ones it
        removed: only these travel back, not the whole state."""
        encode = self.service.encode_json
        after = {str(k): v for k, v in ctx.state.items()}
        state_set: dict[str, bytes] = {}
        for k, v in after.items():
            raw = encode(v, ctx)
            if before.get(k) != raw:
                state_set[k] = raw
        return state_set, [k for k in before if k not in after]

    def end_run(self, run_id: str) -> dict[str, RemoteRefDescriptor]:
        """End the run here (its ``UntilContextDrop`` refs go, its steps still running can insert no
        more) and return its surviving refs. Idempotent; a run that never ran here is remembered as ended."""
        self._remember_ended(run_id)
        run = self._runs.pop(run_id, None)
        if run is None:
            return {}
        node = self.service.node_id
        refs: dict[str, RemoteRefDescriptor] = {}
        for ctx in run.contexts:
            for key, tag, created in ctx.end():
                refs[key] = RemoteRefDescriptor(node, tag, created)
        return refs

    def _remember_ended(self, run_id: str) -> None:
        ended = self._ended
        ended[run_id] = None
        ended.move_to_end(run_id)
        while len(ended) > ENDED_MEMORY:
            ended.popitem(last=False)

    def sweep(self) -> int:
        """End the runs idle here for ``idle_secs`` with no step running; returns how many."""
        limit = self._clock() - self.idle_secs
        stale = [rid for rid, run in self._runs.items() if run.running == 0 and run.last <= limit]
        for rid in stale:
            self.end_run(rid)
        return len(stale)
