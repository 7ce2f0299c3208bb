"""A screenshot of a page of the MLflow UI, by headless Chromium driven over its DevTools protocol.

    python benchmarks/mlflow_ui_screenshot.py URL OUT.png [--wait-for N] [--wait-text TEXT]

`chromium --headless --screenshot` shoots when the page has loaded, before the UI has fetched and drawn its
charts; this waits until the page shows N charts (plotly's `svg.main-svg`), a text, and no spinner, then
shoots (1400x900). It closes MLflow's assistant panel first. Used for benchmarks/results/mlflow_ui_*.png
(`apt-get install chromium`; `mlflow server` against the store on localhost).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

READY = """(() => {
  const charts = document.querySelectorAll('svg.main-svg').length;
  const spinners = document.querySelectorAll('[role=progressbar], [data-testid*=spinner], .anticon-loading').length;
  return JSON.stringify({charts, spinners, text: document.body.innerText.includes(WANTED)});
})()"""
CLOSE_ASSISTANT = """(() => {
  const button = [...document.querySelectorAll('button')].find(b => (b.getAttribute('aria-label') || '') === 'Close'
    && b.closest('div') && b.getBoundingClientRect().left > 1000);
  if (button) button.click();
  return Boolean(button);
})()"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def shoot(url: str, out: Path, charts: int, text: str, timeout_s: float) -> None:
    import aiohttp

    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen(
        [
            shutil.which("chromium") or "chromium",
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "--window-size=1400,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
                    page = next(t for t in json.load(response) if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1 << 30))

                async def call(method: str, **params):
                    message_id = next(ids)
                    await ws.send_json({"id": message_id, "method": method, "params": params})
                    async for message in ws:
                        data = json.loads(message.data)
                        if data.get("id") == message_id:
                            return data.get("result", {})

                async def evaluate(expression: str):
                    return (await call("Runtime.evaluate", expression=expression))["result"].get("value")

                await call("Page.enable")
                await call(
                    "Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False
                )
                await call("Page.navigate", url=url)
                deadline, closed, state = time.time() + timeout_s, False, {}
                while time.time() < deadline:
                    await asyncio.sleep(2)
                    closed = closed or bool(await evaluate(CLOSE_ASSISTANT))
                    state = json.loads(await evaluate(READY.replace("WANTED", json.dumps(text))) or "{}")
                    if state.get("charts", 0) >= charts and not state.get("spinners") and state.get("text"):
                        break
                await asyncio.sleep(2)  # the last chart's drawing
                shot = await call("Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(shot["data"]))
                print(f"{out}: {state} (assistant closed: {closed})")
    finally:
        browser.terminate()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--wait-for", type=int, default=1, help="charts the page must show")
    parser.add_argument("--wait-text", default="", help="text the page must show (a run's name)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for them")
    args = parser.parse_args()
    asyncio.run(shoot(args.url, args.out, args.wait_for, args.wait_text, args.timeout))


if __name__ == "__main__":
    main()
