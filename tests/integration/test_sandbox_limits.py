"""The sandbox enforces Exchange Online's and Graph's sending limits, in Microsoft's shapes.

A real aiohttp client talks to the real sandbox over TLS; the sandbox's clock is injected so
that windows roll over without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.sandbox import Sandbox, SandboxLimits

TENANT = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
CLIENT = "11111111-2222-3333-4444-555555555555"
OTHER_CLIENT = "66666666-7777-8888-9999-000000000000"
MAILBOX = "scanner@contoso.com"
CHUNK = 640 * 1024  # two upload units of 320 KiB
ATTACHMENT = 3 * 1024 * 1024  # the smallest file an upload session takes


class FakeClock:
    """The sandbox's clock: real time at the start, then moved only by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def code(self) -> str:
        return str(self.body["error"]["code"])

    @property
    def message(self) -> str:
        return str(self.body["error"]["message"])


@dataclass
class Rig:
    sandbox: Sandbox
    clock: FakeClock
    http: aiohttp.ClientSession
    token: str
    other_token: str

    async def call(
        self,
        method: str,
        url: str,
        data: bytes | str = b"",
        *,
        token: str | None = None,
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = {"Content-Type": content_type, **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        payload = io.BytesIO(data) if isinstance(data, bytes) else data
        async with self.http.request(method, url, data=payload, headers=sent) as response:
            text = await response.text()
            body = json.loads(text) if response.content_type == "application/json" else text
            return Answer(response.status, dict(response.headers), body)

    async def send(
        self, *, to: str = "alice@example.org", cc: str = "", token: str | None = None
    ) -> Answer:
        return await self.call(
            "POST", self.url("sendMail"), base64.b64encode(mime(to, cc)), token=token or self.token
        )

    async def send_json(self, recipients: list[str]) -> Answer:
        message = {
            "subject": "json",
            "body": {"contentType": "Text", "content": "hi"},
            "toRecipients": [{"emailAddress": {"address": a}} for a in recipients],
        }
        document = json.dumps({"message": message})
        return await self.call(
            "POST",
            self.url("sendMail"),
            document,
            token=self.token,
            content_type="application/json",
        )

    def url(self, tail: str) -> str:
        return f"{self.sandbox.graph_endpoint}/v1.0/users/{MAILBOX}/{tail}"

    async def draft(self) -> str:
        answer = await self.call(
            "POST", self.url("messages"), base64.b64encode(mime()), token=self.token
        )
        assert answer.status == 201, answer
        return str(answer.body["id"])

    async def upload_url(self, draft: str) -> str:
        item = {
            "AttachmentItem": {"attachmentType": "file", "name": "scan.pdf", "size": ATTACHMENT}
        }
        answer = await self.call(
            "POST",
            self.url(f"messages/{draft}/attachments/createUploadSession"),
            json.dumps(item),
            token=self.token,
            content_type="application/json",
        )
        assert answer.status == 201, answer
        return str(answer.body["uploadUrl"])

    async def put(self, upload_url: str, start: int) -> Answer:
        end = start + CHUNK - 1
        headers = {"Content-Range": f"bytes {start}-{end}/{ATTACHMENT}"}
        return await self.call(
            "PUT",
            upload_url,
            b"x" * CHUNK,
            content_type="application/octet-stream",
            headers=headers,
        )


def mime(to: str = "alice@example.org", cc: str = "", subject: str = "Scan") -> bytes:
    lines = [f"From: {MAILBOX}", f"To: {to}", f"Subject: {subject}", "Message-ID: <m1@contoso.com>"]
    if cc:
        lines.append(f"Cc: {cc}")
    return "\r\n".join([*lines, "", "Hello."]).encode()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = FakeClock()
    sandbox = Sandbox(state_dir=tmp_path / "state", mail_dir=tmp_path / "mail", clock=clock)
    async with sandbox:
        for client in (CLIENT, OTHER_CLIENT):
            sandbox.add_app(TENANT, client, secret="s3cret", roles=("Mail.Send", "Mail.ReadWrite"))
        sandbox.add_mailbox(MAILBOX)
        tls = ssl.create_default_context(cafile=str(sandbox.ca_file))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as http:
            yield Rig(
                sandbox,
                clock,
                http,
                sandbox.issue_token(TENANT, CLIENT),
                sandbox.issue_token(TENANT, OTHER_CLIENT),
            )


# -- Exchange's limits: per mailbox, across apps --------------------------------------------


async def test_messages_over_the_minute_limit_get_429_with_the_time_until_room(rig: Rig) -> None:
    """The third message in a minute gets 429 ErrorExceededMessageLimit, from any app, with
    Retry-After counting down to the oldest message leaving the window."""
    rig.sandbox.set_limits(messages_per_minute=2)
    assert [(await rig.send()).status for _ in range(2)] == [202, 202]
    rig.clock.advance(15.2)
    refused = await rig.send(token=rig.other_token)
    assert (refused.status, refused.code) == (429, "ErrorExceededMessageLimit")
    assert refused.message == (
        "Cannot send mail: the mailbox has exceeded its sending limit of 2 messages per minute."
    )
    assert refused.headers["Retry-After"] == "45"  # ceil(60 - 15.2)
    assert refused.body["error"]["innerError"]["request-id"] == refused.headers["request-id"]
    rig.clock.advance(44.8)  # the first two are now exactly 60 s old: out of the window
    assert (await rig.send()).status == 202
    assert len(rig.sandbox.received) == 3
    assert rig.sandbox.violations == {"messages_per_minute": 1}


async def test_recipients_over_the_daily_limit_get_403_without_retry_after(rig: Rig) -> None:
    """To + Cc + Bcc count; the message that would pass the daily total gets 403
    ErrorExceededMessageLimit (JSON or MIME alike) and is not recorded."""
    rig.sandbox.set_limits(recipients_per_day=3)
    assert (await rig.send(to="a@example.org", cc="b@example.org")).status == 202
    refused = await rig.send_json(["c@example.org", "d@example.org"])
    assert (refused.status, refused.code) == (403, "ErrorExceededMessageLimit")
    assert "limit of 3 recipients per day" in refused.message
    assert "Retry-After" not in refused.headers
    assert (await rig.send_json(["c@example.org"])).status == 202
    rig.clock.advance(86_400)
    rig.token = rig.sandbox.issue_token(TENANT, CLIENT)  # a day later the old one has expired
    assert (await rig.send_json(["e@example.org", "f@example.org", "g@example.org"])).status == 202
    assert len(rig.sandbox.received) == 3
    assert rig.sandbox.violations == {"recipients_per_day": 1}


async def test_a_refused_request_is_not_a_message(rig: Rig) -> None:
    """A 400 answer does not use up the mailbox's messages."""
    rig.sandbox.set_limits(messages_per_minute=1)
    bad = await rig.call("POST", rig.url("sendMail"), "not base64!", token=rig.token)
    assert bad.status == 400
    assert (await rig.send()).status == 202


async def test_the_drafts_send_counts_as_a_message(rig: Rig) -> None:
    """The large path's /send is where its message is accepted, so it is counted there."""
    rig.sandbox.set_limits(messages_per_minute=1)
    draft = await rig.draft()
    assert (await rig.send()).status == 202
    refused = await rig.call("POST", rig.url(f"messages/{draft}/send"), token=rig.token)
    assert (refused.status, refused.code) == (429, "ErrorExceededMessageLimit")
    assert rig.sandbox.drafts == 1  # refused: still a draft


# -- NDR mode: Exchange answers 202, then refuses ------------------------------------------


@pytest.mark.parametrize(
    ("limits", "status", "text"),
    [
        (
            {"messages_per_minute": 1},
            "5.2.0",
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        ),
        (
            {"recipients_per_day": 1},
            "5.1.90",
            "550 5.1.90 Your message can't be sent because you've reached your daily limit "
            "for message recipients",
        ),
    ],
)
async def test_ndr_mode_answers_202_and_lands_an_ndr_instead_of_the_message(
    rig: Rig, tmp_path: Path, limits: dict[str, int], status: str, text: str
) -> None:
    rig.sandbox.set_limits(exchange_answer="ndr", **limits)
    assert (await rig.send()).status == 202
    assert (await rig.send(to="b@example.org")).status == 202
    assert len(rig.sandbox.received) == 1
    [ndr] = rig.sandbox.ndrs
    assert (ndr.mailbox, ndr.status, ndr.text) == (MAILBOX, status, text)
    assert (ndr.message_id, ndr.subject, ndr.at) == ("<m1@contoso.com>", "Scan", rig.clock.now)
    assert sum(rig.sandbox.violations.values()) == 1
    [filed] = (tmp_path / "mail").glob("*.ndr.eml")
    assert text in filed.read_text()
    assert "NDR" in (tmp_path / "mail" / "index.html").read_text()


async def test_ndr_delay_lands_the_ndr_later(rig: Rig) -> None:
    rig.sandbox.set_limits(exchange_answer="ndr", messages_per_minute=1, ndr_delay=0.05)
    assert (await rig.send()).status == 202
    assert (await rig.send()).status == 202
    assert rig.sandbox.ndrs == []
    await rig.sandbox.wait_until(lambda: len(rig.sandbox.ndrs) == 1, timeout=5)
    assert len(rig.sandbox.received) == 1


# -- Graph's limits: per app and mailbox -----------------------------------------------------


async def test_requests_over_the_limit_get_429_application_throttled(rig: Rig) -> None:
    """Every authenticated request counts, refused ones too; the limit is per app."""
    rig.sandbox.set_limits(requests_per_10_minutes=3)
    assert (await rig.call("POST", rig.url("sendMail"), "bad", token=rig.token)).status == 400
    rig.clock.advance(0.25)
    assert (await rig.send()).status == 202
    rig.clock.advance(0.25)
    assert (await rig.draft()) != ""
    throttled = await rig.send()
    assert (throttled.status, throttled.code) == (429, "ApplicationThrottled")
    assert "request limit of 3 requests per 10 minutes" in throttled.message
    assert throttled.headers["Retry-After"] == "600"  # ceil(600 - 0.5)
    assert (await rig.send(token=rig.other_token)).status == 202
    rig.clock.advance(599.5)
    assert (await rig.send()).status == 202
    assert rig.sandbox.violations == {"requests_per_10_minutes": 1}


async def test_upload_puts_count_as_requests_of_the_drafts_app(rig: Rig) -> None:
    rig.sandbox.set_limits(requests_per_10_minutes=3)
    upload_url = await rig.upload_url(await rig.draft())
    assert (await rig.put(upload_url, 0)).status == 200
    throttled = await rig.put(upload_url, CHUNK)
    assert (throttled.status, throttled.code) == (429, "ApplicationThrottled")
    assert "request limit" in throttled.message


async def test_upload_bytes_over_the_limit_get_429_incoming_bytes(rig: Rig) -> None:
    rig.sandbox.set_limits(upload_per_5_minutes=CHUNK + 1000)
    upload_url = await rig.upload_url(await rig.draft())
    assert (await rig.put(upload_url, 0)).status == 200
    rig.clock.advance(100.5)
    throttled = await rig.put(upload_url, CHUNK)
    assert (throttled.status, throttled.code) == (429, "ApplicationThrottled")
    assert throttled.message == "Application is over its IncomingBytes limit."
    assert throttled.headers["Retry-After"] == "200"  # ceil(300 - 100.5)
    rig.clock.advance(199.5)
    assert (await rig.put(upload_url, CHUNK)).status == 200
    assert rig.sandbox.violations == {"upload_per_5_minutes": 1}


async def test_concurrent_requests_over_the_limit_get_429_mailbox_concurrency(rig: Rig) -> None:
    rig.sandbox.set_limits(concurrent_requests=2)
    rig.sandbox.faults.hold_graph()
    tasks = [asyncio.create_task(rig.send()) for _ in range(3)]
    await rig.sandbox.wait_until(lambda: rig.sandbox.graph_statuses[429] == 1)
    rig.sandbox.faults.release_graph()
    answers = await asyncio.gather(*tasks)
    assert sorted(a.status for a in answers) == [202, 202, 429]
    [throttled] = [a for a in answers if a.status == 429]
    assert (throttled.code, throttled.headers["Retry-After"]) == ("ApplicationThrottled", "1")
    assert throttled.message == "Application is over its MailboxConcurrency limit."
    assert rig.sandbox.violations == {"concurrent_requests": 1}


# -- the control API -------------------------------------------------------------------------


async def test_control_api_reads_and_changes_the_limits(rig: Rig) -> None:
    url = f"{rig.sandbox.base_url}/_sandbox/limits"
    got = await rig.call("GET", url)
    assert got.status == 200
    assert got.body["limits"]["messages_per_minute"] == 30
    assert got.body["limits"]["exchange_answer"] == "error"
    assert got.body["violations"]["upload_per_5_minutes"] == 0
    assert got.body["ndrs"] == 0
    changed = await rig.call(
        "PUT", url, json.dumps({"messages_per_minute": 1, "messages_window": 5}),
        content_type="application/json",
    )  # fmt: skip
    assert changed.status == 200
    assert changed.body["limits"]["messages_per_minute"] == 1
    assert rig.sandbox.limits.messages_window == 5.0
    await rig.send()
    await rig.send()
    assert (await rig.call("GET", url)).body["violations"]["messages_per_minute"] == 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ('{"messages_per_hour": 5}', "unknown sandbox limit messages_per_hour"),
        ('{"messages_per_minute": 0}', "messages_per_minute must be a whole number"),
        ('{"exchange_answer": "bounce"}', "exchange_answer must be 'error' or 'ndr'"),
        ("[1, 2]", "JSON object"),
        ("not json", "JSON object"),
    ],
)
async def test_control_api_refuses_bad_changes_with_400(rig: Rig, body: str, words: str) -> None:
    answer = await rig.call(
        "PUT", f"{rig.sandbox.base_url}/_sandbox/limits", body, content_type="application/json"
    )
    assert answer.status == 400
    assert words in answer.message
    assert rig.sandbox.limits == SandboxLimits()


async def test_the_default_limits_are_microsofts(tmp_path: Path) -> None:
    sandbox = Sandbox(state_dir=tmp_path)
    assert sandbox.limits == SandboxLimits()
    assert (sandbox.limits.messages_per_minute, sandbox.limits.recipients_per_day) == (30, 10_000)
    assert sandbox.limits.upload_per_5_minutes == 150 * 1024 * 1024
    with pytest.raises(ValueError, match="requests_window must be more than 0"):
        sandbox.set_limits(requests_window=0)
