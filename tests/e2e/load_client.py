"""The e2e load client: runs INSIDE a client pod (tests/e2e/clients.py starts it), never under pytest.

It offers ``rate`` calls/s of ``examples::echo`` for ``seconds`` through the Service, on ``channels`` channels
opened once and kept for the whole run, with one of three clients:

* ``ours``: grpcio with our wire codec, over mutual TLS (the client certificate mounted at /tls) on the gRPC
  port, the bearer token when given; ``wait_for_ready`` makes a call wait for a ready connection instead of
  failing fast while its channel reconnects.
* ``files``: our ``BlazenPeerClient`` on the gRPC port, ONE client for the whole run built with ``tls_files``:
  its identity from the client Secret mounted at /tls, its trust from the namespace trust ConfigMap mounted at
  /trust. It follows those files as they change (a CA rotation), where ``ours`` reads its PEM once; the
  result adds ``tls_generation``, how many certificate sets it used.
* ``wheel``: the real ``blazen`` 0.6.74 wheel's ``BlazenPeerClient`` (mounted from the node, see
  ``wheel_on_node`` in tests/e2e/conftest.py) through the plaintext opt-in: Blazen's own clients do neither
  TLS nor tokens.

The spec comes as JSON in ``LOAD_SPEC``. The last stdout line is one JSON object: ``sent``, ``ok``,
``errors`` ({kind: count}), ``failed`` (up to 200 ``[start, end, kind]``, wall clock), ``elapsed``,
``started`` (wall clock), ``p50``, ``p99`` (seconds), and what the client adds.
"""

import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path

SPEC = json.loads(os.environ["LOAD_SPEC"])
RATE, SECONDS, CHANNELS = SPEC["rate"], SPEC["seconds"], SPEC.get("channels", 1)
TARGET = SPEC["target"]  # host:port of the Service
# ours: the client certificate of the peer's <name>-client-tls Secret, read before the loop runs
TLS = (
    [Path("/tls", f).read_bytes() for f in ("ca.crt", "tls.crt", "tls.key")]
    if SPEC["client"] == "ours"
    else []
)


async def ours():
    """(call(i) -> result value or raises, close() -> what the client adds to the result)"""
    import grpc
    from blazen_peer.wire.envelope import unwrap, wrap
    from blazen_peer.wire.messages import SubWorkflowRequest, SubWorkflowResponse

    root, chain, key = TLS
    creds = grpc.ssl_channel_credentials(root, key, chain)
    md = [("x-blazen-peer-node-id", "e2e-load")]
    if SPEC.get("token"):
        md.append(("authorization", "Bearer " + SPEC["token"]))
    channels = [grpc.aio.secure_channel(TARGET, creds) for _ in range(CHANNELS)]
    for ch in channels:
        await ch.channel_ready()
    invokes = [ch.unary_unary("/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow") for ch in channels]

    async def call(i):
        req = wrap(SubWorkflowRequest.new("examples", ["examples::echo"], {"i": i}, 10).encode())
        raw = await invokes[i % CHANNELS](
            req, metadata=md, timeout=15, wait_for_ready=SPEC.get("wait_for_ready", False)
        )
        resp = SubWorkflowResponse.decode(unwrap(raw))
        if resp.error is not None:
            raise RuntimeError("workflow: " + str(resp.error))
        return resp.result_value()

    async def close():
        for ch in channels:
            await ch.close()
        return {}

    return call, close


async def files():
    from blazen_peer.client import BlazenPeerClient

    paths = ("/tls/tls.crt", "/tls/tls.key", "/trust/ca.crt")
    client = await BlazenPeerClient.connect(f"https://{TARGET}", "e2e-files", tls_files=paths)

    async def call(i):
        resp = await client.invoke_sub_workflow("examples", ["examples::echo"], {"i": i}, 10, deadline=15)
        if resp.error is not None:
            raise RuntimeError("workflow: " + str(resp.error))
        return resp.result_value()

    async def close():
        generation = client.tls_generation
        await client.close()
        return {"tls_generation": generation}

    return call, close


async def wheel():
    import blazen

    clients = [
        await blazen.BlazenPeerClient.connect(f"http://{TARGET}", "e2e-wheel") for _ in range(CHANNELS)
    ]

    async def call(i):
        req = blazen.SubWorkflowRequest("examples", ["examples::echo"], {"i": i}, 10)
        resp = await asyncio.wait_for(clients[i % CHANNELS].invoke_sub_workflow(req), 15)
        if resp.error is not None:
            raise RuntimeError("workflow: " + str(resp.error))
        return resp.result_value()

    async def close():
        return {}  # the wheel's clients close with the process

    return call, close


def kind_of(exc):
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.aio.AioRpcError
        return code().name + ":" + (exc.details() or "")[:80]
    # whole: tests/support/blazen_wheel.raced_a_goaway reads the wheel's transport details at its end
    return type(exc).__name__ + ":" + str(exc)[:400]


async def main():
    call, close = await {"ours": ours, "files": files, "wheel": wheel}[SPEC["client"]]()
    ok, errors, failed, latencies, tasks = 0, collections.Counter(), [], [], set()
    start = time.monotonic()

    async def one(i):
        nonlocal ok
        t0, m0 = time.time(), time.monotonic()
        try:
            value = await call(i)
            if value == {"i": i}:
                ok += 1
                return
            kind = "wrong result:" + repr(value)[:80]
        except Exception as exc:
            kind = kind_of(exc)
        finally:
            latencies.append(time.monotonic() - m0)
        errors[kind] += 1
        failed.append([t0, time.time(), kind])

    n = int(RATE * SECONDS)
    for i in range(n):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    added = await close()
    latencies.sort()
    result = {
        "client": SPEC["client"],
        "sent": n,
        "ok": ok,
        "errors": dict(errors),
        "failed": failed[:200],
        "elapsed": elapsed,
        "started": time.time() - elapsed,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99)],
        **added,
    }
    print(json.dumps(result), flush=True)


asyncio.run(main())
sys.stdout.flush()
# The wheel's tokio threads can abort a finalizing interpreter (tests/interop/blazen_driver.py); the result is
# printed, so leave without finalizing.
os._exit(0)
