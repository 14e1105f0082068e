"""The benchmark's entrypoint: one echo step."""

from typing import Any

from blazen_peer import step


@step("bench::echo", accepts=["blazen::StartEvent"])
async def echo(event: dict, ctx: object) -> dict:
    return {"type": "blazen::StopEvent", "result": event["payload"]}


# The split-run benchmark (bench/split.py): a two-step chain (hop1 -> hop2) or, with ``--hops 3``, a
# three-step one that comes back (hop1 -> back -> hop3: CPU -> GPU -> CPU), run in one peer or hop by hop.
@step("bench::hop1", accepts=["blazen::StartEvent"])
async def hop1(event: dict, ctx: Any) -> dict:
    if n := event.get("state_bytes"):  # what carrying a run's state between pools costs (--state-bytes)
        ctx.state["blob"] = "x" * n
    return {"type": "bench::Hop", "payload": event["payload"]}


@step("bench::hop2", accepts=["bench::Hop"])
async def hop2(event: dict, ctx: object) -> dict:
    return {"type": "blazen::StopEvent", "result": event["payload"]}


@step("bench::back", accepts=["bench::Hop"])
async def back(event: dict, ctx: Any) -> dict:
    ctx.state["back"] = True  # a small change to a state that may be large
    return {"type": "bench::Back", "payload": event["payload"]}


@step("bench::hop3", accepts=["bench::Back"])
async def hop3(event: dict, ctx: object) -> dict:
    return {"type": "blazen::StopEvent", "result": event["payload"]}
