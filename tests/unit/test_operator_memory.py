"""The operator hands freed heap back to the OS (memory.py, #16): ``malloc_trim(0)`` only after passes
completed since it last looked, so an idle operator does nothing."""

from __future__ import annotations

import asyncio
import platform

import pytest
from blazen_operator import memory


def test_an_idle_operator_never_trims() -> None:
    trims: list[int] = []
    passes = [0]
    trimmer = memory.Trimmer(lambda: passes[0], lambda pad: trims.append(pad) or 1)
    for _ in range(5):
        assert trimmer.tick() is False
    assert trims == []


def test_it_trims_once_per_look_after_passes_completed() -> None:
    trims: list[int] = []
    passes = [3]  # passes before the trimmer started do not count
    trimmer = memory.Trimmer(lambda: passes[0], lambda pad: trims.append(pad) or 1)
    assert trimmer.tick() is False
    passes[0] = 10
    assert trimmer.tick() is True
    assert trimmer.tick() is False  # nothing since
    passes[0] = 11
    assert trimmer.tick() is True
    assert trims == [0, 0]
    assert trimmer.trims == 2


def test_without_malloc_trim_it_does_nothing() -> None:
    passes = [0]
    trimmer = memory.Trimmer(lambda: passes[0], None)
    passes[0] = 5
    assert trimmer.tick() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibcs_malloc_trim_is_found_and_runs() -> None:
    # this box's Python runs on glibc: the real function, called as the operator calls it
    assert memory.malloc_trim is not None
    passes = [0]
    trimmer = memory.Trimmer(lambda: passes[0])
    passes[0] = 1
    assert trimmer.tick() is True


def test_the_loop_looks_every_interval() -> None:
    trims: list[int] = []
    passes = [0]
    trimmer = memory.Trimmer(lambda: passes[0], lambda pad: trims.append(pad) or 1)

    async def main() -> None:
        task = asyncio.create_task(memory.run(trimmer, interval=0.01))
        passes[0] = 1
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert trims == [0]
