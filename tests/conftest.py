"""Shared fixtures: the sandbox (fake Entra ID + Graph over TLS) and a real relay wired to it.

Tests build the relay exactly as production does (`load`/`parse_config` -> `RelayService`),
with listeners on loopback port 0 and the auth object pointing at the sandbox, trusting the
sandbox's generated CA through `ca_file`.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.config.load import parse_config
from relay.config.schema import Config
from relay.delivery.workers import RESCAN_SECONDS
from relay.sandbox import Sandbox, SandboxLimits
from relay.service import RelayService

TENANT = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
CLIENT_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
SECRET = "Sb8Q~relay-test-secret-value-4d2f9e"
MAILBOX = "scanner@contoso.com"


@dataclass
class TlsFiles:
    ca: trustme.CA
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def relay_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a server certificate for the relay's own STARTTLS/implicit listeners."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("relay-tls")
    cert_file, key_file = folder / "tls.crt", folder / "tls.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    return TlsFiles(ca, cert_file, key_file)


# Exchange's message, recipient, request and upload limits, raised far beyond what any test
# sends, for the tests that are not about those limits (MailboxConcurrency stays Graph's 4).
# Tests about the limits build their own Sandbox or call `sandbox.set_limits(...)`.
GENEROUS_LIMITS = SandboxLimits(
    messages_per_minute=1_000_000,
    recipients_per_day=100_000_000,
    requests_per_10_minutes=100_000_000,
    upload_per_5_minutes=100_000_000_000,
)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """A started sandbox with one tenant, one app (secret) and one licensed mailbox."""
    state = tmp_path / "sandbox"
    state.mkdir()
    async with Sandbox(state_dir=state, limits=GENEROUS_LIMITS) as sb:
        sb.add_tenant(TENANT)
        sb.add_app(TENANT, CLIENT_ID, secret=SECRET)
        sb.add_mailbox(MAILBOX)
        yield sb


def relay_config_text(
    sandbox: Sandbox,
    *,
    listeners: str = "[{address: 127.0.0.1, port: 0}]",
    smtp_extra: str = "",
    clients: str | None = None,
    routes: str | None = None,
    delivery: str = "{mode: direct, inline_timeout: 5s, spool_dir: spool}",  # its history
    auth_extra: str = "",
) -> str:
    clients = clients or textwrap.dedent(
        """\
        - name: local
          networks: [127.0.0.1/32]
          senders: ["*@contoso.com"]
        """
    )
    routes = routes or textwrap.dedent(
        """\
        - senders: ["*@contoso.com"]
          auth_object: contoso
          mailbox: sender
        """
    )
    return "\n".join(
        [
            "smtp:",
            "  hostname: relay.test",
            f"  listeners: {listeners}",
            textwrap.indent(smtp_extra, "  "),
            "clients:",
            textwrap.indent(clients, "  "),
            "auth_objects:",
            "  contoso:",
            f"    tenant_id: {TENANT}",
            f"    client_id: {CLIENT_ID}",
            "    client_secret_env: RELAY_TEST_SECRET",
            f"    authority_host: {sandbox.authority_host}",
            f"    graph_endpoint: {sandbox.graph_endpoint}",
            f"    ca_file: {sandbox.ca_file}",
            textwrap.indent(auth_extra, "    "),
            "routes:",
            textwrap.indent(routes, "  "),
            f"delivery: {delivery}",
            # relays started as processes must not compete for the default 9025
            "admin: {address: 127.0.0.1, port: 0}",
        ]
    )


def build_config(text: str, base_dir: Path, secret: str = SECRET) -> Config:
    return parse_config(text, base_dir=base_dir, environ={"RELAY_TEST_SECRET": secret})


RelayFactory = Callable[..., Awaitable[RelayService]]


@pytest.fixture
async def start_relay(
    sandbox: Sandbox, tmp_path: Path, relay_tls: TlsFiles
) -> AsyncIterator[RelayFactory]:
    """Start relays configured against the sandbox; all are stopped at teardown."""
    started: list[RelayService] = []

    async def start(
        *, secret: str = SECRET, rescan_seconds: float = RESCAN_SECONDS, **overrides: Any
    ) -> RelayService:
        if "tls" in overrides:
            overrides.pop("tls")
            overrides["smtp_extra"] = (
                f"tls: {{cert_file: {relay_tls.cert_file}, key_file: {relay_tls.key_file}}}\n"
                + overrides.get("smtp_extra", "")
            )
        service = RelayService(
            build_config(relay_config_text(sandbox, **overrides), tmp_path, secret),
            rescan_seconds=rescan_seconds,
        )
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


@pytest.fixture
async def relay(start_relay: RelayFactory) -> RelayService:
    """The default relay: one plain listener, local client, sender-mailbox route."""
    return await start_relay()


def message(
    *,
    sender: str = MAILBOX,
    to: str = "bob@partner.example",
    subject: str = "Scan",
    extra_headers: str = "",
    body: str = "Scanned document attached.\r\n",
) -> bytes:
    head = f"From: Scanner <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n{extra_headers}"
    return (head + "\r\n" + body).encode()


@dataclass(frozen=True)
class SmtpOutcome:
    code: int
    text: str


def smtp_send(
    port: int,
    data: bytes,
    *,
    sender: str = MAILBOX,
    recipients: tuple[str, ...] = ("bob@partner.example",),
    source: str = "127.0.0.1",
    starttls: ssl.SSLContext | None = None,
    implicit: ssl.SSLContext | None = None,
) -> SmtpOutcome:
    """Send one message with smtplib and return the final reply (any stage's refusal)."""
    client: smtplib.SMTP
    try:
        if implicit is not None:
            client = smtplib.SMTP_SSL(
                "127.0.0.1", port, context=implicit, source_address=(source, 0), timeout=30
            )
        else:
            client = smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30)
    except smtplib.SMTPConnectError as refused:  # e.g. 554 5.7.1 instead of the greeting
        error = refused.smtp_error
        return SmtpOutcome(refused.smtp_code, error.decode() if isinstance(error, bytes) else error)
    with client:
        client.ehlo("device.test")
        if starttls is not None:
            client.starttls(context=starttls)
            client.ehlo("device.test")
        code, text = client.mail(sender)
        if code != 250:
            return SmtpOutcome(code, text.decode())
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            if code != 250:
                return SmtpOutcome(code, text.decode())
        code, text = client.data(data)
        return SmtpOutcome(code, text.decode())


# Blocking SMTP clients get their own threads, so a test with many concurrent clients cannot
# starve the loop's default executor.
_CLIENT_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="smtp-client")


async def asmtp_send(port: int, data: bytes, **kwargs: Any) -> SmtpOutcome:
    """smtplib is blocking; run it off the loop that serves the relay and the sandbox."""
    call = partial(smtp_send, port, data, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_CLIENT_THREADS, call)


@pytest.fixture
def log_records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level("INFO")
    return caplog


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """CLI entry points configure logging for the process; undo that after each test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
