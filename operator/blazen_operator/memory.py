"""Give the heap that passes freed back to the OS.

glibc keeps freed memory in its arenas (one per thread that allocated: the pass threads, the watch threads)
and returns it only from the top of each heap; after a burst of passes at 1,000 BlazenPeers most of the
operator's resident memory was such free space, counted as RSS although nothing used it. ``malloc_trim(0)``
releases the free pages of every arena. It runs at most every ``interval`` seconds and only when passes
completed since the last time: an idle operator's heap did not grow, so trimming it would only cost CPU.
Where libc has no ``malloc_trim`` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

INTERVAL = 10.0  # seconds between looks at the pass count


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


malloc_trim = _libc_malloc_trim()


class Trimmer:
    """Trims when the count of completed passes moved since it last looked."""

    def __init__(self, passes: Callable[[], int], trim: Callable[[int], int] | None = malloc_trim) -> None:
        self._passes = passes
        self._trim = trim
        self._seen = passes()
        self.trims = 0

    def tick(self) -> bool:
        """True when it trimmed."""
        now = self._passes()
        if self._trim is None or now == self._seen:
            return False
        self._seen = now
        self._trim(0)
        self.trims += 1
        return True


async def run(trimmer: Trimmer, interval: float = INTERVAL) -> None:
    while True:
        await asyncio.sleep(interval)
        # a trim walks every arena: in a worker thread (ctypes releases the GIL), not on the event loop
        await asyncio.to_thread(trimmer.tick)
