"""The example steps. Importing this module registers them with the blazen_peer runtime.

CPU steps:

* ``examples::echo`` — returns the start event's fields as the result.
* ``examples::tokenize`` -> ``examples::count`` — a two-step chain: tokenize splits ``text`` into lower-case
  words and emits an ``examples::Tokens`` event; count turns it into ``{"words": N, "counts": {...}}``.
* ``examples::remember`` — stores the start event's ``value`` (JSON) as a session ref that outlives the run
  and returns it; the caller gets a ref descriptor and can dereference it later, from any replica (the runtime
  forwards derefs to the sibling that holds it).

* ``examples::where`` — reports the pod, node and pool that ran it (the fleet demo shows the router
  spreading calls over a pool's replicas with it).

"GPU" step:

* ``examples::gpu_info`` — reports the node and pool it ran on and whether a GPU device is visible. It
  checks the real thing (``/dev/nvidia*`` device files, ``nvidia-smi`` on PATH), so on a kind cluster, where
  nodes are only labelled as a GPU pool, it honestly reports ``gpu_visible: false``.

A chain whose steps live on different pools (``extract`` on CPU -> ``embed`` on GPU -> ``index`` on CPU):
sent once to a fleet's router with its three step ids, it runs each step on the pool that serves it
(docs/router.md, split runs). Each step appends where it ran to ``ctx.state["hops"]``.

* ``examples::extract`` — splits ``text`` into words and emits ``examples::Words``.
* ``examples::embed`` — turns the words into toy vectors (length, vowels) and emits ``examples::Vectors``.
* ``examples::index`` — returns the number of vectors indexed and the longest word.

Each step (or chain) is also a named workflow, so a request that names the workflow and sends no step ids runs
it: ``echo``, ``word-count``, ``remember``, ``gpu-info``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
from collections import Counter
from typing import Any

from blazen_peer import START_EVENT, STOP_EVENT, RefLifetime, Workflow, step

TOKENS = "examples::Tokens"
REMEMBERED = "examples::Remembered"
WORDS = "examples::Words"
VECTORS = "examples::Vectors"

_WORD = re.compile(r"[\w']+")


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    """The start event's input fields (everything but the type tag)."""
    return {k: v for k, v in event.items() if k != "type"}


@step("examples::echo", accepts=[START_EVENT])
async def echo(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"type": STOP_EVENT, "result": _fields(event)}


@step("examples::tokenize", accepts=[START_EVENT])
async def tokenize(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    text = str(event.get("text", ""))
    tokens = [t.lower() for t in _WORD.findall(text)]
    ctx.state["tokens"] = len(tokens)
    return {"type": TOKENS, "tokens": tokens}


@step("examples::count", accepts=[TOKENS])
def count(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    # A plain def: the runtime runs it in its executor.
    counts = Counter(event["tokens"])
    ctx.state["distinct"] = len(counts)
    return {
        "type": STOP_EVENT,
        "result": {"words": sum(counts.values()), "counts": dict(sorted(counts.items()))},
    }


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@step("examples::remember", accepts=[START_EVENT])
async def remember(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    ref = ctx.session_refs.insert(
        event.get("value"),
        type_tag=REMEMBERED,
        lifetime=RefLifetime.UntilParentFinish,
        serialize=_json_bytes,
    )
    ctx.state["ref"] = str(ref)
    # The handle becomes a session-ref marker in the result, and the response carries its descriptor.
    return {"type": STOP_EVENT, "result": {"ref": ref}}


def placement(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The pod, node and pool this step runs on (the manifests set BLAZEN_NODE_NAME and BLAZEN_POOL)."""
    env = dict(os.environ) if env is None else env
    return {
        "node": env.get("BLAZEN_NODE_NAME") or None,
        "pool": env.get("BLAZEN_POOL") or None,
        "pod": env.get("BLAZEN_PEER_NODE_ID") or socket.gethostname(),
    }


def gpu_report(env: dict[str, str] | None = None, dev_glob: str = "/dev/nvidia*") -> dict[str, Any]:
    """What ``examples::gpu_info`` reports; ``env`` and ``dev_glob`` are parameters for tests."""
    env = dict(os.environ) if env is None else env
    # /dev/nvidia0, /dev/nvidia1, ...: the GPUs themselves (nvidiactl and nvidia-uvm are not GPUs).
    devices = sorted(p for p in glob.glob(dev_glob) if re.search(r"nvidia\d+$", p))
    nvidia_smi = shutil.which("nvidia-smi", path=env.get("PATH", ""))
    return {
        **placement(env),
        "gpu_devices": devices,
        "nvidia_smi": nvidia_smi,
        "nvidia_visible_devices": env.get("NVIDIA_VISIBLE_DEVICES") or None,
        "gpu_visible": bool(devices),
    }


@step("examples::gpu_info", accepts=[START_EVENT])
def gpu_info(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    report = gpu_report()
    report["served_by"] = ctx.node_id
    return {"type": STOP_EVENT, "result": report}


@step("examples::where", accepts=[START_EVENT])
def where(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"type": STOP_EVENT, "result": placement()}


def _hop(ctx: Any, step_id: str) -> None:
    # Reassigned, not appended in place: a split run carries state between pods as changed keys.
    ctx.state["hops"] = [*ctx.state.get("hops", []), {"step": step_id, **placement()}]


@step("examples::extract", accepts=[START_EVENT])
def extract(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _hop(ctx, "examples::extract")
    return {"type": WORDS, "words": [w.lower() for w in _WORD.findall(str(event.get("text", "")))]}


@step("examples::embed", accepts=[WORDS])
def embed(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _hop(ctx, "examples::embed")
    vectors = [[len(w), sum(w.count(v) for v in "aeiou")] for w in event["words"]]
    return {"type": VECTORS, "words": event["words"], "vectors": vectors}


@step("examples::index", accepts=[VECTORS])
def index(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    _hop(ctx, "examples::index")
    words = event["words"]
    return {
        "type": STOP_EVENT,
        "result": {"indexed": len(event["vectors"]), "longest": max(words, key=len) if words else None},
    }


# Named default step sets: a request naming one of these workflows with no step ids runs these steps.
Workflow("echo").add_step("examples::echo", [START_EVENT], echo)
Workflow("word-count").add_step("examples::tokenize", [START_EVENT], tokenize).add_step(
    "examples::count", [TOKENS], count
)
Workflow("remember").add_step("examples::remember", [START_EVENT], remember)
Workflow("gpu-info").add_step("examples::gpu_info", [START_EVENT], gpu_info)
Workflow("where").add_step("examples::where", [START_EVENT], where)
