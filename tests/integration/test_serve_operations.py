"""`serve` as an administrator runs it day to day (issue 13 item 8): logging to a file that
logrotate renames (SIGUSR1 reopens it), and a client secret rotated with `systemctl reload`
(SIGHUP re-reads `${CREDENTIALS_DIRECTORY}` files).

A real `python -m relay serve` process against the sandbox over TLS, real smtplib, real signals.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.sandbox import Sandbox
from tests.conftest import CLIENT_ID, MAILBOX, SECRET, TENANT, relay_config_text

WAIT = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def send_one(port: int, subject: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("ops-test")
        client.mail(MAILBOX)
        client.rcpt("bob@partner.example")
        return client.data(f"From: {MAILBOX}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())


def write_config(sandbox: Sandbox, tmp_path: Path, port: int, extra: str = "") -> Path:
    """The sandbox's config, its secret read from ${CREDENTIALS_DIRECTORY}/contoso as under
    systemd's LoadCredential=."""
    text = relay_config_text(sandbox, listeners=f"[{{address: 127.0.0.1, port: {port}}}]")
    text = text.replace(
        "client_secret_env: RELAY_TEST_SECRET",
        "client_secret_file: ${CREDENTIALS_DIRECTORY}/contoso",
    )
    path = tmp_path / "relay.yaml"
    path.write_text(text + "\n" + extra)
    return path


@asynccontextmanager
async def serving(config: Path, credentials: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`serve -c config` until the block ends; then SIGTERM, which must exit 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CREDENTIALS_DIRECTORY": str(credentials)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "-c", str(config),
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        yield process
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def stderr_line(process: asyncio.subprocess.Process, text: str) -> str:
    assert process.stderr is not None
    async with asyncio.timeout(WAIT):
        while line := (await process.stderr.readline()).decode():
            if text in line:
                return line
    raise AssertionError(f"serve ended before logging {text!r}")


async def until(predicate: Callable[[], bool]) -> None:
    """Re-check a file's state until it holds: the relay is another process, so nothing here can
    be awaited; bounded by WAIT."""
    async with asyncio.timeout(WAIT):
        while not predicate():  # noqa: ASYNC110 - another process writes the file
            await asyncio.sleep(0.02)


def credentials_with(tmp_path: Path, secret: str) -> Path:
    credentials = tmp_path / "credentials"
    credentials.mkdir(exist_ok=True)
    (credentials / "contoso").write_text(secret + "\n")
    return credentials


async def test_logging_file_is_reopened_at_its_path_on_sigusr1(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """logrotate renames relay.log and sends SIGUSR1: the relay opens a new relay.log at the
    path, and the next lines go there, not to the renamed file. Nothing goes to stderr."""
    port = free_port()
    log_file = tmp_path / "log" / "relay.log"
    log_file.parent.mkdir()
    config = write_config(sandbox, tmp_path, port, f"logging: {{file: {log_file}}}\n")
    async with serving(config, credentials_with(tmp_path, SECRET)) as process:
        await until(lambda: log_file.exists() and "listening on" in log_file.read_text())
        rotated = log_file.with_name("relay.log.1")
        log_file.rename(rotated)
        process.send_signal(signal.SIGUSR1)
        await until(log_file.exists)
        code, reply = await asyncio.to_thread(send_one, port, "after rotation")
        assert code == 250, reply
        queue_id = reply.decode().split()[-1]
        await until(lambda: queue_id in log_file.read_text())
        assert queue_id not in rotated.read_text()
        assert "listening on" in rotated.read_text()
        moved = tmp_path / "log" / "moved.log"
        config.write_text(config.read_text().replace(str(log_file), str(moved)))
        process.send_signal(signal.SIGHUP)  # a reload applies a changed logging.file
        await until(lambda: moved.exists() and "configuration reloaded" in moved.read_text())
    assert process.stderr is not None
    assert await process.stderr.read() == b""


def test_serve_that_cannot_open_its_log_file_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A logging.file in a folder that does not exist: exit 1 before anything starts, one line
    naming the key, the cause and both fixes; no traceback."""
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    config = tmp_path / "relay.yaml"
    config.write_text(
        "smtp: {listeners: [{address: 127.0.0.1, port: 0}]}\n"
        "clients: [{name: c, networks: [127.0.0.1/32], senders: ['*@contoso.com']}]\n"
        f"auth_objects: {{contoso: {{tenant_id: {TENANT}, client_id: {CLIENT_ID}, "
        "client_secret_file: secret.txt}}\n"
        "routes: [{senders: ['*@contoso.com'], auth_object: contoso}]\n"
        "logging: {file: no-such-folder/relay.log}\n"
    )
    assert main(["serve", "-c", str(config)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"cannot start: logging.file {tmp_path / 'no-such-folder' / 'relay.log'}: "
        "No such file or directory; create its folder"
    )
    assert line.endswith("or remove logging.file to log to standard error (journald)")


async def test_a_rotated_secret_file_is_read_again_on_sighup(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Secret rotation as systemd/README.md describes it: the credential file gets secret B,
    Entra has only B (A removed, its tokens revoked), and `systemctl reload` (SIGHUP) makes the
    relay read the file again and get tokens with B. Before the reload, mail is deferred with
    451 4.7.0, never lost or refused."""
    port = free_port()
    credentials = credentials_with(tmp_path, SECRET)
    config = write_config(sandbox, tmp_path, port)
    async with serving(config, credentials) as process:
        await stderr_line(process, "listening on")
        code, reply = await asyncio.to_thread(send_one, port, "with secret A")
        assert code == 250, reply
        credentials_with(tmp_path, "Rb7Q~the-new-secret-value-B")
        sandbox.remove_app(TENANT, CLIENT_ID)
        sandbox.add_app(TENANT, CLIENT_ID, secret="Rb7Q~the-new-secret-value-B")
        sandbox.revoke_tokens()
        code, reply = await asyncio.to_thread(send_one, port, "old secret in memory")
        assert (code, reply.decode()[:5]) == (451, "4.7.0")
        process.send_signal(signal.SIGHUP)
        await stderr_line(process, "configuration reloaded")
        code, reply = await asyncio.to_thread(send_one, port, "with secret B")
        assert code == 250, reply
        subjects = [mail.subject for mail in await sandbox.wait_for_mail(2)]
        assert subjects == ["with secret A", "with secret B"]
