"""``blazen.fleet.v1.Fleet/Describe``: what a peer serves, as a router learns it (docs/router.md).

The request is the empty message; the reply is the usual envelope (``0a <len> <bytes>``) around a JSON
object. JSON rather than postcard: the call is off the hot path (a router asks each replica every few
seconds), the body is a nested map that grows fields over time, and an operator can read it with
``grpcurl``. Unknown keys are ignored, missing ones take their defaults, so either side may be newer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import PeerError

__all__ = ["Description", "DescriptionError"]


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

    def encode(self) -> bytes:
        return json.dumps(
            {
                "node_id": self.node_id,
                "steps": [{"id": s, "accepts": list(a)} for s, a in self.steps.items()],
                "workflows": {w: list(ids) for w, ids in self.workflows.items()},
                "in_flight": self.in_flight,
                "ready": self.ready,
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
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DescriptionError(f"malformed Describe reply: {exc}") from None
