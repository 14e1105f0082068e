"""Example Blazen workflow steps.

``blazen-peer serve --entrypoint blazen_examples.steps`` imports :mod:`blazen_examples.steps`, which registers
every step with the runtime.
"""

STEP_IDS = (
    "examples::echo",
    "examples::tokenize",
    "examples::count",
    "examples::remember",
    "examples::gpu_info",
    "examples::where",
    "examples::extract",
    "examples::embed",
    "examples::index",
)

__all__ = ["STEP_IDS"]
