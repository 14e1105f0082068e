"""The peer's side of a sub-workflow split over pools (docs/router.md): a router runs Blazen's event routing
itself and asks a replica to run ONE step (``blazen.fleet.v1.Fleet/RunStep``), then ends the run on every
replica that ran one (``EndRun``).

One step runs exactly as inside ``PeerService.invoke`` (``runner.call_step``: the same executor, the same
failure texts, the same limits), with a ``Context`` whose ``state`` is the run's current state and whose
session refs belong to the router's run: the steps a replica runs for one run share them, and its
``UntilContextDrop`` refs live until ``EndRun`` - or, should the router never send it (it died), until the
run has been idle ``idle_secs``. A run ended here refuses further steps (a step arriving late, after its run
was cancelled, must not open it again).

State deltas: when the router numbers its steps (``seq``) and the state after a step is at least
``STATE_KEEP_MIN_BYTES``, the replica keeps that state (its JSON per key) until ``EndRun`` or the idle
bound, so that the run's next step here carries only what changed since (``base``). All runs' kept states
together stay within ``state_budget`` bytes: a state that does not fit is not kept (the router then sends
whole state, as to an older peer). A delta from a state not held here (restarted, not kept, another step of
the run kept since) is refused ``STATE_NOT_HELD`` before the step runs.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable

from ..wire.errors import PeerStatusError, Status
from ..wire.fleet import RunStepRequest, RunStepResponse, state_size
from ..wire.messages import RemoteRefDescriptor
from ..wire.protocol import STATE_NOT_HELD
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
#: a state smaller than this is not kept: resending it costs less than the EndRun that frees it.
STATE_KEEP_MIN_BYTES = 64 * 1024
#: default bound of all kept run states together (``--split-state-cache-bytes``).
STATE_BUDGET = 256 * 1024 * 1024


class _Run:
    __slots__ = ("contexts", "last", "local_id", "running", "state", "state_bytes", "state_seq")

    def __init__(self, now: float) -> None:
        self.local_id = next_run_id()
        self.contexts: list[Context] = []
        self.running = 0
        self.last = now
        #: the state kept after the run's step ``state_seq`` here (None: none kept), and its size
        self.state: dict[str, bytes] | None = None
        self.state_seq = 0
        self.state_bytes = 0


class RemoteRuns:
    def __init__(
        self,
        service: PeerService,
        *,
        idle_secs: float = IDLE_SECS,
        state_budget: int = STATE_BUDGET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.idle_secs = idle_secs
        self.state_budget = state_budget
        #: bytes of all kept states
        self.state_bytes = 0
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
        run = self._runs.get(req.run_id)
        before = req.state_json
        if req.base is not None:
            if run is None or run.state is None or run.state_seq != req.base:
                raise PeerStatusError(
                    Status.FAILED_PRECONDITION, f"{STATE_NOT_HELD}: run {req.run_id} after step {req.base}"
                )
            before = {**run.state, **req.state_json}
            for key in req.state_deleted:
                before.pop(key, None)
        try:
            event = json.loads(req.event_json.decode("utf-8"))
            state = {k: json.loads(v.decode("utf-8")) for k, v in before.items()}
        except (ValueError, RecursionError) as exc:
            raise PeerStatusError(Status.INVALID_ARGUMENT, f"invalid event or state JSON: {exc}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise PeerStatusError(Status.INVALID_ARGUMENT, 'an event is a JSON object with a string "type"')
        if run is None:
            run = self._runs[req.run_id] = _Run(self._clock())
        self._keep_state(run, None, 0)  # a step of the run may change it: only its outcome is kept
        ctx = Context(service.refs, run.local_id, service.node_id, req.workflow_name, caller_node_id)
        ctx.state = state
        run.contexts.append(ctx)
        run.running += 1
        try:
            outs = await call_step(spec, event, ctx, service.executor)
            events = [service.encode_event(spec.step_id, ev, ctx) for ev in outs]
            after, state_set, deleted = self._delta(before, ctx)
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
        kept = req.seq is not None and self._keep_state(run, after, req.seq)
        keeps = self._keeps(req.run_id, run)
        return RunStepResponse(events, state_set, deleted, keeps_run=keeps, state_kept=kept)

    def _keep_state(self, run: _Run, state: dict[str, bytes] | None, seq: int) -> bool:
        """Keep ``state`` as the run's state after its step ``seq`` here, if it is worth it and fits the
        budget; forget the previous one either way. None forgets."""
        self.state_bytes -= run.state_bytes
        run.state, run.state_bytes = None, 0
        if state is None:
            return False
        size = state_size(state)
        if size < STATE_KEEP_MIN_BYTES or self.state_bytes + size > self.state_budget:
            return False
        run.state, run.state_seq, run.state_bytes = state, seq, size
        self.state_bytes += size
        return True

    def _keeps(self, run_id: str, run: _Run) -> bool:
        """After a step that returned: a run holding no refs, no state and running no step here is forgotten
        at once (most runs: the router then needs no ``EndRun`` here); else it is kept until ``EndRun``.
        True: the run holds refs here or runs a step (the router must await ``EndRun`` for the run's refs)."""
        if run.running or any(ctx.opened_refs for ctx in run.contexts):
            return True
        if run.state is not None:
            return False
        if self._runs.get(run_id) is run:
            del self._runs[run_id]
        for ctx in run.contexts:
            ctx.end()  # nothing to drop; closes it to inserts, as the end of the run would
        return False

    def _delta(
        self, before: dict[str, bytes], ctx: Context
    ) -> tuple[dict[str, bytes], dict[str, bytes], list[str]]:
        """The state after the step (JSON per key), the keys the step set or changed and the ones it
        removed: only these travel back, not the whole state."""
        encode = self.service.encode_json
        after = {str(k): encode(v, ctx) for k, v in ctx.state.items()}
        state_set = {k: raw for k, raw in after.items() if before.get(k) != raw}
        return after, state_set, [k for k in before if k not in after]

    def end_run(self, run_id: str) -> dict[str, RemoteRefDescriptor]:
        """End the run here (its ``UntilContextDrop`` refs go, its steps still running can insert no
        more) and return its surviving refs. Idempotent; a run that never ran here is remembered as ended."""
        self._remember_ended(run_id)
        run = self._runs.pop(run_id, None)
        if run is None:
            return {}
        self._keep_state(run, None, 0)
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
