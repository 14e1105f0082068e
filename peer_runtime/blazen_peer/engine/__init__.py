"""The transport-agnostic engine: step registry, event routing, run context, session refs."""

from .context import Context
from .refs import RefLifetime, SessionRefError, SessionRefHandle, SessionRefLimitError, SessionRefStore
from .registry import (
    START_EVENT,
    STOP_EVENT,
    StepRegistry,
    StepSpec,
    Workflow,
    default_registry,
    load_entrypoint,
    step,
)
from .runner import WorkflowFailed, run_workflow
from .service import PeerService

__all__ = [
    "START_EVENT",
    "STOP_EVENT",
    "Context",
    "PeerService",
    "RefLifetime",
    "SessionRefError",
    "SessionRefHandle",
    "SessionRefLimitError",
    "SessionRefStore",
    "StepRegistry",
    "StepSpec",
    "Workflow",
    "WorkflowFailed",
    "default_registry",
    "load_entrypoint",
    "run_workflow",
    "step",
]
