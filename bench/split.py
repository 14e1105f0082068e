"""The cost of a split run (docs/router.md, "Split runs"): ``python -m bench.split [--calls N] [--rounds R]``
(``make bench`` runs it after the main benchmark).

The same two-step chain (``bench::hop1`` -> ``bench::hop2``, a 64-byte payload carried along; with
``--state-bytes N`` hop1 also puts N bytes into ``ctx.state``), measured with ghz over one connection at
concurrency 1 and 32:
  (s1) sent straight to one peer that serves both steps;
  (s2) through ``blazen-peer route`` to that peer (one pool serves both: one forwarded call);
  (s3) through ``blazen-peer route`` over two pools, one step each: the router runs the events itself, two
       RunStep hops (no EndRun: the steps keep no session refs).
With ``--hops 3`` the chain comes back (``hop1`` -> ``back`` -> ``hop3``; pool a serves hop1 and hop3, pool b
back): the third hop carries only what ``back`` changed in the state when the peers keep it (state deltas,
docs/router.md); ``--no-deltas`` makes the peers keep nothing (``--split-state-cache-bytes=0``), so whole
state travels on every hop, as before deltas.
Also the CPU time per call of the router and of the peers (from /proc). Rounds interleave the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from blazen_peer.wire import SubWorkflowRequest, wrap

from .__main__ import ROOT, cpu_seconds, free_port, ghz, ghz_path, pinned_to, wait_listening

TARGETS = {
    "s1": "the chain in one peer, direct",
    "s2": "router -> one pool serving both steps",
    "s3": "router -> split over two pools (one hop per step)",
}


def spawn(logdir: Path, cpu: int | None, kind: str, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(logdir / f"{kind}-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.servers", kind, str(port), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=log,
        preexec_fn=pinned_to(cpu),
    )
    wait_listening(port, proc, logdir)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.split")
    parser.add_argument(
        "--calls", type=int, default=1000, help="ghz calls per measurement at concurrency 1 (x4 at 32)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--state-bytes", type=int, default=0, help="bytes hop1 puts into the run's state")
    parser.add_argument("--hops", type=int, choices=(2, 3), default=2, help="steps of the chain")
    parser.add_argument("--no-deltas", action="store_true", help="the peers keep no run state: whole state")
    parser.add_argument("--out", default=str(ROOT / ".work/bench-split.json"))
    args = parser.parse_args()
    binary = ghz_path()
    pin = len(os.sched_getaffinity(0)) >= 2
    server_cpu, load_cpu = (0, 1) if pin else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="blazen-bench-split-"))
    body = tmp / "chain.bin"
    # pools a and b of (s3), and the peer serving the whole chain
    a_steps, b_steps = ("hop1", "hop2") if args.hops == 2 else ("hop1,hop3", "back")
    all_steps = f"{a_steps},{b_steps}"
    chain = ["bench::" + s for s in (("hop1", "hop2") if args.hops == 2 else ("hop1", "back", "hop3"))]
    peer_flags = ["--split-state-cache-bytes=0"] if args.no_deltas else []
    body.write_bytes(
        wrap(
            SubWorkflowRequest.new(
                "bench",
                chain,
                {"payload": "x" * 64, "state_bytes": args.state_bytes},
            ).encode()
        )
    )
    procs: list[subprocess.Popen] = []
    try:
        both, both_port = spawn(tmp, server_cpu, "chain-peer", all_steps, *peer_flags)
        one, one_port = spawn(tmp, server_cpu, "chain-peer", a_steps, *peer_flags)
        two, two_port = spawn(tmp, server_cpu, "chain-peer", b_steps, *peer_flags)
        procs += [both, one, two]
        r_one, r_one_port = spawn(tmp, server_cpu, "pools-router", f"all=127.0.0.1:{both_port}")
        r_split, r_split_port = spawn(
            tmp, server_cpu, "pools-router", f"a=127.0.0.1:{one_port}", f"b=127.0.0.1:{two_port}"
        )
        procs += [r_one, r_split]
        # target -> (port, router pid or None, peer pids)
        setup = {
            "s1": (both_port, None, [both.pid]),
            "s2": (r_one_port, r_one.pid, [both.pid]),
            "s3": (r_split_port, r_split.pid, [one.pid, two.pid]),
        }
        for port, _, _ in setup.values():  # warm-up
            ghz(binary, port, body, 8, 300, load_cpu)
        samples: dict[str, list[dict]] = {}
        keys = list(setup)
        for rnd in range(args.rounds):
            for conc in (1, 32):
                for key in keys[rnd % 3 :] + keys[: rnd % 3]:
                    port, router_pid, peers = setup[key]
                    calls = args.calls * (4 if conc > 1 else 1)
                    pids = [*peers, *([router_pid] if router_pid else [])]
                    before = {p: cpu_seconds(p) for p in pids}
                    rps, lat, statuses = ghz(binary, port, body, conc, calls, load_cpu)
                    used = {p: (cpu_seconds(p) - before[p]) * 1e6 / calls for p in pids}
                    if set(statuses) != {"OK"}:
                        raise RuntimeError(f"{key}: not every call succeeded: {statuses}")
                    samples.setdefault(f"{key}@{conc}", []).append(
                        {
                            "rps": rps,
                            "lat": lat,
                            "router_us": used.get(router_pid, 0.0) if router_pid else 0.0,
                            "peers_us": sum(used[p] for p in peers),
                        }
                    )
                    print(
                        f"round {rnd + 1} ({key}) c={conc:<2} {rps:7.0f} calls/s  {TARGETS[key]}", flush=True
                    )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    results = {}
    print()
    print("| target | conc | calls/s | p50 ms | p99 ms | router CPU us/call | peers CPU us/call |")
    print("|---|---|---|---|---|---|---|")
    for conc in (1, 32):
        for key in keys:
            rows = samples[f"{key}@{conc}"]
            lat = sorted(x for r in rows for x in r["lat"])
            res = {
                "label": TARGETS[key],
                "rps": statistics.median(r["rps"] for r in rows),
                "p50_ms": lat[len(lat) // 2],
                "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "router_us_per_call": statistics.median(r["router_us"] for r in rows),
                "peers_us_per_call": statistics.median(r["peers_us"] for r in rows),
            }
            results[f"{key}@{conc}"] = res
            print(
                f"| ({key}) {res['label']} | {conc} | {res['rps']:.0f} | {res['p50_ms']:.3f} "
                f"| {res['p99_ms']:.3f} | {res['router_us_per_call']:.0f} | {res['peers_us_per_call']:.0f} |"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
