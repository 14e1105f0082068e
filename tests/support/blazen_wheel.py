"""Helpers shared by the interop tests and the benchmark: running the real ``blazen`` wheel on Debian 12.

The 0.6.74 wheel links three glibc 2.38 symbols (``__isoc23_strtol``, ``__isoc23_strtoll``,
``__isoc23_strtoull``) that glibc 2.36 lacks. ``build_isoc23_shim`` compiles a tiny library that aliases them
to
the classic functions; put it in ``LD_PRELOAD`` of the process that imports ``blazen`` (and only that one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

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
