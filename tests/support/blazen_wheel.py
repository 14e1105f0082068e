"""Helpers shared by the interop tests and the benchmark: running the real ``blazen`` wheel on Debian 12.

The 0.6.74 wheel links three glibc 2.38 symbols (``__isoc23_strtol``, ``__isoc23_strtoll``,
``__isoc23_strtoull``) that glibc 2.36 lacks. ``build_isoc23_shim`` compiles a tiny library that aliases them
to
the classic functions; put it in ``LD_PRELOAD`` of the process that imports ``blazen`` (and only that one).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

#: the interop driver: reads ``{"grpc", "http", "node_id", "ops"}`` on stdin, runs the ops with the real
#: ``blazen`` clients and prints their results as JSON.
DRIVER = Path(__file__).parents[1] / "interop" / "blazen_driver.py"

_SHIM_C = """
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
"""


def build_isoc23_shim(directory: str | os.PathLike[str]) -> Path:
    """Compile the shim into ``directory`` (with gcc or cc) and return the path of the shared library."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("building the glibc 2.38 symbol shim needs gcc or cc on PATH")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "isoc23_shim.c"
    lib = out / "libisoc23_shim.so"
    src.write_text(_SHIM_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True, capture_output=True)
    return lib


def blazen_env(shim: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a subprocess that imports the ``blazen`` wheel."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = f"{shim} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(shim)
    return env


async def run_driver(shim: Path, grpc_url: str, http_url: str, node_id: str, ops: list[dict]) -> list[Any]:
    """Run ``ops`` against a peer (or router) with the real ``blazen`` clients in a subprocess."""
    spec = {"grpc": grpc_url, "http": http_url, "node_id": node_id, "ops": ops}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DRIVER),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=blazen_env(shim),
    )
    out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), timeout=120)
    assert proc.returncode == 0, err.decode()
    result: list[Any] = json.loads(out)
    return result


#: How the wheel's gRPC transport (tonic over hyper and h2) reports a call it failed because the connection
#: received a graceful GOAWAY while the call was queued to it: hyper cancels what it had not yet written when
#: the connection closes, and h2 refuses a new stream once a GOAWAY arrived (or one above the GOAWAY's last
#: stream id, which the server promises it did not process). The server never ran such a call. grpc C-core
#: retries these transparently; tonic 0.x does not, so a Blazen caller sees a CANCELLED or INTERNAL error -
#: rarely, only in the microseconds around a GOAWAY (docs/operator.md, "What a rollout guarantees").
_GOAWAY_RACE_MARKS = ('hyper::Error(Canceled, "connection closed")', "kind: GoAway(")


def raced_a_goaway(message: str) -> bool:
    """Whether a ``blazen.PeerException`` message is the wheel's transport failing a call that never reached
    the server because it raced a graceful GOAWAY."""
    return message.startswith("tonic transport error") and any(m in message for m in _GOAWAY_RACE_MARKS)
