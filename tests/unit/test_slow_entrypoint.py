"""A peer whose steps take long to import (model weights, CUDA initialisation) is alive and starting, not
dead: the admin port answers while the entrypoint is imported (docs/writing-steps.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp

from tests.support.peers import http_get, spawn_peer, wait_ready
from tests.support.ports import free_port

SLOW_STEPS = """
import time

from blazen_peer import StepRegistry

time.sleep({secs})  # a model load
REG = StepRegistry()


@REG.step("slow::echo", accepts=["blazen::StartEvent"])
def echo(event, ctx):
    return {{"type": "blazen::StopEvent", "result": event}}
"""


async def _get(url: str) -> tuple[int, str] | None:
    with contextlib.suppress(aiohttp.ClientError, OSError):
        return await http_get(url)
    return None


async def test_the_admin_port_answers_while_the_entrypoint_is_imported(tmp_path):
    (tmp_path / "slow_steps.py").write_text(SLOW_STEPS.format(secs=4))
    admin = free_port()
    args = ["--entrypoint", "slow_steps:REG", "--insecure", "--grpc-addr", f"127.0.0.1:{free_port()}"]
    proc = await spawn_peer(tmp_path, [*args, "--admin-addr", f"127.0.0.1:{admin}"])
    try:
        started = time.monotonic()
        seen: list[tuple[float, str, int]] = []
        while time.monotonic() - started < 3:  # the import sleeps 4 s
            healthz, readyz = (
                await _get(f"http://127.0.0.1:{admin}/healthz"),
                await _get(f"http://127.0.0.1:{admin}/readyz"),
            )
            if healthz is not None and readyz is not None:
                seen.append((time.monotonic() - started, "healthz", healthz[0]))
                seen.append((time.monotonic() - started, "readyz", readyz[0]))
                assert json.loads(readyz[1])["reason"] == "starting"
            await asyncio.sleep(0.2)
        # Alive and not ready for the import's duration (the first second goes to the interpreter itself).
        assert [s for s in seen if s[1] == "healthz"], "the admin port did not answer during the import"
        assert {code for _, what, code in seen if what == "healthz"} == {200}
        assert {code for _, what, code in seen if what == "readyz"} == {503}
        await wait_ready(admin, proc)
        status, info = await http_get(f"http://127.0.0.1:{admin}/v1/info")
        assert status == 200
        assert json.loads(info)["steps"] == ["slow::echo"]
    finally:
        proc.kill()
        await proc.wait()
