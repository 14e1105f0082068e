"""``python -m tests.fuzz --inputs 100000 [--seed N] [--targets decoder,grpc,http]``: a recorded fuzz run.

Prints one JSON summary per target (inputs, seconds, outcomes, findings) and exits 1 on any finding."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import platform
import sys

from tests.fuzz.fuzzers import run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz")
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--targets", default="decoder,grpc,http")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("blazen_peer").setLevel(logging.ERROR)
    started = dt.datetime.now(dt.UTC)
    reports = asyncio.run(run_all(args.inputs, args.seed, tuple(args.targets.split(","))))
    out = {
        "date": started.isoformat(timespec="seconds"),
        "seed": args.seed,
        "python": platform.python_version(),
        "reports": [r.summary() for r in reports],
        "total_inputs": sum(r.inputs for r in reports),
        "total_findings": sum(len(r.findings) for r in reports),
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 1 if out["total_findings"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
