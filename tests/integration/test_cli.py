"""The command line as administrators use it: exit codes, what it prints, and that it works
against the sandbox's Entra ID and Graph (test-auth, test-mail) and as a process (serve,
sandbox) that stops cleanly on a signal."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import smtplib
import socket
import sys
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.sandbox import Sandbox
from tests.conftest import CLIENT_ID, MAILBOX, SECRET, TENANT, relay_config_text


def write_config(sandbox: Sandbox, tmp_path: Path, secret: str = SECRET, **overrides: str) -> Path:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(secret + "\n")
    text = relay_config_text(sandbox, **overrides).replace(
        "client_secret_env: RELAY_TEST_SECRET", f"client_secret_file: {secret_file}"
    )
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return path


async def run_main(*argv: str) -> tuple[int, str]:
    """main() runs its own event loop; give it a thread so the sandbox keeps serving here."""
    out = io.StringIO()
    code = await asyncio.to_thread(main, list(argv), out=out)
    return code, out.getvalue()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """No subcommand, an unknown one, or a missing -c is a usage error (exit 2)."""
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["serve"]) == 2
    assert "usage:" in capsys.readouterr().err


async def test_check_config_prints_the_routing_table_without_secrets(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """check-config exits 0 and shows listeners, clients, auth objects and routes, no secret."""
    code, output = await run_main("check-config", "-c", str(write_config(sandbox, tmp_path)))
    assert code == 0
    assert "is valid" in output
    assert "routes[0] *@contoso.com -> contoso, the sender's own mailbox" in output
    assert f"tenant {TENANT}, client {CLIENT_ID}" in output
    assert "client secret from file" in output
    assert SECRET not in output


async def test_check_config_reports_errors_with_their_path(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid file exits 1 with the key path on stderr."""
    path = write_config(sandbox, tmp_path)
    path.write_text(path.read_text().replace("mailbox: sender", "mailbox: nobody"))
    code, _ = await run_main("check-config", "-c", str(path))
    assert code == 1
    assert "routes[0].mailbox: 'nobody' must be 'sender'" in capsys.readouterr().err


async def test_test_auth_succeeds_and_shows_the_roles(sandbox: Sandbox, tmp_path: Path) -> None:
    """test-auth gets a token from Entra ID and shows the application roles it carries."""
    code, output = await run_main("test-auth", "-c", str(write_config(sandbox, tmp_path)))
    assert code == 0, output
    assert "OK    contoso: token acquired; application roles: Mail.Send" in output


async def test_test_auth_names_the_aadsts_code_and_the_fix(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """A wrong secret fails with AADSTS7000215 and the setup step that fixes it."""
    path = write_config(sandbox, tmp_path, secret="wrong-secret-value")
    code, output = await run_main("test-auth", "-c", str(path), "contoso")
    assert code == 1
    assert "FAIL  contoso: AADSTS7000215" in output
    assert "fix:" in output
    assert "Certificates & secrets" in output
    assert "wrong-secret-value" not in output


async def test_test_auth_flags_missing_mail_send_consent(sandbox: Sandbox, tmp_path: Path) -> None:
    """A token without the Mail.Send role means admin consent is missing: exit 1 and say so."""
    sandbox.remove_app(TENANT, CLIENT_ID)
    sandbox.add_app(TENANT, CLIENT_ID, secret=SECRET, roles=())
    code, output = await run_main("test-auth", "-c", str(write_config(sandbox, tmp_path)))
    assert code == 1
    assert "Mail.Send" in output
    assert "admin consent" in output


async def test_test_auth_refuses_an_unknown_name(sandbox: Sandbox, tmp_path: Path) -> None:
    """Naming an auth object that is not configured is a usage error."""
    code, _ = await run_main("test-auth", "-c", str(write_config(sandbox, tmp_path)), "nope")
    assert code == 2


async def test_test_mail_sends_one_message_through_the_route(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """test-mail delivers a message from the route's mailbox and prints Graph's request-id."""
    path = write_config(sandbox, tmp_path)
    code, output = await run_main(
        "test-mail", "-c", str(path), "--from", MAILBOX, "--to", "x@y.example"
    )
    assert code == 0, output
    [mail] = sandbox.received
    assert mail.subject == "smtp-graph-relay test message"
    assert mail.recipients == ("x@y.example",)
    assert f"request-id {mail.request_id}" in output


async def test_test_mail_explains_a_graph_refusal(sandbox: Sandbox, tmp_path: Path) -> None:
    """A mailbox Graph does not know: exit 1 with ErrorInvalidUser and the fix."""
    path = write_config(sandbox, tmp_path)
    code, output = await run_main(
        "test-mail", "-c", str(path), "--from", "ghost@contoso.com", "--to", "x@y.example"
    )
    assert code == 1
    assert "ErrorInvalidUser" in output
    assert "fix:" in output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_for_line(stream: asyncio.StreamReader, text: str) -> list[str]:
    seen: list[str] = []
    async with asyncio.timeout(30):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before printing {text!r}:\n{''.join(seen)}")
            seen.append(line)
            if text in line:
                return seen


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def send_one(port: int, subject: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("cli-test")
        client.mail(MAILBOX)
        client.rcpt("bob@partner.example")
        return client.data(f"From: {MAILBOX}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())


async def test_serve_runs_until_sigterm_and_exits_0(sandbox: Sandbox, tmp_path: Path) -> None:
    """`serve` binds, delivers, and on SIGTERM stops cleanly with exit code 0."""
    port = free_port()
    path = write_config(sandbox, tmp_path, listeners=f"[{{address: 127.0.0.1, port: {port}}}]")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    try:
        assert process.stderr is not None
        await wait_for_line(process.stderr, "listening on")
        code, text = await asyncio.to_thread(send_one, port, "via serve")
        assert code == 250, text
        assert (await sandbox.wait_for_mail(1))[0].subject == "via serve"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sandbox_command_shows_received_mail(tmp_path: Path) -> None:
    """`sandbox` needs no tenant: it prints instructions, writes what Graph got, stops on ^C."""
    port = free_port()
    mail_dir = tmp_path / "mail"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "sandbox", "--port", str(port), "--mail-dir", str(mail_dir),
        stdout=asyncio.subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        printed = "".join(await wait_for_line(process.stdout, "Stop with Ctrl-C"))
        assert f"swaks --server 127.0.0.1:{port}" in printed
        assert str(mail_dir.resolve() / "index.html") in printed
        code, text = await asyncio.to_thread(send_one, port, "sandbox hello")
        assert code == 250, text
        assert len(list(mail_dir.glob("*.eml"))) == 1
        assert "sandbox hello" in (mail_dir / "index.html").read_text()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
