"""The benchmark's entrypoint: one echo step."""

from blazen_peer import step


@step("bench::echo", accepts=["blazen::StartEvent"])
async def echo(event: dict, ctx: object) -> dict:
    return {"type": "blazen::StopEvent", "result": event["payload"]}
