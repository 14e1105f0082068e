"""The step registry, the ``@step`` decorator, ``Workflow`` default step sets, and entrypoint loading."""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

START_EVENT = "blazen::StartEvent"
STOP_EVENT = "blazen::StopEvent"

Handler = Callable[[dict[str, Any], Any], Any]


@dataclass(frozen=True, slots=True)
class StepSpec:
    step_id: str
    accepts: tuple[str, ...]
    handler: Handler
    is_async: bool


class StepRegistry:
    """step id -> ``StepSpec``, plus workflow name -> its default step ids. Thread-safe registration."""

    def __init__(self) -> None:
        self._steps: dict[str, StepSpec] = {}
        self._workflows: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def register(self, step_id: str, accepts: Iterable[str], handler: Handler) -> StepSpec:
        if not isinstance(step_id, str) or not step_id:
            raise ValueError("a step id is a non-empty string")
        if isinstance(accepts, str):
            accepts = [accepts]
        accepts_t = tuple(accepts)
        if not accepts_t or not all(isinstance(a, str) and a for a in accepts_t):
            raise ValueError(f"step {step_id!r}: accepts must list at least one event type name")
        if not callable(handler):
            raise TypeError(f"step {step_id!r}: handler is not callable")
        spec = StepSpec(step_id, accepts_t, handler, _is_async(handler))
        with self._lock:
            old = self._steps.get(step_id)
            if old is not None and (old.handler is not handler or old.accepts != accepts_t):
                raise ValueError(f"step id {step_id!r} is already registered with a different handler")
            self._steps[step_id] = spec
        return spec

    def step(self, step_id: str, accepts: Iterable[str] = (START_EVENT,)) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.register(step_id, accepts, fn)
            return fn

        return deco

    def add_to_workflow(self, workflow_name: str, step_id: str) -> None:
        with self._lock:
            ids = self._workflows.setdefault(workflow_name, [])
            if step_id not in ids:
                ids.append(step_id)

    def get(self, step_id: str) -> StepSpec | None:
        return self._steps.get(step_id)

    def step_ids(self) -> list[str]:
        return list(self._steps)

    def workflow_steps(self, workflow_name: str) -> list[str] | None:
        ids = self._workflows.get(workflow_name)
        return list(ids) if ids is not None else None

    def workflows(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._workflows.items()}

    def __contains__(self, step_id: object) -> bool:
        return step_id in self._steps

    def __len__(self) -> int:
        return len(self._steps)


def _is_async(handler: Handler) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - callable objects with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


#: The process-wide registry that ``@step`` and ``Workflow`` use unless given another.
default_registry = StepRegistry()


def step(
    step_id: str, accepts: Iterable[str] = (START_EVENT,), *, registry: StepRegistry | None = None
) -> Callable[[Handler], Handler]:
    """Register ``async def handler(event: dict, ctx)`` (or a plain ``def``) under ``step_id``."""
    return (default_registry if registry is None else registry).step(step_id, accepts)


class Workflow:
    """A named default step set. ``add_step`` registers the step and adds it to this workflow's set, which is
    used when a request names this workflow and sends an empty ``step_ids``."""

    def __init__(self, name: str, *, registry: StepRegistry | None = None) -> None:
        self.name = name
        self.registry = default_registry if registry is None else registry
        self.registry._workflows.setdefault(name, [])

    def add_step(self, step_id: str, accepts: Iterable[str], handler: Handler) -> Workflow:
        self.registry.register(step_id, accepts, handler)
        self.registry.add_to_workflow(self.name, step_id)
        return self

    def step(self, step_id: str, accepts: Iterable[str] = (START_EVENT,)) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add_step(step_id, accepts, fn)
            return fn

        return deco

    @property
    def step_ids(self) -> list[str]:
        return self.registry.workflow_steps(self.name) or []

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, steps={self.step_ids!r})"


def load_entrypoint(spec: str, registry: StepRegistry | None = None) -> StepRegistry:
    """Import ``module[:attr]``. Importing registers steps; ``attr`` may name a ``StepRegistry`` to serve, a
    ``Workflow`` (already registered), or a callable taking no arguments (or the registry) that registers
    steps."""
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise ValueError(f"invalid entrypoint {spec!r}: expected MODULE[:ATTR]")
    module = importlib.import_module(module_name)
    target_registry = default_registry if registry is None else registry
    if not attr:
        return target_registry
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, StepRegistry):
        return obj
    if isinstance(obj, Workflow):
        return obj.registry
    if callable(obj):
        params = inspect.signature(obj).parameters
        result = obj(target_registry) if params else obj()
        if inspect.isawaitable(result):
            raise TypeError(f"entrypoint {spec!r}: the registration callable must be synchronous")
        if isinstance(result, StepRegistry):
            return result
        return target_registry
    raise TypeError(f"entrypoint {spec!r}: {attr} is neither a StepRegistry, a Workflow nor a callable")
