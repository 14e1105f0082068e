"""Run the benchmark: ``python -m bench [--calls N] [--rounds R] [--out FILE]`` (``make bench``).

Throughput comes from h2load (Debian's nghttp2-client: a few microseconds of its own CPU per call, so the
server saturates first), latency percentiles from ghz (which decodes every response, and spends tens of
microseconds per call doing it). Each measurement also records the server's CPU time per call (from /proc) and
the load generator's, so a saturated generator shows. Targets, at concurrency 1 and 32 over one connection:
  (a) Blazen's Rust server (the wheel's ``BlazenPeerServer``; it can only answer unknown-step requests),
  (b) a bare grpcio server that decodes the request and answers NOT_FOUND - the ceiling for Python grpcio,
  (c) our runtime on the same unknown-step path,
  (d) our runtime running a real echo sub-workflow,
  (e) for reference, the same bare handler as (b) on grpcio's synchronous thread-pool server,
  (f) experiment: our engine behind grpcio's synchronous server,
  (g) ``blazen-peer route`` in front of the server of (d), same echo: what the router adds (its default
      data plane, the Rust relay),
  (h) the same router with ``--data-plane grpcio`` (every call forwarded in Python, over grpc.aio),
  (i) experiment: a bare forwarder on grpc.aio (uvloop): the floor of a Python hop.
Each target is measured in several interleaved rounds; calls/s is the median round; the percentiles
pool all calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from blazen_peer.wire import SubWorkflowRequest, wrap

from tests.support.blazen_wheel import blazen_env, build_isoc23_shim

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path(__file__).with_name("peer.proto")
CALL = "blazen.peer.v1.BlazenPeer.InvokeSubWorkflow"
#: server kinds that forward to the server of (d)
FORWARDERS = {"router", "router-grpcio", "aio-forwarder"}
CACHE_BIN = Path(os.environ.get("BLAZEN_FLEET_CACHE", Path.home() / ".cache/blazen-fleet")) / "bin"


def ghz_path() -> str:
    found = shutil.which("ghz") or (str(CACHE_BIN / "ghz") if (CACHE_BIN / "ghz").exists() else None)
    if found:
        return found
    subprocess.run([str(ROOT / "hack/build-ghz.sh")], check=True)
    return str(CACHE_BIN / "ghz")


def h2load_path() -> str:
    found = shutil.which("h2load")
    if found:
        return found
    subprocess.run([str(ROOT / "hack/install-h2load.sh")], check=True)
    return shutil.which("h2load") or "h2load"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU of every child this process has waited for: the delta around one load-generator run is its own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed), as h2load sends it verbatim as the request body."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class Sample:
    rps: float
    server_us: float  # server CPU per call
    load_us: float  # load generator CPU per call
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict = field(default_factory=dict)


def measured(server_pid: int, calls: int, run) -> tuple[Any, float, float]:
    """Runs ``run()`` (one load-generator process) and returns its result with the server's and the load
    generator's CPU microseconds per call."""
    s0, l0 = cpu_seconds(server_pid), children_cpu_seconds()
    out = run()
    s1, l1 = cpu_seconds(server_pid), children_cpu_seconds()
    return out, (s1 - s0) * 1e6 / calls, (l1 - l0) * 1e6 / calls


def h2load(binary: str, port: int, body: Path, concurrency: int, calls: int, cpu: int | None) -> float:
    """calls/s over one HTTP/2 connection with ``concurrency`` streams in flight. h2load counts HTTP status,
    not grpc-status: ghz's status counts (same targets, same requests) show the gRPC outcome."""
    cmd = [
        binary,
        "-n",
        str(calls),
        "-c",
        "1",
        "-m",
        str(concurrency),
        "-t",
        "1",
        "-d",
        str(body),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        f"http://127.0.0.1:{port}/{CALL.replace('.InvokeSubWorkflow', '/InvokeSubWorkflow')}",
    ]
    done = subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=600, preexec_fn=pinned_to(cpu)
    )
    ok = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", done.stdout)
    rate = re.search(r"finished in [^,]+, ([\d.]+) req/s", done.stdout)
    if not ok or not rate or int(ok.group(1)) != calls:
        raise RuntimeError(f"h2load: not every call succeeded:\n{done.stdout[-2000:]}")
    return float(rate.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, logdir: Path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            what = cast(list[str], proc.args)[-2:]
            raise RuntimeError(f"server {what} exited with {proc.returncode}; its log is in {logdir}")
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


def summarize(throughput: list[Sample], latency: list[Sample], label: str) -> dict:
    lat = sorted(x for r in latency for x in r.latencies_ms)
    statuses: dict[str, int] = {}
    for r in latency:
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "label": label,
        "rps": statistics.median(r.rps for r in throughput),
        "rps_rounds": [round(r.rps) for r in throughput],
        "server_us_per_call": statistics.median(r.server_us for r in throughput),
        "h2load_us_per_call": statistics.median(r.load_us for r in throughput),
        "ghz_rps": statistics.median(r.rps for r in latency),
        "ghz_server_us_per_call": statistics.median(r.server_us for r in latency),
        "ghz_us_per_call": statistics.median(r.load_us for r in latency),
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "calls": len(lat),
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--calls",
        type=int,
        default=1000,
        help="ghz calls per measurement at concurrency 1 (x4 at 32); h2load makes 5x as many",
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let servers and the load generators share every CPU (default: servers on CPU 0, load on CPU 1)",
    )
    parser.add_argument(
        "--only", help="comma-separated target letters to measure (default: all); ratios need (b)"
    )
    parser.add_argument("--out", default=str(ROOT / ".work/bench.json"))
    args = parser.parse_args()

    ghz_binary, h2load_binary = ghz_path(), h2load_path()
    # On a small box the load generator and the server otherwise fight over the same cores, and where the
    # scheduler puts them moves a round's figure by +-20%: each server gets CPU 0, the load generator CPU 1.
    pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
    server_cpu, load_cpu = (0, 1) if pin else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="blazen-bench-"))
    shim = build_isoc23_shim(tmp)
    bodies: dict[str, tuple[Path, Path]] = {}  # step -> (protobuf message for ghz, gRPC frame for h2load)
    for step in ("bench::missing", "bench::echo"):
        message = wrap(SubWorkflowRequest.new("bench", [step], {"payload": "x" * 64}).encode())
        raw, framed = tmp / f"{step[7:]}.bin", tmp / f"{step[7:]}.h2"
        raw.write_bytes(message)
        framed.write_bytes(grpc_frame(message))
        bodies[step] = (raw, framed)
    unknown, echo = bodies["bench::missing"], bodies["bench::echo"]

    targets = [
        ("a", "Blazen Rust server, unknown step", "blazen-rust", unknown),
        ("b", "bare grpcio, decode + NOT_FOUND", "bare-grpcio", unknown),
        ("c", "our runtime, unknown step", "ours", unknown),
        ("d", "our runtime, echo sub-workflow", "ours", echo),
        ("e", "reference: bare grpcio sync server", "bare-grpcio-sync", unknown),
        ("f", "experiment: our engine on grpcio sync server, echo", "ours-sync", echo),
        ("g", "blazen-peer route (relay) -> the server of (d), echo", "router", echo),
        ("h", "blazen-peer route --data-plane grpcio -> (d), echo", "router-grpcio", echo),
        ("i", "experiment: bare grpc.aio forwarder -> (d), echo", "aio-forwarder", echo),
    ]
    if args.only:
        keys = set(args.only.split(","))
        targets = [t for t in targets if t[0] in keys]
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    results: dict[str, dict] = {}
    try:
        # the forwarders' upstream is the server of (d), started once for all of them
        kinds = dict.fromkeys(t[2] for t in targets)
        if kinds.keys() & FORWARDERS:
            kinds = {"ours": None, **kinds}
        for kind in kinds:
            upstream = servers["ours"][1] if kind in FORWARDERS else None
            servers[kind] = start(kind, shim, tmp, server_cpu, upstream)
        load_before = os.getloadavg()
        for _, _, kind, (raw, framed) in targets:  # warm-up
            ghz(ghz_binary, servers[kind][1], raw, 8, 500, load_cpu)
            h2load(h2load_binary, servers[kind][1], framed, 8, 2000, load_cpu)
        put: dict[str, list[Sample]] = {}
        lat: dict[str, list[Sample]] = {}
        # Rounds interleave the targets, so a burst of background load hits all of them alike, and each round
        # starts one target later, so no target always runs right after the same neighbour.
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for conc in (1, 32):
                for key, label, kind, (raw, framed) in order:
                    proc, port = servers[kind]
                    calls = args.calls * (4 if conc > 1 else 1)
                    rps, srv, load = measured(
                        proc.pid,
                        calls * 5,
                        lambda: h2load(h2load_binary, port, framed, conc, calls * 5, load_cpu),  # noqa: B023
                    )
                    put.setdefault(f"{key}@{conc}", []).append(Sample(rps, srv, load))
                    (g_rps, g_lat, g_status), g_srv, g_load = measured(
                        proc.pid,
                        calls,
                        lambda: ghz(ghz_binary, port, raw, conc, calls, load_cpu),  # noqa: B023
                    )
                    lat.setdefault(f"{key}@{conc}", []).append(Sample(g_rps, g_srv, g_load, g_lat, g_status))
                    print(
                        f"round {rnd + 1} ({key}) c={conc:<2} h2load {rps:8.0f} calls/s, server "
                        f"{srv:6.1f} us + h2load {load:5.1f} us per call; ghz {g_rps:7.0f} calls/s, ghz "
                        f"{g_load:5.1f} us per call  {label}",
                        flush=True,
                    )
        for key, label, _, _ in targets:
            for conc in (1, 32):
                k = f"{key}@{conc}"
                results[k] = summarize(put[k], lat[k], label)
                # The box is shared: each round's ratio to (b), measured seconds apart, is steadier than the
                # ratio of medians. Report the median of the per-round ratios too.
                b_rounds = put.get(f"b@{conc}")
                if b_rounds is not None:
                    ratios = [r.rps / b.rps for r, b in zip(put[k], b_rounds, strict=True)]
                    results[k]["rps_ratio_rounds"] = [round(x, 2) for x in ratios]
                    results[k]["rps_ratio_median"] = statistics.median(ratios)
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
        f"{'servers on CPU 0, load generators on CPU 1' if pin else 'no CPU pinning'}, "
        f"Python {platform.python_version()}, load average (1/5/15 min) before {before}, after {after}"
    )
    print(
        "| target | conc | calls/s (h2load) | server CPU us/call | h2load CPU us/call | calls/s vs (b) "
        "| per-round ratio | calls/s (ghz) | ghz CPU us/call | p50 ms (ghz) | p99 ms (ghz) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for conc in (1, 32):
        base = results.get(f"b@{conc}")
        for key, *_ in targets:
            r = results[f"{key}@{conc}"]
            cells = [
                f"({key}) {r['label']}",
                str(conc),
                f"{r['rps']:.0f}",
                f"{r['server_us_per_call']:.1f}",
                f"{r['h2load_us_per_call']:.1f}",
                f"{r['rps'] / base['rps']:.2f}" if base else "-",
                f"{r['rps_ratio_median']:.2f}" if base else "-",
                f"{r['ghz_rps']:.0f}",
                f"{r['ghz_us_per_call']:.1f}",
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
            ]
            print("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"results": results, "load_before": load_before, "load_after": load_after}, indent=1)
    )


if __name__ == "__main__":
    main()
