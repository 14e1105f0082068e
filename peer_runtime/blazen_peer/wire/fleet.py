"""``blazen.fleet.v1.Fleet``: the router's own calls to the peers (docs/router.md).

``Describe``: what a peer serves. ``RunStep`` / ``EndRun``: one step of a sub-workflow split over pools,
and the end of such a run on a peer that ran a step of it.

``Describe``'s request is the empty message; the reply is the usual envelope (``0a <len> <bytes>``) around a
JSON object. JSON rather than postcard: the call is off the hot path (a router asks each replica every few
seconds), the body is a nested map that grows fields over time, and an operator can read it with
``grpcurl``. Unknown keys are ignored, missing ones take their defaults, so either side may be newer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import PeerError
from .messages import RemoteRefDescriptor, _Message
from .postcard import Reader, Writer, parse_uuid, uuid_str
from .protocol import ENVELOPE_VERSION

__all__ = [
    "Description",
    "DescriptionError",
    "EndRunRequest",
    "EndRunResponse",
    "RunStepRequest",
    "RunStepResponse",
    "state_size",
]


class DescriptionError(PeerError, ValueError):
    """A ``Describe`` reply that is not the JSON object described above."""


@dataclass(frozen=True)
class Description:
    node_id: str
    #: served step id -> the event types it accepts (empty when the registry does not know them).
    steps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: workflow name -> its default step ids (what an empty ``step_ids`` runs).
    workflows: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: calls the peer's admission holds right now.
    in_flight: int = 0
    ready: bool = True
    #: the peer runs single steps for a fleet router (``RunStep``; it was told who the router is).
    run_steps: bool = False
    #: the peer keeps a run's state between its steps and takes ``RunStep`` state as a delta from it.
    state_deltas: bool = False

    def encode(self) -> bytes:
        return json.dumps(
            {
                "node_id": self.node_id,
                "steps": [{"id": s, "accepts": list(a)} for s, a in self.steps.items()],
                "workflows": {w: list(ids) for w, ids in self.workflows.items()},
                "in_flight": self.in_flight,
                "ready": self.ready,
                "run_steps": self.run_steps,
                "state_deltas": self.state_deltas,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Description:
        try:
            obj: Any = json.loads(raw)
            steps = {str(s["id"]): tuple(str(a) for a in s.get("accepts", ())) for s in obj.get("steps", ())}
            workflows = {str(w): tuple(str(i) for i in ids) for w, ids in obj.get("workflows", {}).items()}
            return cls(
                node_id=str(obj.get("node_id", "")),
                steps=steps,
                workflows=workflows,
                in_flight=int(obj.get("in_flight", 0)),
                ready=bool(obj.get("ready", True)),
                run_steps=bool(obj.get("run_steps", False)),
                state_deltas=bool(obj.get("state_deltas", False)),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DescriptionError(f"malformed Describe reply: {exc}") from None


# -- RunStep / EndRun --------------------------------------------------------------------------------------
# Postcard, like the BlazenPeer payloads: these are on a split run's hot path (one per step), and they carry
# JSON bytes (the event, each state value) that must reach the other side byte for byte, so that a split
# run's ``state_json`` and events are the very bytes one peer would have written.


def state_size(state: dict[str, bytes]) -> int:
    """The bytes of a run's state as RunStep carries it (keys and JSON values): what keeping or sending it
    costs."""
    return sum(len(k) + len(v) for k, v in state.items())


def _write_state(w: Writer, state: dict[str, bytes]) -> None:
    w.usize(len(state))
    for k, v in state.items():
        w.str(k).bytes(v)


def _read_state(r: Reader) -> dict[str, bytes]:
    state: dict[str, bytes] = {}
    for _ in range(r.take_count()):
        k = r.take_str()
        state[k] = r.take_bytes()
    return state


class RunStepRequest(_Message):
    """Run ``step_id`` once on ``event_json`` (an event object) with the run's current state (key -> JSON
    value, as ``state_json``). ``run_id`` names the router's run: the steps a peer runs for one run share its
    session refs (``ctx.session_refs``) until ``EndRun``.

    ``seq`` (a router that takes state deltas; None from an older one, and then nothing follows the state
    on the wire): the request's number within the run; a peer that ``state_deltas`` may keep the state after
    this step under it. ``base``: ``state_json`` / ``state_deleted`` are then the change from the state the
    peer keeps after the run's step ``base`` - refused ``STATE_NOT_HELD`` before anything runs when the peer
    does not hold exactly that."""

    __slots__ = (
        "base",
        "envelope_version",
        "event_json",
        "run_id",
        "seq",
        "state_deleted",
        "state_json",
        "step_id",
        "workflow_name",
    )

    def __init__(
        self,
        run_id: str,
        workflow_name: str,
        step_id: str,
        event_json: bytes,
        state_json: dict[str, bytes] | None = None,
        envelope_version: int = ENVELOPE_VERSION,
        *,
        seq: int | None = None,
        base: int | None = None,
        state_deleted: list[str] | None = None,
    ) -> None:
        self.envelope_version = envelope_version
        self.run_id = run_id
        self.workflow_name = workflow_name
        self.step_id = step_id
        self.event_json = event_json
        self.state_json = state_json if state_json is not None else {}
        self.seq = seq
        self.base = base
        self.state_deleted = state_deleted if state_deleted is not None else []

    def encode(self) -> bytes:
        w = Writer().u32(self.envelope_version).uuid(parse_uuid(self.run_id)).str(self.workflow_name)
        w.str(self.step_id).bytes(self.event_json)
        _write_state(w, self.state_json)
        if self.seq is not None:  # an older peer stops reading after the state
            w.u64(self.seq)
            if self.base is None:
                w.option_tag(False)
            else:
                w.option_tag(True).u64(self.base)
            w.usize(len(self.state_deleted))
            for k in self.state_deleted:
                w.str(k)
        return w.getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> RunStepRequest:
        r = Reader(buf)
        version = r.take_u32()
        run_id = uuid_str(r.take_uuid())
        name = r.take_str()
        step_id = r.take_str()
        event = r.take_bytes()
        state = _read_state(r)
        req = cls(run_id, name, step_id, event, state, version)
        if r.pos < len(buf):
            req.seq = r.take_u64()
            req.base = r.take_option_u64()
            req.state_deleted = [r.take_str() for _ in range(r.take_count())]
        return req


class RunStepResponse(_Message):
    """What the step did: the events it emitted (JSON each, in order), the state keys it set or changed
    (``state_set``) and removed (``state_deleted``) - a delta, not the whole state - or ``error`` (the text
    after ``workflow error: ``, as one peer would report the run failing in this step). ``keeps_run``: the
    peer holds something of the run (session refs, a step still running) until ``EndRun``; False lets the
    router skip that call when no other step of the run ran there. ``state_kept``: the peer keeps the state
    after this step (under the request's ``seq``) until ``EndRun``, for the run's next step here to send a
    delta; written only when True (an older router never asks for it)."""

    __slots__ = (
        "envelope_version",
        "error",
        "events_json",
        "keeps_run",
        "state_deleted",
        "state_kept",
        "state_set",
    )

    def __init__(
        self,
        events_json: list[bytes] | None = None,
        state_set: dict[str, bytes] | None = None,
        state_deleted: list[str] | None = None,
        error: str | None = None,
        keeps_run: bool = True,
        envelope_version: int = ENVELOPE_VERSION,
        state_kept: bool = False,
    ) -> None:
        self.envelope_version = envelope_version
        self.keeps_run = keeps_run
        self.state_kept = state_kept
        self.events_json = events_json if events_json is not None else []
        self.state_set = state_set if state_set is not None else {}
        self.state_deleted = state_deleted if state_deleted is not None else []
        self.error = error

    def encode(self) -> bytes:
        w = Writer().u32(self.envelope_version).usize(len(self.events_json))
        for ev in self.events_json:
            w.bytes(ev)
        _write_state(w, self.state_set)
        w.usize(len(self.state_deleted))
        for k in self.state_deleted:
            w.str(k)
        if self.error is None:
            w.option_tag(False)
        else:
            w.option_tag(True).str(self.error)
        w.bool(self.keeps_run)
        if self.state_kept:
            w.bool(True)
        return w.getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> RunStepResponse:
        r = Reader(buf)
        version = r.take_u32()
        events = [r.take_bytes() for _ in range(r.take_count())]
        state = _read_state(r)
        deleted = [r.take_str() for _ in range(r.take_count())]
        error = r.take_option_str()
        keeps = r.take_bool()
        kept = r.take_bool() if r.pos < len(buf) else False
        return cls(events, state, deleted, error, keeps, version, kept)


class EndRunRequest(_Message):
    """The run is over: drop its ``UntilContextDrop`` refs on this peer, close it to inserts."""

    __slots__ = ("envelope_version", "run_id")

    def __init__(self, run_id: str, envelope_version: int = ENVELOPE_VERSION) -> None:
        self.envelope_version = envelope_version
        self.run_id = run_id

    def encode(self) -> bytes:
        return Writer().u32(self.envelope_version).uuid(parse_uuid(self.run_id)).getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> EndRunRequest:
        r = Reader(buf)
        version = r.take_u32()
        return cls(uuid_str(r.take_uuid()), version)


class EndRunResponse(_Message):
    """The run's surviving, derefable refs on this peer (``remote_refs`` entries, origin = this peer)."""

    __slots__ = ("envelope_version", "remote_refs")

    def __init__(
        self,
        remote_refs: dict[str, RemoteRefDescriptor] | None = None,
        envelope_version: int = ENVELOPE_VERSION,
    ) -> None:
        self.envelope_version = envelope_version
        self.remote_refs = remote_refs if remote_refs is not None else {}

    def encode(self) -> bytes:
        w = Writer().u32(self.envelope_version).usize(len(self.remote_refs))
        for key, desc in self.remote_refs.items():
            w.uuid(parse_uuid(key))
            desc.write(w)
        return w.getvalue()

    @classmethod
    def decode(cls, buf: bytes) -> EndRunResponse:
        r = Reader(buf)
        version = r.take_u32()
        refs: dict[str, RemoteRefDescriptor] = {}
        for _ in range(r.take_count()):
            key = uuid_str(r.take_uuid())
            refs[key] = RemoteRefDescriptor.read(r)
        return cls(refs, version)
