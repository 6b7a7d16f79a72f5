"""Real SMTP clients from Debian (swaks, msmtp) against the real relay and the sandbox.

These catch what smtplib is too forgiving to notice: pipelining, STARTTLS handshakes by other
TLS stacks (swaks: OpenSSL via Net::SSLeay, msmtp: GnuTLS), and how the replies read to tools
that administrators actually use. In CI (CI=true) a missing tool fails the run; on a developer
machine without root it is skipped with a note.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from relay.sandbox import Sandbox
from relay.service import RelayService
from tests.conftest import MAILBOX, RelayFactory, TlsFiles, message

pytestmark = pytest.mark.e2e


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; scripts/run-tests installs it with apt")
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


async def run(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run a client to completion on the test's loop, which also serves relay and sandbox."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def swaks(port: int, *extra: str, sender: str = MAILBOX) -> list[str]:
    return [
        tool("swaks"),
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "mfp.example",
        "--from",
        sender,
        "--to",
        "bob@partner.example",
        "--header",
        "Subject: swaks e2e",
        "--body",
        "Hello from swaks.",
        *extra,
    ]


async def test_swaks_plain_delivers(relay: RelayService, sandbox: Sandbox) -> None:
    """swaks over plain SMTP gets 250 and Graph receives the message."""
    code, output = await run(*swaks(relay.listeners[0].port))
    assert code == 0, output
    assert "250 2.0.0 Ok: delivered" in output
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.subject == "swaks e2e"
    assert mail.recipients == ("bob@partner.example",)


async def test_swaks_pipelining_delivers(relay: RelayService, sandbox: Sandbox) -> None:
    """With PIPELINING the MAIL/RCPT/DATA replies stay in step."""
    code, output = await run(*swaks(relay.listeners[0].port, "--pipeline"))
    assert code == 0, output
    assert len(await sandbox.wait_for_mail(1)) == 1


async def test_swaks_starttls_delivers(
    start_relay: RelayFactory, sandbox: Sandbox, relay_tls: TlsFiles
) -> None:
    """swaks --tls upgrades with STARTTLS and delivers."""
    relay = await start_relay(tls=True, listeners="[{address: 127.0.0.1, port: 0, tls: starttls}]")
    code, output = await run(*swaks(relay.listeners[0].port, "--tls"))
    assert code == 0, output
    assert "STARTTLS" in output
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.mime is not None
    assert b"with ESMTPS" in mail.mime


async def test_swaks_implicit_tls_delivers(
    start_relay: RelayFactory, sandbox: Sandbox, relay_tls: TlsFiles
) -> None:
    """swaks --tls-on-connect talks to an implicit-TLS listener."""
    relay = await start_relay(tls=True, listeners="[{address: 127.0.0.1, port: 0, tls: implicit}]")
    code, output = await run(*swaks(relay.listeners[0].port, "--tls-on-connect"))
    assert code == 0, output
    assert len(await sandbox.wait_for_mail(1)) == 1


async def test_swaks_sees_the_refusal_of_a_foreign_sender(
    relay: RelayService, sandbox: Sandbox
) -> None:
    """A sender outside the client's patterns: swaks fails and shows 550 5.7.1."""
    code, output = await run(*swaks(relay.listeners[0].port, sender="ceo@fabrikam.example"))
    assert code != 0
    assert "550 5.7.1 Sender <ceo@fabrikam.example> is not allowed" in output
    assert sandbox.received == []


def msmtp(port: int, *extra: str) -> list[str]:
    return [
        tool("msmtp"),
        "--file=/dev/null",  # ignore any ~/.msmtprc
        "--host=127.0.0.1",
        f"--port={port}",
        "--auth=off",
        f"--from={MAILBOX}",
        "--domain=erp.example",
        *extra,
        "bob@partner.example",
    ]


async def test_msmtp_plain_delivers(relay: RelayService, sandbox: Sandbox) -> None:
    """msmtp (as cron and monitoring tools use it) delivers over plain SMTP."""
    code, output = await run(
        *msmtp(relay.listeners[0].port, "--tls=off"), stdin=message(subject="msmtp plain")
    )
    assert code == 0, output
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.subject == "msmtp plain"


@pytest.mark.parametrize(
    ("tls", "starttls"), [("starttls", "on"), ("implicit", "off")], ids=["starttls", "implicit"]
)
async def test_msmtp_verifies_the_relay_certificate_and_delivers_over_tls(
    start_relay: RelayFactory,
    sandbox: Sandbox,
    relay_tls: TlsFiles,
    tmp_path: Path,
    tls: str,
    starttls: str,
) -> None:
    """msmtp with STARTTLS, or with implicit TLS (tls_starttls off), verifies the relay's
    certificate against the relay's CA and delivers."""
    relay = await start_relay(tls=True, listeners=f"[{{address: 127.0.0.1, port: 0, tls: {tls}}}]")
    ca_file = tmp_path / "relay-ca.pem"
    relay_tls.ca.cert_pem.write_to_path(str(ca_file))
    code, output = await run(
        *msmtp(
            relay.listeners[0].port,
            "--tls=on",
            f"--tls-starttls={starttls}",
            f"--tls-trust-file={ca_file}",
        ),
        stdin=message(subject=f"msmtp {tls}"),
    )
    assert code == 0, output
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.subject == f"msmtp {tls}"


async def test_msmtp_reports_a_temporary_failure(relay: RelayService, sandbox: Sandbox) -> None:
    """A Graph outage reaches msmtp as 451 4.4.2: it fails, keeps nothing, shows why."""
    sandbox.faults.fail_graph(503, "ServiceUnavailable", "try later")
    code, output = await run(*msmtp(relay.listeners[0].port, "--tls=off"), stdin=message())
    assert code != 0, output
    assert "451 4.4.2" in output
    assert sandbox.received == []
