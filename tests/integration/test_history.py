"""The delivery history after real deliveries through the sandbox (issue 13 item 7): each final
outcome (delivered, refused for good, expired, refused in direct mode) is recorded with its
fields, the Subject only when asked for, and it is read back by `smtp-graph-relay history`
and the status page's search box."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.cli.main import main
from relay.config.load import load_config
from relay.core.history import HistoryQuery, HistoryRecord
from relay.ops.admin import AdminServer
from relay.ops.metrics import RelayMetrics
from relay.sandbox import Sandbox
from relay.service import RelayService
from relay.store.files import FileStore
from tests.conftest import MAILBOX, RelayFactory, asmtp_send, message
from tests.integration.test_cli import run_main, write_config
from tests.integration.test_durability import eventually, port_of
from tests.integration.test_large_messages import MB, grant_read_write, large_message
from tests.store.contract import settled

HYBRID = "{mode: hybrid, inline_timeout: 5s, spool_dir: spool}"
QUEUE = "{mode: queue, spool_dir: spool, retry: {first: 200ms, max: 1s, lifetime: 1h}}"
DOOMED = "{mode: queue, spool_dir: spool, retry: {first: 1ms, max: 1ms, lifetime: 1ms}}"
DIRECT = "{mode: direct, inline_timeout: 5s, spool_dir: spool}"
BIG_SMTP = "max_message_size: 50MiB"
RECIPIENTS = ("bob@partner.example", "carol@partner.example")


async def outcomes(relay: RelayService, **query: Any) -> list[HistoryRecord]:
    """The relay's history once everything settled so far is written to its store."""
    await relay.delivery.history.flush()
    return list(await relay.delivery.history.search(HistoryQuery(**query)))


async def test_a_delivered_message_is_recorded_with_every_field(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    relay = await start_relay(delivery=HYBRID)
    before = time.time()
    reply = await asmtp_send(
        port_of(relay),
        message(extra_headers="Message-ID: <scan-1@printer.test>\r\n"),
        recipients=RECIPIENTS,
    )
    assert reply.code == 250
    assert "delivered" in reply.text
    queue_id = reply.text.split()[-1]
    [record] = await outcomes(relay)
    assert record.queue_id == queue_id
    assert record.message_id == "<scan-1@printer.test>"
    assert before <= record.accepted <= record.settled <= time.time()
    assert (record.client, record.client_ip, record.sender) == ("local", "127.0.0.1", MAILBOX)
    assert (record.recipients, record.route, record.mailbox) == (2, "*@contoso.com", MAILBOX)
    assert (record.outcome, record.path, record.http_status) == ("delivered", "mime", 202)
    assert record.request_id == sandbox.received[0].request_id
    assert record.attempts == 1
    assert (record.error, record.remedy) == ("", "")
    assert record.subject is None  # history.subjects is off by default


async def test_the_subject_is_recorded_only_with_history_subjects_on(
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(delivery=HYBRID)  # history.subjects left at its default
    other = await start_relay(
        delivery=HYBRID.replace("spool}", "spool2}") + "\nhistory: {subjects: true}"
    )
    await asmtp_send(port_of(relay), message(subject="Invoice 42"))
    await asmtp_send(port_of(other), message(subject="=?utf-8?q?Rechnung_=C3=BC?="))
    [plain] = await outcomes(relay)
    [told] = await outcomes(other)
    assert plain.subject is None
    assert told.subject == "Rechnung ü"


@pytest.mark.parametrize(
    ("status", "code"), [(403, "ErrorAccessDenied"), (404, "ErrorInvalidUser")]
)
async def test_a_queued_message_refused_for_good_is_recorded_as_failed(
    start_relay: RelayFactory, sandbox: Sandbox, status: int, code: str
) -> None:
    relay = await start_relay(delivery=QUEUE)
    sandbox.faults.fail_graph(status, code, f"injected {code}")
    reply = await asmtp_send(port_of(relay), message())
    assert reply.code == 250
    assert "queued" in reply.text
    assert relay.spool is not None
    spool = relay.spool
    await eventually(lambda: len(spool.list("dead")) == 1)
    [record] = await outcomes(relay, failed=True)
    assert (record.queue_id, record.outcome, record.http_status) == (
        reply.text.split()[-1],
        "failed",
        status,
    )
    assert code in record.error
    assert record.error.startswith("refused:")
    assert record.remedy  # what the administrator can do about it
    assert record.attempts == 1
    assert record.path == ""  # nothing went out


async def test_a_message_past_its_lifetime_is_recorded_as_expired(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    relay = await start_relay(delivery=DOOMED)
    sandbox.faults.fail_graph(503, "ServiceUnavailable", "down")
    await asmtp_send(port_of(relay), message())
    assert relay.spool is not None
    spool = relay.spool
    await eventually(lambda: len(spool.list("dead")) == 1)
    await eventually(lambda: relay.delivery.in_flight == 0)
    found = await outcomes(relay, failed=True)
    expired = [r for r in found if r.sender == MAILBOX]
    assert [r.outcome for r in expired] == ["expired"]
    assert expired[0].http_status == 503
    assert "expired after" in expired[0].error


async def test_direct_mode_records_the_delivered_and_the_refused(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    relay = await start_relay(delivery=DIRECT)
    ok = await asmtp_send(port_of(relay), message(subject="fine"))
    sandbox.faults.fail_graph(404, "ErrorInvalidUser", "no such mailbox")
    refused = await asmtp_send(port_of(relay), message(subject="refused"))
    assert ok.code == 250
    assert refused.code == 550
    found = await outcomes(relay)
    assert [r.outcome for r in found] == ["refused", "delivered"]
    assert found[0].http_status == 404
    assert "ErrorInvalidUser" in found[0].error
    assert found[0].attempts == 1
    assert found[0].remedy
    assert found[1].path == "mime"
    assert found[1].http_status == 202
    assert (tmp_path / "spool" / "history.jsonl").is_file()  # kept without a spool


# --- reading it back ----------------------------------------------------------------------


async def test_the_history_command_prints_lines_and_json(sandbox: Sandbox, tmp_path: Path) -> None:
    path = write_config(sandbox, tmp_path, delivery=QUEUE)
    relay = RelayService(load_config(path))
    await relay.start()
    try:
        sandbox.faults.fail_graph(404, "ErrorInvalidUser", "unknown")
        erp = "erp@contoso.com"
        sandbox.add_mailbox(erp)  # its DSN goes out as itself ("mailbox: sender")
        failed = await asmtp_send(port_of(relay), message(sender=erp), sender=erp)
        assert relay.spool is not None
        spool = relay.spool
        await eventually(lambda: len(spool.list("dead")) == 1)
        await eventually(lambda: len(sandbox.received) == 1)  # its DSN, from <>
        delivered = await asmtp_send(port_of(relay), message())
        await eventually(lambda: len(sandbox.received) == 2)
        await eventually(lambda: relay.delivery.in_flight == 0)
        await relay.delivery.history.flush()
        code, text = await run_main("history", "-c", str(path))
        assert code == 0
        lines = [line for line in text.splitlines() if " from=<> " not in line and line[0] != " "]
        assert len(lines) == 2
        assert lines[0].split()[3] == delivered.text.split()[-1]
        assert "delivered" in lines[0]
        assert "path=mime graph=202" in lines[0]
        assert "failed" in lines[1]
        assert "graph=404" in lines[1]
        assert "    error: refused:" in text
        assert "    remedy: " in text
        code, text = await run_main("history", "-c", str(path), "--failed", "--json")
        assert code == 0
        [record] = json.loads(text)
        assert record["queue_id"] == failed.text.split()[-1]
        assert (record["outcome"], record["sender"]) == ("failed", "erp@contoso.com")
        code, text = await run_main("history", "-c", str(path), "--sender", "*@CONTOSO.com")
        assert text.count(" from=<") == 2
        code, text = await run_main(
            "history", "-c", str(path), "--sender", "nobody@contoso.com", "--since", "1h"
        )
        assert (code, text) == (0, "no outcome recorded matches\n")
    finally:
        await relay.stop()


def test_the_history_command_refuses_a_bad_duration(sandbox: Sandbox, tmp_path: Path) -> None:
    path = write_config(sandbox, tmp_path, delivery=QUEUE)
    out = io.StringIO()
    assert main(["history", "-c", str(path), "--since", "soon"], out=out) == 2


AdminFactory = Callable[[RelayService], Awaitable[AdminServer]]


@pytest.fixture
async def start_admin() -> AsyncIterator[AdminFactory]:
    started: list[AdminServer] = []

    async def start(relay: RelayService) -> AdminServer:
        config = relay.current_config()
        server = AdminServer(config.admin, metrics=RelayMetrics(), health=relay.health_sources())
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


async def page(server: AdminServer, query: str = "") -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}/{query}") as response,
    ):
        assert response.status == 200
        return await response.text()


async def test_the_status_page_shows_and_searches_the_history(
    start_relay: RelayFactory, sandbox: Sandbox, start_admin: AdminFactory
) -> None:
    relay = await start_relay(delivery=HYBRID)
    server = await start_admin(relay)
    sandbox.add_mailbox("erp@contoso.com")
    first = await asmtp_send(port_of(relay), message(sender="scanner@contoso.com"))
    second = await asmtp_send(
        port_of(relay),
        message(sender="erp@contoso.com", extra_headers="Message-ID: <a&b@erp.test>\r\n"),
        sender="erp@contoso.com",
    )
    assert "delivered" in first.text
    assert "delivered" in second.text
    first_id, second_id = first.text.split()[-1], second.text.split()[-1]
    everything = await page(server)
    assert "History: the last 50" in everything
    assert '<form method="get" action="/">' in everything
    assert first_id in everything
    assert second_id in everything
    assert "&lt;a&amp;b@erp.test&gt;" in everything
    assert "<a&b@erp.test>" not in everything
    by_sender = await page(server, "?q=erp%40contoso")
    assert second_id in by_sender
    assert first_id not in by_sender
    assert 'value="erp@contoso"' in by_sender
    by_queue_id = await page(server, f"?q={first_id.lower()}")
    assert first_id in by_queue_id
    assert second_id not in by_queue_id
    hostile = await page(server, "?q=%22%3E%3Cscript%3E")
    assert "<script>" not in hostile
    assert "No outcome recorded matches." in hostile


def test_the_history_command_runs_as_its_own_process(sandbox: Sandbox, tmp_path: Path) -> None:
    """Beside a running relay the CLI is another process reading the same files."""
    path = write_config(sandbox, tmp_path, delivery=QUEUE)
    now = time.time()
    old = settled("OLD1", now - 40 * 86400)  # past the 30-day retention, not yet pruned
    recent = [settled("GOOD1", now - 60), settled("BAD1", now - 30, outcome="expired")]
    asyncio.run(FileStore.history_only(tmp_path / "spool").record_history([old, *recent]))
    done = subprocess.run(
        [sys.executable, "-m", "relay", "history", "-c", str(path), "--failed"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert " expired   BAD1 " in done.stdout
    assert "GOOD1" not in done.stdout
    everything = subprocess.run(
        [sys.executable, "-m", "relay", "history", "-c", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [r["queue_id"] for r in json.loads(everything.stdout)] == ["BAD1", "GOOD1"]


JSON_ROUTE = """\
- senders: ["*@contoso.com"]
  auth_object: contoso
  mailbox: sender
  save_to_sent_items: false
"""


async def test_the_send_path_is_recorded_for_json_and_upload(
    start_relay: RelayFactory, sandbox: Sandbox
) -> None:
    """MIME is the default (above); a route that needs JSON, and a message past 4 MB."""
    grant_read_write(sandbox)
    relay = await start_relay(delivery=HYBRID, routes=JSON_ROUTE)
    big = await start_relay(delivery=HYBRID.replace("spool}", "spool2}"), smtp_extra=BIG_SMTP)
    await asmtp_send(port_of(relay), message())
    raw, _ = large_message(4 * MB)
    reply = await asmtp_send(port_of(big), raw)
    assert "delivered" in reply.text
    [as_json] = await outcomes(relay)
    [uploaded] = await outcomes(big)
    assert (as_json.path, uploaded.path) == ("json", "upload")
    assert uploaded.http_status == 202
