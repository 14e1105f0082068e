"""Seeded mutation fuzzers for the postcard decoder, the gRPC transport and the HTTP/JSON shim.

Each input is a valid message put through random mutations (bit flips, interesting bytes, overlong
varints, insertions, deletions, truncations, splices) or plain random bytes; JSON bodies also get
structural mutations (keys dropped, values retyped, huge numbers, nesting 10,000 levels deep, step ids
repeated up to 2,000 times). A run is reproducible from its seed. Findings are:

* decoder: any exception other than ``PostcardDecodeError`` / ``EnvelopeDecodeError``, or one input taking
  longer than ``HANG_SECS``;
* gRPC: a status outside the documented set, a status that disagrees with the local decode of the same
  bytes (envelope error -> INTERNAL, postcard error -> INVALID_ARGUMENT), UNKNOWN (an unhandled exception),
  a deadline hit (a hang), or the server not answering a health call afterwards;
* HTTP: a status outside the documented set, a 500 that is not the documented empty-workflow error, a
  non-JSON error body, a connection failure, or the server not answering afterwards;
* both transports: the ``echo`` step running more often than calls were made (repeated step ids
  multiplying work).

The servers are real ``BlazenPeerServer`` instances with the runtime composed by ``blazen_peer.app`` (token
required), in this process.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
from blazen_peer import BlazenPeerServer, StepRegistry
from blazen_peer.engine.service import EMPTY_WORKFLOW
from blazen_peer.wire.envelope import EnvelopeDecodeError, unwrap, wrap
from blazen_peer.wire.messages import (
    DerefRequest,
    DerefResponse,
    ReleaseRequest,
    ReleaseResponse,
    SubWorkflowEvent,
    SubWorkflowRequest,
    SubWorkflowResponse,
    decode_stream_frame,
    encode_stream_event,
)
from blazen_peer.wire.postcard import PostcardDecodeError

from tests.support.peers import start_peer

HANG_SECS = 2.0
TOKEN = "fuzz-token-0123456789"
SERVICE = "/blazen.peer.v1.BlazenPeer/"
UUID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x10, 0x22, 0x5B, 0x7B)
DEPTH = 10_000  # nesting far past what json (or any recursive parser) can take
DEEP_JSON = ("[" * DEPTH + "]" * DEPTH, '{"a":' * DEPTH + "1" + "}" * DEPTH)


@dataclass
class Report:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    findings: list[str] = field(default_factory=list)

    def finding(self, text: str) -> None:
        if len(self.findings) < 50:
            self.findings.append(text[:500])

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "inputs": self.inputs,
            "seconds": round(self.seconds, 1),
            "per_second": round(self.inputs / self.seconds) if self.seconds else None,
            "outcomes": dict(self.outcomes.most_common()),
            "findings": len(self.findings),
            "first_findings": self.findings[:5],
        }


# -- inputs -------------------------------------------------------------------------------------------------


def seed_payloads() -> list[bytes]:
    """Valid postcard payloads of every message the peer decodes or emits."""
    reqs = [
        SubWorkflowRequest.new("wf", ["echo"], {"x": 1}),
        SubWorkflowRequest.new("wf", ["echo", "echo"], {"x": [1, 2, {"y": "z"}]}, timeout_secs=3),
        SubWorkflowRequest.new("", [], None),
        SubWorkflowRequest.new("w" * 200, ["a" * 300], {"k": "v" * 500}, timeout_secs=2**31),
        SubWorkflowRequest.new("wf", ["echo"] * 300, {"x": 1}),  # repeated ids run echo once
        *(SubWorkflowRequest("wf", ["echo"], deep.encode()) for deep in DEEP_JSON),
    ]
    out = [r.encode() for r in reqs]
    out += [DerefRequest(UUID).encode(), ReleaseRequest(UUID).encode()]
    out.append(SubWorkflowResponse({"s": b"{}"}, b'{"a":1}', {}, None).encode())
    out.append(SubWorkflowResponse({}, None, {}, "workflow error: x").encode())
    out.append(DerefResponse(b"payload").encode())
    out.append(ReleaseResponse(True).encode())
    out.append(encode_stream_event(SubWorkflowEvent(7, "my::step", "Mid", b'{"n":1}', 1700000000000)))
    return out


class Mutator:
    def __init__(self, rng: random.Random, seeds: list[bytes]) -> None:
        self.rng = rng
        self.seeds = seeds

    def bytes(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.05:
            return rng.randbytes(rng.randrange(0, 64))
        data = bytearray(rng.choice(self.seeds))
        for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
            self._mutate(data)
        return bytes(data)

    def _mutate(self, data: bytearray) -> None:
        rng = self.rng
        op = rng.randrange(9)
        n = len(data)
        if n == 0:
            data.extend(rng.randbytes(rng.randrange(1, 8)))
            return
        i = rng.randrange(n)
        if op == 0:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i] = rng.choice(INTERESTING)
        elif op == 2:
            data[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3:
            del data[i : i + rng.randrange(1, 9)]
        elif op == 4:
            del data[i:]
        elif op == 5:  # overlong / huge varint
            data[i:i] = b"\xff" * rng.randrange(1, 12) + bytes([rng.randrange(0, 128)])
        elif op == 6:
            j = rng.randrange(i, n)
            data[j:j] = data[i : i + rng.randrange(1, 16)]
        elif op == 7:  # splice with another seed
            other = rng.choice(self.seeds)
            data[i:] = other[rng.randrange(len(other) or 1) :]
        else:
            data[i] = rng.randrange(256)

    def envelope(self) -> bytes:
        """A protobuf envelope around a mutated payload, sometimes mutated itself."""
        rng = self.rng
        payload = self.bytes()
        msg = bytearray(wrap(payload))
        if rng.random() < 0.25:
            self._mutate(msg)
        return bytes(msg)

    def json_body(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.1:
            return self.bytes()  # not JSON at all
        body: Any = {
            "envelope_version": 1,
            "workflow_name": "wf",
            "step_ids": ["echo"] * (rng.randrange(2, 2000) if rng.random() < 0.05 else 1),
            "input_json": list(b'{"x":1}'),
            "timeout_secs": None,
            "ref_uuid": UUID,
        }
        for _ in range(rng.choice((1, 1, 2, 3))):
            body = self._mutate_json(body)
        text = json.dumps(body)
        if rng.random() < 0.05:  # deep nesting: the whole body, or in place of one value
            deep = rng.choice(DEEP_JSON)
            if rng.random() < 0.3 or not isinstance(body, dict) or not body:
                return deep.encode()
            key = rng.choice(list(body))
            value = json.dumps(deep) if key == "input_json" and rng.random() < 0.5 else deep
            text = json.dumps({**body, key: "@deep@"}).replace('"@deep@"', value)
        if rng.random() < 0.1:
            t = bytearray(text.encode())
            self._mutate(t)
            return bytes(t)
        return text.encode()

    def _value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(12)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice((True, False))
        if kind == 2:
            return rng.choice((0, -1, 1, 255, 256, 2**31, 2**32, 2**63, 2**64, -(2**63), 10**30))
        if kind == 3:
            return rng.random() * rng.choice((1, 1e10, -1e300))
        if kind == 4:
            return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(0, 20)))
        if kind == 5:
            return [rng.randrange(-5, 300) for _ in range(rng.randrange(0, 20))]
        if kind == 6:
            return list(rng.randbytes(rng.randrange(0, 30)))
        if kind == 7 and depth < 3:
            return [self._value(depth + 1) for _ in range(rng.randrange(0, 4))]
        if kind == 8 and depth < 3:
            return {str(self._value(depth + 1)): self._value(depth + 1) for _ in range(rng.randrange(0, 4))}
        if kind == 9:
            return rng.choice((UUID, UUID.upper(), UUID.replace("-", ""), "not-a-uuid", ""))
        if kind == 10:
            return [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]
        return rng.choice(("echo", "nope", "", "examples::echo"))

    def _mutate_json(self, body: Any) -> Any:
        rng = self.rng
        if not isinstance(body, dict) or not body or rng.random() < 0.05:
            return self._value()
        key = rng.choice(list(body))
        op = rng.randrange(4)
        if op == 0:
            del body[key]
        elif op == 1:
            body[key] = self._value()
        elif op == 2:
            body[str(self._value())] = self._value()
        else:
            v = body[key]
            if isinstance(v, list) and v:
                v[rng.randrange(len(v))] = self._value()
            else:
                body[key] = self._value()
        return body


# -- the decoder ---------------------------------------------------------------------------------------

DECODERS: tuple[tuple[str, Callable[[bytes], Any]], ...] = (
    ("SubWorkflowRequest", SubWorkflowRequest.decode),
    ("SubWorkflowRequest.strict", SubWorkflowRequest.decode_strict),
    ("DerefRequest", DerefRequest.decode),
    ("ReleaseRequest", ReleaseRequest.decode),
    ("SubWorkflowResponse", SubWorkflowResponse.decode),
    ("DerefResponse", DerefResponse.decode),
    ("ReleaseResponse", ReleaseResponse.decode),
    ("StreamFrame", decode_stream_frame),
    ("envelope", unwrap),
)


def fuzz_decoder(inputs: int, seed: int = 1) -> Report:
    report = Report("postcard decoder")
    m = Mutator(random.Random(seed), seed_payloads())
    t0 = time.perf_counter()
    for _ in range(inputs):
        data = m.bytes() if m.rng.random() < 0.8 else m.envelope()
        for name, decode in DECODERS:
            start = time.perf_counter()
            try:
                decode(data)
                outcome = "ok"
            except (PostcardDecodeError, EnvelopeDecodeError):
                outcome = "rejected"
            except Exception as exc:
                outcome = "CRASH"
                report.finding(f"{name}({data.hex()}): {type(exc).__name__}: {exc}")
            if time.perf_counter() - start > HANG_SECS:
                report.finding(f"{name}({data.hex()}): took {time.perf_counter() - start:.1f} s")
            report.outcomes[outcome] += 1
        # The fast path and the strict reader agree (both accept with the same value, or both refuse).
        fast = strict = None
        try:
            fast = SubWorkflowRequest.decode(data)
        except PostcardDecodeError:
            fast = "error"
        try:
            strict = SubWorkflowRequest.decode_strict(data)
        except PostcardDecodeError:
            strict = "error"
        if fast != strict and repr(fast) != repr(strict):
            report.finding(f"fast path and strict reader disagree on {data.hex()}: {fast!r} / {strict!r}")
        report.inputs += 1
    report.seconds = time.perf_counter() - t0
    return report


# -- the transports ------------------------------------------------------------------------------------


def fuzz_registry(runs: collections.Counter) -> StepRegistry:
    """``echo``, counting its runs in ``runs["echo"]``: a call never runs it more than once, whatever its
    ``step_ids`` repeat."""
    reg = StepRegistry()

    def echo(event: dict, ctx: Any) -> dict:
        runs["echo"] += 1
        return {"type": "blazen::StopEvent", "result": event}

    reg.register("echo", ["blazen::StartEvent"], echo)
    return reg


def check_runs(report: Report, runs: collections.Counter, calls: int) -> None:
    if runs["echo"] > calls:
        report.finding(f"echo ran {runs['echo']} times for {calls} calls: repeated step ids multiplied work")


async def start_server(runs: collections.Counter, **cfg: Any) -> BlazenPeerServer:
    return await start_peer(
        fuzz_registry(runs),
        node_id="fuzz-0",
        admin_addr=None,
        token=TOKEN,
        max_concurrent_workflows=1000,
        **cfg,
    )


GRPC_ALLOWED = {
    "OK",
    "OUT_OF_RANGE",
    "INTERNAL",
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "NOT_FOUND",
    "UNAUTHENTICATED",
    "UNIMPLEMENTED",
    "RESOURCE_EXHAUSTED",
}
METHODS = {
    "InvokeSubWorkflow": SubWorkflowRequest.decode,
    "DerefSessionRef": DerefRequest.decode,
    "ReleaseSessionRef": ReleaseRequest.decode,
}


def expected_grpc(method: str, msg: bytes) -> str | None:
    """The status the decode stage must give for ``msg`` (None: decoding passes, later checks decide)."""
    decode = METHODS.get(method)
    if decode is None:
        return "UNIMPLEMENTED"
    try:
        payload = unwrap(msg)
    except EnvelopeDecodeError:
        return "INTERNAL"
    try:
        decode(payload)
    except PostcardDecodeError:
        return "INVALID_ARGUMENT"
    return None


async def in_batches(
    one: Callable[[], Awaitable[None]], inputs: int, concurrency: int, report: Report
) -> None:
    """Runs ``one`` ``inputs`` times, ``concurrency`` at once, counting what ran in ``report.inputs``."""
    done = 0
    while done < inputs:
        batch = min(concurrency, inputs - done)
        await asyncio.gather(*(one() for _ in range(batch)))
        done += batch
        report.inputs = done


async def fuzz_grpc(inputs: int, seed: int = 2, concurrency: int = 32) -> Report:
    report = Report("gRPC transport")
    rng = random.Random(seed)
    m = Mutator(rng, seed_payloads())
    runs: collections.Counter = collections.Counter()
    server = await start_server(runs)
    good_md = (("authorization", f"Bearer {TOKEN}"), ("x-blazen-peer-node-id", "fuzzer"))
    bad_mds = ((), (("authorization", "Bearer nope"),), (("authorization", "Basic " + TOKEN),))
    names = [*METHODS, "StreamSubWorkflowEvents", "NoSuchMethod"]
    t0 = time.perf_counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            calls = {n: ch.unary_unary(SERVICE + n) for n in names}
            stream = ch.unary_stream(SERVICE + "StreamSubWorkflowEvents")

            async def one() -> None:
                method = rng.choice(names)
                runs["calls"] += 1
                msg = m.envelope()
                authed = rng.random() < 0.95
                md = good_md if authed else rng.choice(bad_mds)
                try:
                    if method == "StreamSubWorkflowEvents":
                        async for _ in stream(msg, metadata=md, timeout=HANG_SECS * 5):
                            pass
                    else:
                        await calls[method](msg, metadata=md, timeout=HANG_SECS * 5)
                    code, details = "OK", ""
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code().name, exc.details() or ""
                report.outcomes[code] += 1
                if code not in GRPC_ALLOWED:
                    report.finding(f"{method} {msg.hex()[:200]}: {code} {details}")
                    return
                if not authed:
                    if code != "UNAUTHENTICATED" and method != "NoSuchMethod":
                        report.finding(f"{method} without a valid token answered {code}")
                    return
                want = expected_grpc(
                    method if method != "StreamSubWorkflowEvents" else "InvokeSubWorkflow", msg
                )
                if method == "NoSuchMethod":
                    want = "UNIMPLEMENTED"
                if len(msg) > 4 * 1024 * 1024:
                    want = "OUT_OF_RANGE"
                if want is not None and code != want:
                    report.finding(f"{method} {msg.hex()[:200]}: {code} {details!r}, expected {want}")
                if code == "INTERNAL" and not (
                    details.startswith("failed to decode Protobuf message") or details == EMPTY_WORKFLOW
                ):
                    report.finding(f"{method} {msg.hex()[:200]}: INTERNAL {details!r}")

            await in_batches(one, inputs, concurrency, report)
            # Still alive and well: a valid call answers.
            ok = await calls["InvokeSubWorkflow"](
                wrap(SubWorkflowRequest.new("wf", ["echo"], {"alive": True}).encode()),
                metadata=good_md,
                timeout=30,
            )
            if SubWorkflowResponse.decode(unwrap(ok)).error is not None:
                report.finding("the server no longer answers a valid call")
            check_runs(report, runs, runs["calls"] + 1)
    finally:
        report.seconds = time.perf_counter() - t0
        await server.stop(grace=0)
    return report


HTTP_ROUTES = {
    "/v1/peer/invoke_sub_workflow": (200, 400, 401, 404, 412, 413, 429, 500),
    "/v1/peer/deref_session_ref": (200, 400, 401, 404, 412, 413, 429),
    "/v1/peer/release_session_ref": (200, 400, 401, 404, 412, 413, 429),
    "/v1/peer/nope": (401, 404, 405),
}


async def fuzz_http(inputs: int, seed: int = 3, concurrency: int = 16) -> Report:
    report = Report("HTTP/JSON shim")
    rng = random.Random(seed)
    m = Mutator(rng, seed_payloads())
    runs: collections.Counter = collections.Counter()
    server = await start_server(runs, http_max_body_bytes=1024 * 1024)
    base = f"http://127.0.0.1:{server.http_port}"
    routes = list(HTTP_ROUTES)
    t0 = time.perf_counter()
    try:
        conn = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=HANG_SECS * 5)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

            async def one() -> None:
                route = rng.choice(routes)
                runs["calls"] += 1
                body = m.json_body()
                authed = rng.random() < 0.95
                headers = {"content-type": "application/json", "x-blazen-peer-node-id": "fuzzer"}
                if authed:
                    headers["authorization"] = f"Bearer {TOKEN}"
                method = "POST" if rng.random() < 0.97 else rng.choice(("GET", "PUT", "DELETE"))
                try:
                    async with session.request(method, base + route, data=body, headers=headers) as r:
                        status, text = r.status, await r.text()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    report.outcomes["connection error"] += 1
                    report.finding(f"{method} {route} {body[:200]!r}: {type(exc).__name__}: {exc}")
                    return
                report.outcomes[str(status)] += 1
                allowed = HTTP_ROUTES[route] + ((405,) if method != "POST" else ())
                if not authed:
                    allowed = (401,)
                if status not in allowed:
                    report.finding(f"{method} {route} {body[:200]!r}: {status} {text[:200]}")
                    return
                if status >= 400:
                    try:
                        err = json.loads(text)["error"]
                    except (ValueError, KeyError, TypeError):
                        report.finding(f"{route}: {status} without a JSON error body: {text[:200]}")
                        return
                    if status == 500 and err != EMPTY_WORKFLOW:
                        report.finding(f"{route} {body[:200]!r}: 500 {err}")

            await in_batches(one, inputs, concurrency, report)
            good = {
                "envelope_version": 1,
                "workflow_name": "wf",
                "step_ids": ["echo"],
                "input_json": list(b'{"alive":true}'),
                "timeout_secs": None,
            }
            async with session.post(
                base + "/v1/peer/invoke_sub_workflow",
                json=good,
                headers={"authorization": f"Bearer {TOKEN}"},
            ) as r:
                if r.status != 200:
                    report.finding(f"the server no longer answers a valid call: {r.status}")
            check_runs(report, runs, runs["calls"] + 1)
    finally:
        report.seconds = time.perf_counter() - t0
        await server.stop(grace=0)
    return report


async def run_all(
    inputs: int, seed: int = 1, targets: tuple[str, ...] = ("decoder", "grpc", "http")
) -> list[Report]:
    reports = []
    if "decoder" in targets:
        reports.append(await asyncio.to_thread(fuzz_decoder, inputs, seed))
    if "grpc" in targets:
        reports.append(await fuzz_grpc(inputs, seed + 1))
    if "http" in targets:
        reports.append(await fuzz_http(inputs, seed + 2))
    return reports
