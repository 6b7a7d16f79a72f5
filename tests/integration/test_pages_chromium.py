"""The pages people look at, rendered by a real browser (issue 13 "Done means"): the status
page of a real relay with some deliveries behind it, and the sandbox's index.html, in headless
Chromium at 1280 px wide, must not overflow horizontally.

How: Chromium runs with `--remote-debugging-port=0`; the test speaks the DevTools protocol over
a websocket (aiohttp's client): set a 1280 x 800 viewport, navigate, wait for the load event,
then evaluate `document.documentElement.scrollWidth` (DevTools evaluation is not page script,
so the page's `default-src 'none'` CSP still holds for the page itself) and list the elements
whose right edge passes 1280. A PNG screenshot of each page is saved in the test's tmp dir.
Skipped, saying why, when Debian's `chromium` is not installed (`scripts/run-tests` installs it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.ops.admin import AdminServer
from relay.ops.metrics import RelayMetrics
from relay.sandbox import Sandbox
from relay.service import RelayService
from tests.conftest import CLIENT_ID, MAILBOX, SECRET, TENANT, asmtp_send, build_config, message
from tests.conftest import relay_config_text as config_text

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/run-tests installs it via apt)"
)
WIDTH = 1280
HYBRID = "{mode: hybrid, inline_timeout: 5s, spool_dir: spool}"
LONG_ID = "<" + "scan-" * 24 + "@printer-in-the-basement.contoso.example>"
# The elements past the right edge, for the failure message (evaluated by DevTools).
MEASURE = """JSON.stringify({
  width: document.documentElement.scrollWidth,
  wide: [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > WIDTH)
    .slice(0, 5).map(e => e.tagName + ' ' + (e.textContent || '').slice(0, 60))
})""".replace("WIDTH", str(WIDTH))


class DevTools:
    """One page target of a headless Chromium, driven over its websocket."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._next = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        await self._socket.send_json({"id": ident, "method": method, "params": params})
        while True:
            reply = await self._socket.receive_json()
            if reply.get("id") == ident:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    async def until_event(self, name: str) -> None:
        while True:
            event = await self._socket.receive_json()
            if event.get("method") == name:
                return

    async def render(self, url: str, screenshot: Path) -> dict[str, Any]:
        """Load `url` at WIDTH px; save a PNG; the page's scroll width and wide elements."""
        await self.call("Page.enable")
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=800,
            deviceScaleFactor=1,
            mobile=False,
        )
        await self.call("Page.navigate", url=url)
        await self.until_event("Page.loadEventFired")
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(screenshot.write_bytes, base64.b64decode(shot["data"]))
        measured = await self.call("Runtime.evaluate", expression=MEASURE, returnByValue=True)
        found: dict[str, Any] = json.loads(measured["result"]["value"])
        return found


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[DevTools]:
    assert CHROMIUM is not None
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--remote-debugging-port=0",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        async with asyncio.timeout(60):
            port = await _devtools_port(process.stderr)
        async with aiohttp.ClientSession() as session:
            async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as response:
                target = await response.json()
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield DevTools(ws)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def _devtools_port(stderr: asyncio.StreamReader) -> int:
    """Chromium prints `DevTools listening on ws://127.0.0.1:PORT/...` once it listens."""
    while line := await stderr.readline():
        found = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise AssertionError("chromium exited without opening its DevTools port")


@pytest.fixture
async def sandbox_with_mail(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """A sandbox that writes what Graph received, and index.html, into tmp_path/mail."""
    state = tmp_path / "sandbox"
    state.mkdir()
    async with Sandbox(state_dir=state, mail_dir=tmp_path / "mail") as sb:
        sb.add_tenant(TENANT)
        sb.add_app(TENANT, CLIENT_ID, secret=SECRET)
        sb.add_mailbox(MAILBOX)
        yield sb


async def some_deliveries(relay: RelayService, sandbox: Sandbox) -> None:
    port = relay.listeners[0].port
    for number in range(3):
        await asmtp_send(
            port,
            message(
                subject=f"Scan {number} " + "with a rather long subject line " * 4,
                extra_headers=f"Message-ID: {LONG_ID.replace('scan-', f'{number}-', 1)}\r\n",
            ),
            recipients=tuple(f"recipient-{n}@partner.example" for n in range(6)),
        )
    sandbox.faults.fail_graph(404, "ErrorInvalidUser", "The requested user is invalid. " * 3)
    await asmtp_send(port, message(extra_headers=f"Message-ID: {LONG_ID}\r\n"))
    await relay.delivery.history.flush()


async def test_the_status_page_and_the_sandbox_index_fit_1280_pixels(
    browser: DevTools, sandbox_with_mail: Sandbox, tmp_path: Path
) -> None:
    sandbox = sandbox_with_mail
    config = build_config(
        config_text(sandbox, delivery=HYBRID) + "\nhistory: {subjects: true}", tmp_path
    )
    relay = RelayService(config)
    await relay.start()
    admin = AdminServer(config.admin, metrics=RelayMetrics(), health=relay.health_sources())
    await admin.start()
    try:
        await some_deliveries(relay, sandbox)
        status = await browser.render(f"http://127.0.0.1:{admin.port}/", tmp_path / "status.png")
        index_file = tmp_path / "mail" / "index.html"
        index = await browser.render(index_file.as_uri(), tmp_path / "sandbox-index.png")
    finally:
        await admin.stop()
        await relay.stop()
    assert status["width"] <= WIDTH, f"the status page overflows: {status}"
    assert index["width"] <= WIDTH, f"the sandbox's index.html overflows: {index}"
    for png in ("status.png", "sandbox-index.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_the_measure_sees_a_page_that_overflows(browser: DevTools, tmp_path: Path) -> None:
    """The check itself: a page with a 2000 px table is reported, and names the table."""
    wide = tmp_path / "wide.html"
    wide.write_text('<table style="width:2000px"><tr><td>wide</td></tr></table>')
    found = await browser.render(wide.as_uri(), tmp_path / "wide.png")
    assert found["width"] > WIDTH
    assert any(element.startswith("TABLE") for element in found["wide"])
