"""Run the benchmark: ``python -m bench [--duration S] [--out FILE]`` (``make bench``).

Targets, all measured by the same ghz binary in the same run, at concurrency 1 and 32 over one connection:
  (a) Blazen's Rust server (the wheel's ``BlazenPeerServer``; it can only answer unknown-step requests),
  (b) a bare grpcio server that decodes the request and answers NOT_FOUND - the ceiling for Python grpcio,
  (c) our runtime on the same unknown-step path,
  (d) our runtime running a real echo sub-workflow,
  (e) for reference, the same bare handler as (b) on grpcio's synchronous thread-pool server,
  (g) ``blazen-peer route`` in front of the server of (d), same echo: what the router adds.
Each server's CPU time is read from /proc around its target's calls (per call: cpu_ms_per_call).
Each target is measured in several interleaved rounds; calls/s is the median round; the percentiles
pool all calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blazen_peer.wire import SubWorkflowRequest, wrap

from tests.support.blazen_wheel import blazen_env, build_isoc23_shim

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path(__file__).with_name("peer.proto")
CALL = "blazen.peer.v1.BlazenPeer.InvokeSubWorkflow"
CACHE_BIN = Path(os.environ.get("BLAZEN_FLEET_CACHE", Path.home() / ".cache/blazen-fleet")) / "bin"


def ghz_path() -> str:
    found = shutil.which("ghz") or (str(CACHE_BIN / "ghz") if (CACHE_BIN / "ghz").exists() else None)
    if found:
        return found
    subprocess.run([str(ROOT / "hack/build-ghz.sh")], check=True)
    return str(CACHE_BIN / "ghz")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, logdir: Path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server {proc.args[-2:]} exited with {proc.returncode}; its log is in {logdir}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on {port} did not start")


def pinned_to(cpu: int | None):
    """A ``preexec_fn`` binding the child to one CPU (None: no binding)."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(
    kind: str, shim: Path, logdir: Path, cpu: int | None, upstream: int | None = None
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    # The servers' stderr goes to a file: an unread pipe fills up and stalls the server mid-run.
    log = open(logdir / f"{kind}-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    env = blazen_env(shim) if kind == "blazen-rust" else dict(os.environ)
    if kind == "blazen-rust":
        # Blazen logs a WARN line per unknown-step call; ours logs nothing per call. Writing ~20k lines/s
        # (and flushing them while the next target runs) would tax the measurement, not the server.
        env["RUST_LOG"] = "error"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.servers", kind, str(port), *([str(upstream)] if upstream else [])],
        cwd=ROOT,
        env=env,
        stderr=log,
        stdout=log,
        preexec_fn=pinned_to(cpu),
    )
    try:
        wait_listening(port, proc, logdir)
    except RuntimeError:
        proc.kill()
        raise
    return proc, port


def ghz(
    binary: str, port: int, data: Path, concurrency: int, calls: int, cpu: int | None = None
) -> tuple[float, list[float], dict]:
    cmd = [
        binary,
        "--insecure",
        "--proto",
        str(PROTO),
        "--call",
        CALL,
        "--binary-file",
        str(data),
        "-c",
        str(concurrency),
        "--connections",
        "1",
        "-n",
        str(calls),
        "-t",
        "20s",
        "-O",
        "json",
        f"127.0.0.1:{port}",
    ]
    done = subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=600, preexec_fn=pinned_to(cpu)
    )
    report = json.loads(done.stdout)
    # ghz leaves failed calls out of its latency distribution, and (a)-(c) fail by design (NOT_FOUND):
    # take the latencies from the per-call details, the same way for every target.
    lat = [d["latency"] / 1e6 for d in report.get("details") or []]
    if not lat:
        raise RuntimeError(f"ghz reported no calls: {report.get('errorDistribution')}")
    return report["rps"], lat, report.get("statusCodeDistribution") or {}


def summarize(rounds: list[tuple[float, list[float], dict]], label: str) -> dict:
    rps = statistics.median(r[0] for r in rounds)
    lat = sorted(x for r in rounds for x in r[1])
    statuses: dict[str, int] = {}
    for r in rounds:
        for k, v in r[2].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "label": label,
        "rps": rps,
        "rps_rounds": [round(r[0]) for r in rounds],
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "calls": len(lat),
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--calls", type=int, default=1000, help="calls per measurement at concurrency 1 (x4 at 32)"
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let servers and ghz share every CPU (default: servers on CPU 0, ghz on CPU 1)",
    )
    parser.add_argument("--out", default=str(ROOT / ".work/bench.json"))
    args = parser.parse_args()

    binary = ghz_path()
    # On a small box the load generator and the server otherwise fight over the same cores, and where the
    # scheduler puts them moves a round's figure by +-20%: each server gets CPU 0, ghz CPU 1.
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    server_cpu, ghz_cpu = (0, 1) if pin else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="blazen-bench-"))
    shim = build_isoc23_shim(tmp)
    unknown = tmp / "unknown.bin"
    unknown.write_bytes(
        wrap(SubWorkflowRequest.new("bench", ["bench::missing"], {"payload": "x" * 64}).encode())
    )
    echo = tmp / "echo.bin"
    echo.write_bytes(wrap(SubWorkflowRequest.new("bench", ["bench::echo"], {"payload": "x" * 64}).encode()))

    targets = [
        ("a", "Blazen Rust server, unknown step", "blazen-rust", unknown),
        ("b", "bare grpcio, decode + NOT_FOUND", "bare-grpcio", unknown),
        ("c", "our runtime, unknown step", "ours", unknown),
        ("d", "our runtime, echo sub-workflow", "ours", echo),
        ("e", "reference: bare grpcio sync server", "bare-grpcio-sync", unknown),
        ("f", "experiment: our engine on grpcio sync server, echo", "ours-sync", echo),
        ("g", "blazen-peer route -> the server of (d), echo", "router", echo),
    ]
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    results: dict[str, dict] = {}
    try:
        for kind in dict.fromkeys(t[2] for t in targets):
            upstream = servers["ours"][1] if kind == "router" else None
            servers[kind] = start(kind, shim, tmp, server_cpu, upstream)
        cpu: dict[str, float] = {}
        load_before = os.getloadavg()
        for _, _, kind, data in targets:
            ghz(binary, servers[kind][1], data, 8, 500, ghz_cpu)  # warm-up
        raw: dict[str, list] = {}
        # Rounds interleave the targets, so a burst of background load hits all of them alike, and each round
        # starts one target later, so no target always runs right after the same neighbour.
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for conc in (1, 32):
                for key, label, kind, data in order:
                    calls = args.calls * (4 if conc > 1 else 1)
                    pid = servers[kind][0].pid
                    before = cpu_seconds(pid)
                    r = ghz(binary, servers[kind][1], data, conc, calls, ghz_cpu)
                    cpu[f"{key}@{conc}"] = cpu.get(f"{key}@{conc}", 0.0) + cpu_seconds(pid) - before
                    raw.setdefault(f"{key}@{conc}", []).append(r)
                    print(f"round {rnd + 1} ({key}) c={conc:<2} {r[0]:8.0f} calls/s  {label}", flush=True)
        for key, label, _, _ in targets:
            for conc in (1, 32):
                results[f"{key}@{conc}"] = summarize(raw[f"{key}@{conc}"], label)
                results[f"{key}@{conc}"]["cpu_ms_per_call"] = (
                    1000 * cpu[f"{key}@{conc}"] / results[f"{key}@{conc}"]["calls"]
                )
                # The box is shared: each round's ratio to (b), measured seconds apart, is steadier than the
                # ratio of medians. Report the median of the per-round ratios too.
                base = raw[f"b@{conc}"]
                ratios = [r[0] / b[0] for r, b in zip(raw[f"{key}@{conc}"], base, strict=True)]
                results[f"{key}@{conc}"]["rps_ratio_rounds"] = [round(x, 2) for x in ratios]
                results[f"{key}@{conc}"]["rps_ratio_median"] = statistics.median(ratios)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    load_after = os.getloadavg()
    print()
    when = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    before = "/".join(f"{x:.2f}" for x in load_before)
    after = "/".join(f"{x:.2f}" for x in load_after)
    print(
        f"date {when}, {os.cpu_count()} cpus, "
        f"{'servers on CPU 0, ghz on CPU 1' if pin else 'no CPU pinning'}, "
        f"Python {platform.python_version()}, load average (1/5/15 min) before {before}, after {after}"
    )
    print(
        "| target | conc | calls/s | p50 ms | p99 ms | calls/s vs (b) | per-round ratio | p50 vs (b) "
        "| server CPU ms/call |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for conc in (1, 32):
        base = results[f"b@{conc}"]
        for key in "abcdefg":
            r = results[f"{key}@{conc}"]
            cells = [
                f"({key}) {r['label']}",
                str(conc),
                f"{r['rps']:.0f}",
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['rps'] / base['rps']:.2f}",
                f"{r['rps_ratio_median']:.2f}",
                f"{r['p50_ms'] / base['p50_ms']:.2f}",
                f"{r['cpu_ms_per_call']:.3f}",
            ]
            print("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"results": results, "load_before": load_before, "load_after": load_after}, indent=1)
    )


if __name__ == "__main__":
    main()
