"""Headless Chromium driving a page that ``fetch()``es a peer's HTTP/JSON shim from another origin.

The page server is an aiohttp app (``page_app``) the test starts on one localhost port (``start``); its
HTML posts to ``cfg["url"]`` with the same headers Blazen's WASM ``HttpPeerClient`` sends
(``Content-Type: application/json``, ``X-Blazen-Peer-Node-Id``), plus ``Authorization`` when a token is
given, which makes the browser send a CORS preflight. The script writes the outcome into
``<pre id="result">``; Chromium's ``--dump-dom`` prints the DOM after ``--virtual-time-budget`` ms, and
``parse_result`` reads it back.

Point ``cfg["url"]`` at any shim; ``test_cors_real_shim.py`` uses a real ``BlazenPeerServer``.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "hack" / "install-chromium.sh"
CFG = web.AppKey("cfg", dict)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>blazen cors probe</title></head>
<body><pre id="result">pending</pre>
<script>
const cfg = %(cfg)s;
const headers = {"Content-Type": "application/json", "X-Blazen-Peer-Node-Id": cfg.nodeId};
if (cfg.token) headers["Authorization"] = "Bearer " + cfg.token;
const out = document.getElementById("result");
fetch(cfg.url, {method: "POST", headers, body: JSON.stringify(cfg.body)})
  .then(async (r) => {
    out.textContent = JSON.stringify({ok: true, status: r.status, body: await r.text()});
  })
  .catch((e) => { out.textContent = JSON.stringify({ok: false, error: String(e)}); });
</script></body></html>
"""


def find_chromium(install: bool = True) -> str:
    """The chromium binary; runs hack/install-chromium.sh when none is on PATH (and ``install``)."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    if not install:
        raise FileNotFoundError("chromium not found")
    done = subprocess.run([str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"hack/install-chromium.sh failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def page_app(url: str = "", *, node_id: str = "browser-tab-7f3c", token: str | None = None, body=None):
    """The probe page; its settings may be changed after the app started
    (``app[CFG]``; bind the page first, then allow its origin on the shim, then set ``cfg["url"]``)."""
    cfg = {"url": url, "nodeId": node_id, "token": token, "body": body if body is not None else {}}

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE % {"cfg": json.dumps(cfg)}, content_type="text/html")

    app = web.Application()
    app[CFG] = cfg
    app.router.add_get("/", index)
    return app


async def dump_dom(chromium: str, url: str, *, budget_ms: int = 5000, limit_s: float = 90) -> str:
    with tempfile.TemporaryDirectory(prefix="blazen-chromium-") as profile:
        args = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ]
        env = dict(os.environ, HOME=profile)
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
        return out.decode(errors="replace")


def parse_result(dom: str) -> dict:
    m = re.search(r'<pre id="result">(.*?)</pre>', dom, re.DOTALL)
    if m is None:
        raise AssertionError(f"no result element in the DOM:\n{dom[:2000]}")
    text = html.unescape(m.group(1))
    if text == "pending":
        raise AssertionError("the page's fetch did not settle within the virtual time budget")
    return json.loads(text)


async def start(app: web.Application, host: str = "127.0.0.1") -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    return runner, runner.addresses[0][1]
