"""The benchmark's entrypoint: one echo step."""

from typing import Any

from blazen_peer import step


@step("bench::echo", accepts=["blazen::StartEvent"])
async def echo(event: dict, ctx: object) -> dict:
    return {"type": "blazen::StopEvent", "result": event["payload"]}


# The split-run benchmark (bench/split.py): a two-step chain, run in one peer or hop by hop over two pools.
@step("bench::hop1", accepts=["blazen::StartEvent"])
async def hop1(event: dict, ctx: Any) -> dict:
    if n := event.get("state_bytes"):  # what carrying a run's state between pools costs (--state-bytes)
        ctx.state["blob"] = "x" * n
    return {"type": "bench::Hop", "payload": event["payload"]}


@step("bench::hop2", accepts=["bench::Hop"])
async def hop2(event: dict, ctx: object) -> dict:
    return {"type": "blazen::StopEvent", "result": event["payload"]}
