"""Messages past Graph's 4 MB request: draft + upload sessions + send, end to end over SMTP.

smtplib -> relay (hybrid mode, spool) -> sandbox Graph over TLS; the sandbox records the
SHA-256 of every uploaded file, so attachments are compared without keeping copies around.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
import smtplib
from collections.abc import AsyncIterator
from email import message_from_bytes
from email.policy import compat32
from pathlib import Path

import aiohttp
import pytest

from relay.config.schema import AuthObjectConfig
from relay.core.limits import single_request_limit
from relay.core.values import SendTarget
from relay.graph.client import GraphClient
from relay.graph.tokens import TokenProvider
from relay.sandbox import Sandbox
from relay.service import RelayService
from tests.conftest import CLIENT_ID, MAILBOX, SECRET, TENANT, RelayFactory, asmtp_send

MB = 1024 * 1024
HYBRID = "{mode: hybrid, inline_timeout: 120s, spool_dir: spool}"
BIG_SMTP = "max_message_size: 210MiB"
SMALL_PDF = random.Random(7).randbytes(100_000)  # noqa: S311 (test data, not secrets)


def grant_read_write(sandbox: Sandbox) -> None:
    sandbox.add_app(TENANT, CLIENT_ID, secret=SECRET, roles=("Mail.Send", "Mail.ReadWrite"))


def port_of(relay: RelayService) -> int:
    return relay.listeners[0].port


def b64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def large_message(size: int, *, seed: int = 1) -> tuple[bytes, str]:
    """A message with a text body, a small PDF and a `size`-byte file; and the file's SHA-256."""
    data = random.Random(seed).randbytes(size)  # noqa: S311 (test data, not secrets)
    digest = hashlib.sha256(data).hexdigest()
    head = (
        f"From: Scanner <{MAILBOX}>\r\nTo: bob@partner.example\r\nSubject: Big scan\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b-1"\r\n\r\n'
        "--b-1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe scan is attached.\r\n"
        '--b-1\r\nContent-Type: application/pdf; name="small.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    big = (
        b'\r\n--b-1\r\nContent-Type: application/zip; name="scan.zip"\r\n'
        b'Content-Disposition: attachment; filename="scan.zip"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    )
    raw = b"".join([head, b64_lines(SMALL_PDF), big, b64_lines(data), b"\r\n--b-1--\r\n"])
    return raw, digest


@pytest.mark.parametrize("size", [5 * MB, 30 * MB])
async def test_a_large_attachment_arrives_byte_exact(
    sandbox: Sandbox, start_relay: RelayFactory, size: int
) -> None:
    """The draft carries text and small attachment; the big file arrives with its SHA-256."""
    grant_read_write(sandbox)
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    raw, digest = large_message(size)
    outcome = await asmtp_send(port_of(relay), raw, recipients=("bob@partner.example", "c@x.test"))
    assert outcome.code == 250
    assert "delivered" in outcome.text
    (mail,) = sandbox.received
    (attachment,) = mail.attachments
    assert (attachment.name, attachment.content_type, attachment.size) == (
        "scan.zip",
        "application/zip",
        size,
    )
    assert attachment.sha256 == digest
    assert sorted(mail.recipients) == ["bob@partner.example", "c@x.test"]  # Bcc added
    assert mail.mime is not None
    assert b64_lines(SMALL_PDF) in mail.mime  # the small attachment went in the draft as it was
    assert sandbox.drafts == 0


async def test_a_150_mb_attachment_arrives_byte_exact(
    sandbox: Sandbox, start_relay: RelayFactory
) -> None:
    """Graph's maximum attachment size goes through the whole chain."""
    grant_read_write(sandbox)
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    raw, digest = large_message(150 * MB, seed=3)
    outcome = await asmtp_send(port_of(relay), raw)
    del raw
    assert outcome.code == 250
    (mail,) = sandbox.received
    assert [(a.size, a.sha256) for a in mail.attachments] == [(150 * MB, digest)]


async def test_the_sent_message_carries_the_uploaded_file(
    sandbox: Sandbox, start_relay: RelayFactory
) -> None:
    """What the sandbox "sends" is the draft plus the file, decodable by a mail reader."""
    grant_read_write(sandbox)
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    raw, digest = large_message(4 * MB)
    assert (await asmtp_send(port_of(relay), raw)).code == 250
    (mail,) = sandbox.received
    assert mail.mime is not None
    parsed = message_from_bytes(mail.mime, policy=compat32)
    files = [p for p in parsed.walk() if p.get_filename() == "scan.zip"]
    payload = files[0].get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert hashlib.sha256(payload).hexdigest() == digest


async def test_a_failed_chunk_is_sent_again_and_the_upload_resumes(
    sandbox: Sandbox, start_relay: RelayFactory
) -> None:
    grant_read_write(sandbox)
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    sandbox.faults.fail_upload_chunk(2, 503)
    raw, digest = large_message(12 * MB)
    outcome = await asmtp_send(port_of(relay), raw)
    assert outcome.code == 250
    assert "delivered" in outcome.text
    assert sandbox.upload_statuses[503] == 1
    assert sandbox.received[0].attachments[0].sha256 == digest


async def test_an_ended_upload_session_defers_the_message_and_deletes_the_draft(
    sandbox: Sandbox, start_relay: RelayFactory
) -> None:
    """A session that is gone fails the attempt (transient); no draft is left behind."""
    grant_read_write(sandbox)
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    sandbox.faults.fail_upload_chunk(1, 404)
    raw, _ = large_message(5 * MB)
    outcome = await asmtp_send(port_of(relay), raw)
    assert outcome.code == 250
    assert "queued" in outcome.text
    assert sandbox.drafts == 0
    assert sandbox.received == []


async def test_a_failed_send_deletes_the_draft(sandbox: Sandbox, start_relay: RelayFactory) -> None:
    grant_read_write(sandbox)
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    sandbox.faults.fail_graph(403, "ErrorSendAsDenied")
    raw, _ = large_message(5 * MB)
    outcome = await asmtp_send(port_of(relay), raw)
    assert (outcome.code, outcome.text[:5]) == (550, "5.7.1")
    assert sandbox.drafts == 0


async def test_without_mail_read_write_the_client_hears_550_with_the_remedy(
    sandbox: Sandbox, start_relay: RelayFactory
) -> None:
    """The fixture's app has Mail.Send only: creating the draft is 403 ErrorAccessDenied."""
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    raw, _ = large_message(5 * MB)
    outcome = await asmtp_send(port_of(relay), raw)
    assert outcome.code == 550
    assert outcome.text.startswith("5.7.1")
    assert "grant Mail.ReadWrite or set large_messages: reject" in outcome.text
    assert sandbox.received == []


def _ehlo_size(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("device.test")
        return int(client.esmtp_features["size"])


async def ehlo_size(port: int) -> int:
    """The SIZE the relay advertises (smtplib blocks: off the loop that serves the relay)."""
    return await asyncio.to_thread(_ehlo_size, port)


async def test_upload_mode_advertises_the_configured_size(start_relay: RelayFactory) -> None:
    relay = await start_relay(delivery=HYBRID, smtp_extra=BIG_SMTP)
    assert await ehlo_size(port_of(relay)) == 210 * MB


async def test_upload_mode_caps_size_at_what_a_150_mb_file_needs(
    start_relay: RelayFactory,
) -> None:
    relay = await start_relay(delivery=HYBRID, smtp_extra="max_message_size: 1GB")
    assert await ehlo_size(port_of(relay)) == 210 * MB


async def test_reject_mode_advertises_one_request_and_refuses_more_at_data(
    sandbox: Sandbox, start_relay: RelayFactory
) -> None:
    grant_read_write(sandbox)
    delivery = "{mode: hybrid, inline_timeout: 5s, spool_dir: spool, large_messages: reject}"
    relay = await start_relay(delivery=delivery, smtp_extra=BIG_SMTP)
    assert await ehlo_size(port_of(relay)) == single_request_limit()
    raw, _ = large_message(5 * MB)
    outcome = await asmtp_send(port_of(relay), raw)
    assert outcome.code == 552
    assert sandbox.received == []
    assert sandbox.drafts == 0


# --- the sandbox's upload-session rules, spoken to directly -------------------------------


class Graph:
    """A bare HTTPS client for the sandbox, with an app token that has Mail.ReadWrite."""

    def __init__(self, sandbox: Sandbox, session: aiohttp.ClientSession) -> None:
        grant_read_write(sandbox)
        self.sandbox, self.session = sandbox, session
        self.auth = {"Authorization": f"Bearer {sandbox.issue_token(TENANT, CLIENT_ID)}"}
        self.base = f"{sandbox.graph_endpoint}/v1.0/users/{MAILBOX}/messages"
        self.tls = sandbox.client_ssl_context()

    async def draft(self) -> str:
        raw, _ = large_message(10)
        async with self.session.post(
            self.base, data=base64.b64encode(raw), headers=self.auth | CT_TEXT, ssl=self.tls
        ) as response:
            assert response.status == 201
            return str((await response.json())["id"])

    async def upload_session(self, draft: str, size: int) -> tuple[int, str]:
        item = {"attachmentType": "file", "name": "f.bin", "size": size}
        async with self.session.post(
            f"{self.base}/{draft}/attachments/createUploadSession",
            json={"AttachmentItem": item},
            headers=self.auth,
            ssl=self.tls,
        ) as response:
            document = await response.json()
            return response.status, str(document.get("uploadUrl", document))

    async def put(
        self, url: str, start: int, data: bytes, total: int, auth: bool = False
    ) -> tuple[int, str]:
        headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/{total}"}
        async with self.session.put(
            url, data=io.BytesIO(data), headers=(self.auth if auth else {}) | headers, ssl=self.tls
        ) as response:
            return response.status, await response.text()


CT_TEXT = {"Content-Type": "text/plain"}
CHUNK = 320 * 1024


@pytest.fixture
async def graph(sandbox: Sandbox) -> AsyncIterator[Graph]:
    async with aiohttp.ClientSession() as session:
        yield Graph(sandbox, session)


async def test_sandbox_refuses_upload_sessions_under_3_mb(graph: Graph) -> None:
    status, text = await graph.upload_session(await graph.draft(), 3 * MB - 1)
    assert status == 400
    assert "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize" in text


async def test_sandbox_needs_mail_read_write_for_drafts(graph: Graph, sandbox: Sandbox) -> None:
    sandbox.add_app(TENANT, CLIENT_ID, secret=SECRET, roles=("Mail.Send",))
    token = sandbox.issue_token(TENANT, CLIENT_ID)
    async with graph.session.post(
        graph.base,
        data=base64.b64encode(b"Subject: x\r\n\r\nx"),
        headers={"Authorization": f"Bearer {token}"} | CT_TEXT,
        ssl=graph.tls,
    ) as response:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "ErrorAccessDenied"


async def test_sandbox_upload_rules(graph: Graph) -> None:
    """No Authorization header; in order; 320 KiB multiples; 200 + nextExpectedRanges; 201."""
    size = 3 * MB + 5
    status, url = await graph.upload_session(await graph.draft(), size)
    assert status == 201
    assert url.startswith(graph.sandbox.base_url + "/upload/")
    data = bytes(size)
    assert (await graph.put(url, 0, data[:CHUNK], size, auth=True))[0] == 401
    assert (await graph.put(url, 0, data[: CHUNK + 1], size))[0] == 400
    assert (await graph.put(url, CHUNK, data[:CHUNK], size))[0] == 416
    status, text = await graph.put(url, 0, data[: 4 * CHUNK], size)
    assert (status, json.loads(text)["nextExpectedRanges"]) == (200, [str(4 * CHUNK)])
    assert (await graph.put(url, 4 * CHUNK, data[4 * CHUNK :], size))[0] == 201
    assert (await graph.put(url, 0, data[:CHUNK], size))[0] == 404  # the session is over


async def test_the_pause_before_a_chunk_is_resent_is_the_clients_parameter(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """GraphClient(chunk_retry_delay=..., sleep=...): the pause is injected, never patched."""
    grant_read_write(sandbox)
    auth = AuthObjectConfig.model_validate(
        {
            "tenant_id": TENANT,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "authority_host": sandbox.authority_host,
            "graph_endpoint": sandbox.graph_endpoint,
            "ca_file": str(sandbox.ca_file),
        },
        context={"environ": {}, "base_dir": tmp_path},
    )
    pauses: list[float] = []

    async def record(seconds: float) -> None:
        pauses.append(seconds)

    tokens = TokenProvider({"contoso": auth})
    graph = GraphClient(tokens, chunk_retry_delay=7.0, sleep=record)
    sandbox.faults.fail_upload_chunk(2, 503)
    raw, digest = large_message(8 * MB)
    target = SendTarget(auth_name="contoso", auth=auth, mailbox=MAILBOX, client_request_id="c")
    try:
        assert (await graph.send_large_mime(target, raw)).status == 202
    finally:
        await graph.close()
        tokens.close()
    assert pauses == [7.0]
    assert sandbox.received[0].attachments[0].sha256 == digest
