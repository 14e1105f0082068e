"""The steps the hostile-input suite serves (``--entrypoint hostile_steps:REG``): each one misbehaves in one
way a real step can. Counters live in this module, so a test reads them back through the ``probe`` step."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from blazen_peer import RefLifetime, SessionRefError, StepRegistry

REG = StepRegistry()
STOP = "blazen::StopEvent"
START = "blazen::StartEvent"
COUNTS: dict[str, int] = {}
LATE: list[str] = []
_lock = threading.Lock()


def _count(name: str) -> int:
    with _lock:
        COUNTS[name] = COUNTS.get(name, 0) + 1
        return COUNTS[name]


def stop(result: Any = None) -> dict:
    return {"type": STOP, "result": result}


@REG.step("echo")
async def echo(event: dict, ctx: Any) -> dict:
    return stop({k: v for k, v in event.items() if k != "type"})


@REG.step("sync_echo")
def sync_echo(event: dict, ctx: Any) -> dict:
    return stop({k: v for k, v in event.items() if k != "type"})


@REG.step("probe")
async def probe(event: dict, ctx: Any) -> dict:
    with _lock:
        return stop({"counts": dict(COUNTS), "late": list(LATE), "threads": threading.active_count()})


@REG.step("tally")
async def tally(event: dict, ctx: Any) -> dict:
    _count("tally")
    return {"type": "Tallied"}


@REG.step("tally_done", accepts=["Tallied"])
async def tally_done(event: dict, ctx: Any) -> dict:
    _count("tally_done")
    return stop("ok")


# -- failures of every kind ----------------------------------------------------------------------------


class Blob:
    def __init__(self, n: int) -> None:
        self.n = n

    def __blazen_serialize__(self) -> bytes:
        return b"b" * self.n


class BadBlob:
    def __blazen_serialize__(self) -> bytes:
        raise RuntimeError("cannot serialize this blob")


class ExitingBlob:
    def __blazen_serialize__(self) -> bytes:
        raise SystemExit(3)


def _deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


def _refs(ctx: Any, n: int) -> None:
    for i in range(n):
        ctx.session_refs.insert(f"scratch-{i}".encode())  # UntilContextDrop


RAISES: dict[str, BaseException] = {
    "system_exit": SystemExit(0),
    "keyboard_interrupt": KeyboardInterrupt(),
    "cancelled": asyncio.CancelledError(),
    "generator_exit": GeneratorExit(),
    "recursion": RecursionError("maximum recursion depth exceeded"),
}


@REG.step("raise")
async def raise_(event: dict, ctx: Any) -> dict:
    _refs(ctx, 2)
    raise RAISES[event["kind"]]


@REG.step("sync_raise")
def sync_raise(event: dict, ctx: Any) -> dict:
    _refs(ctx, 2)
    raise RAISES[event["kind"]]


@REG.step("recurse")
async def recurse(event: dict, ctx: Any) -> dict:
    def down(n: int) -> int:
        return down(n + 1) + 1

    return stop(down(0))


@REG.step("bad_result")
async def bad_result(event: dict, ctx: Any) -> dict:
    _refs(ctx, 2)
    kind = event["kind"]
    if kind == "serialize":
        return stop({"a": Blob(8), "z": BadBlob()})  # "a" becomes a ref before "z" fails
    if kind == "serialize_exit":
        return stop({"a": Blob(8), "z": ExitingBlob()})
    if kind == "nan":
        return stop({"x": float("nan")})
    if kind == "deep":
        return stop(_deep(100_000))
    return stop({"x": object()})


@REG.step("bad_event")
async def bad_event(event: dict, ctx: Any) -> list:
    _refs(ctx, 2)
    kind = event["kind"]
    if kind == "serialize":
        payload: Any = BadBlob()
    elif kind == "nan":
        payload = float("nan")
    elif kind == "deep":
        payload = _deep(100_000)
    else:
        payload = object()
    return [{"type": "Noise", "n": 1}, {"type": "Bad", "payload": payload}]


@REG.step("noise", accepts=["Noise", "Bad"])
async def noise(event: dict, ctx: Any) -> None:
    await asyncio.sleep(0.05)


# -- slow, stubborn and runaway steps ------------------------------------------------------------------


@REG.step("sleep")
async def sleep(event: dict, ctx: Any) -> dict:
    _refs(ctx, event.get("refs", 0))
    await asyncio.sleep(event.get("secs", 30))
    return stop("slept")


@REG.step("sync_sleep")
def sync_sleep(event: dict, ctx: Any) -> dict:
    _count("sync_sleep_started")
    time.sleep(event.get("secs", 30))
    _count("sync_sleep_finished")
    return stop("slept")


@REG.step("stubborn")
async def stubborn(event: dict, ctx: Any) -> dict:
    """Swallows every cancellation and keeps sleeping."""
    deadline = time.monotonic() + event.get("secs", 30)
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            _count("stubborn_cancelled")
    return stop("never")


@REG.step("fan")
async def fan(event: dict, ctx: Any) -> dict:
    return {"type": "Fanned", **{k: v for k, v in event.items() if k != "type"}}


@REG.step("fan_stubborn", accepts=["Fanned"])
async def fan_stubborn(event: dict, ctx: Any) -> dict:
    return await stubborn(event, ctx)


@REG.step("fan_sleep", accepts=["Fanned"])
async def fan_sleep(event: dict, ctx: Any) -> dict:
    await asyncio.sleep(event.get("secs", 30))
    return stop("slept")


@REG.step("spin")
async def spin(event: dict, ctx: Any) -> dict:
    """An async step that never awaits: it holds the event loop."""
    deadline = time.monotonic() + event.get("secs", 3600)
    while time.monotonic() < deadline:
        pass
    return stop("spun")


@REG.step("tick")
async def tick(event: dict, ctx: Any) -> dict:
    """Emits ``Tick`` events forever (each handled by ``tock``); COUNTS["tick"] says how far it got."""
    _count("tick")
    return {"type": "Tick", "pad": "x" * 1024}


@REG.step("tock", accepts=["Tick"])
async def tock(event: dict, ctx: Any) -> dict:
    _count("tick")
    return {"type": "Tick", "pad": event["pad"]}


# -- session refs --------------------------------------------------------------------------------------


@REG.step("refs_ok")
async def refs_ok(event: dict, ctx: Any) -> dict:
    _refs(ctx, event.get("refs", 3))
    return stop("ok")


@REG.step("refs_fail")
async def refs_fail(event: dict, ctx: Any) -> dict:
    _refs(ctx, event.get("refs", 3))
    raise ValueError("failed after inserting refs")


@REG.step("late_insert")
def late_insert(event: dict, ctx: Any) -> dict:
    """Outlives its run (timeout_secs < secs), then inserts a ref."""
    time.sleep(event.get("secs", 2))
    try:
        ctx.session_refs.insert(b"late", lifetime=RefLifetime[event.get("lifetime", "UntilContextDrop")])
    except SessionRefError as exc:
        with _lock:
            LATE.append(f"refused: {exc}")
    else:
        with _lock:
            LATE.append("accepted")
    return stop("late")


@REG.step("stubborn_chatty")
async def stubborn_chatty(event: dict, ctx: Any) -> list:
    """Swallows its cancellation, then emits more events than a stream queues."""
    await stubborn(event, ctx)
    return [{"type": "Noise", "n": i} for i in range(200)]
