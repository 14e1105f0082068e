"""``LoopWatchdog``: ends the process when its event loop stops turning.

An async step that never awaits (a CPU loop, a blocking call) holds the event loop: every call, timeout,
health probe and signal handler waits behind it, and SIGTERM is never acted on. A heartbeat callback on the
loop records when the loop last ran; a daemon thread checks it. Once the loop has not run for
``stall_secs``, the thread logs one ERROR line with the loop thread's stack (which names the step) and exits
the process with ``EXIT_CODE``: the pod's container restarts, as after a failed liveness probe, but without
waiting for the kubelet's probes and grace period. The cost is one timer callback per ``interval``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
import traceback

log = logging.getLogger("blazen_peer.watchdog")

EXIT_CODE = 70  # EX_SOFTWARE


class LoopWatchdog:
    def __init__(self, loop: asyncio.AbstractEventLoop, stall_secs: float) -> None:
        if stall_secs <= 0:
            raise ValueError("stall_secs must be > 0")
        self.stall_secs = stall_secs
        self.interval = min(1.0, stall_secs / 4)
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="blazen-loop-watchdog", daemon=True)

    def start(self) -> None:
        """Call on the loop's own thread."""
        self._loop_thread = threading.get_ident()
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()

    def _beat(self) -> None:
        self._last = time.monotonic()
        self._timer = self._loop.call_later(self.interval, self._beat)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            stalled = time.monotonic() - self._last
            if stalled >= self.stall_secs and not self._stop.is_set():
                self._exit(stalled)

    def _exit(self, stalled: float) -> None:
        # Exit even if logging blocks (the loop thread may hold a handler's lock, or stderr may be full).
        threading.Timer(5.0, os._exit, (EXIT_CODE,)).start()
        frame = sys._current_frames().get(self._loop_thread)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "<no frame>\n"
        log.error(
            "event loop blocked for %.1f s (--loop-stall-secs %g): an async step that never awaits? "
            "Exiting with status %d so that the container restarts. The loop thread is at:\n%s",
            stalled,
            self.stall_secs,
            EXIT_CODE,
            stack.rstrip(),
        )
        logging.shutdown()  # flush the handlers: os._exit skips that
        os._exit(EXIT_CODE)
