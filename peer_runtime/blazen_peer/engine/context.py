"""The ``ctx`` object every step receives."""

from __future__ import annotations

from typing import Any

from .refs import RunRefs, SessionRefStore


class Context:
    """Per-run context.

    * ``state``: a dict; after the run its entries are exported (as JSON) into the response's ``state_json``.
    * ``session_refs``: insert values that stay on this peer (see ``RunRefs.insert``).
    * ``node_id``, ``workflow_name``, ``run_id``, ``caller_node_id`` (from ``X-Blazen-Peer-Node-Id`` or our
      client's metadata; None when the caller did not say).
    """

    __slots__ = ("_ended", "_refs", "_store", "caller_node_id", "node_id", "run_id", "state", "workflow_name")

    def __init__(
        self,
        store: SessionRefStore,
        run_id: int,
        node_id: str,
        workflow_name: str,
        caller_node_id: str | None,
    ) -> None:
        self._store = store
        self._refs: RunRefs | None = None
        self._ended = False
        self.run_id = run_id
        self.node_id = node_id
        self.workflow_name = workflow_name
        self.caller_node_id = caller_node_id
        self.state: dict[str, Any] = {}

    @property
    def session_refs(self) -> RunRefs:
        refs = self._refs
        if refs is None:
            # The run is opened in the store on first use (most runs never touch refs). ``_refs`` is set
            # before ``open_run`` checks ``_ended``, and ``end`` sets ``_ended`` before it reads ``_refs``:
            # whichever comes second sees the other, so a run ending meanwhile never stays open.
            refs = self._refs = RunRefs(self._store, self.run_id)
            self._store.open_run(self.run_id, self._has_ended)
        return refs

    @property
    def opened_refs(self) -> bool:
        """A step of this run used ``session_refs`` (the run may hold refs until it ends)."""
        return self._refs is not None

    def _has_ended(self) -> bool:
        return self._ended

    def end(self) -> list[tuple[str, str, int]]:
        """The run is over: its ``UntilContextDrop`` refs go and its steps can insert no more. Returns the
        surviving refs (``SessionRefStore.end_run``); idempotent."""
        self._ended = True
        if self._refs is None:
            return []
        return self._store.end_run(self.run_id)
