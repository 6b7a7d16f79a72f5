"""No secret in any output (DESIGN §3: "Secrets are never logged, never echoed in errors").

The relay runs against the sandbox through success and every failure path with logging at
debug level in JSON; everything it writes is captured (log records via caplog, the JSON log
stream, the process's stdout/stderr via capfd, and the output of CLI subprocesses) and searched
for the client secrets, every access token the sandbox issued, and SMTP AUTH payloads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.ops.logs import JsonFormatter, setup_logging
from relay.sandbox import Sandbox
from relay.sandbox.access_tokens import AccessTokens
from relay.smtp.auth import hash_password
from tests.conftest import (
    MAILBOX,
    SECRET,
    RelayFactory,
    TlsFiles,
    asmtp_send,
    message,
    relay_config_text,
)

WRONG_SECRET = "Wq9~a-wrong-secret-the-relay-must-not-print-71c3"
PASSWORD = "Pr1nter-Passw0rd!-never-in-a-log"
DEBUG_JSON = "logging: {level: debug, format: json}"


class Captured:
    """Everything the relay wrote during one test, and the secrets it must not contain."""

    def __init__(
        self,
        caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str],
        stream: io.StringIO,
        tokens: list[str],
    ) -> None:
        self.caplog = caplog
        self.capfd = capfd
        self.stream = stream
        self.tokens = tokens
        self.extra: list[str] = []  # CLI output, subprocess output

    def texts(self) -> list[str]:
        out, err = self.capfd.readouterr()
        formatter = JsonFormatter()
        records = [formatter.format(record) for record in self.caplog.records]
        # repr() of each record's arguments and extras too: a secret passed as an argument but
        # left out of the message would still be one str() away from a log file.
        details = [repr(vars(record)) for record in self.caplog.records]
        return [self.caplog.text, self.stream.getvalue(), out, err, *records, *details, *self.extra]

    def assert_clean(self, *secrets: str) -> None:
        texts = self.texts()
        assert sum(map(len, texts)) > 1000, "almost nothing was written: the test proves nothing"
        forbidden = {s for s in secrets if s}
        for token in self.tokens:
            forbidden |= {token, token.rsplit(".", 1)[-1]}  # the whole JWT and its signature
        for text in texts:
            for secret in forbidden:
                assert secret not in text, f"a secret leaked into output: ...{secret[-6:]}"


@pytest.fixture
def issued_tokens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every access token the sandbox's Entra ID issues during the test (a spy on the fake)."""
    tokens: list[str] = []
    issue = AccessTokens.issue

    def recording(self: AccessTokens, *args: object, **kwargs: object) -> str:
        token = issue(self, *args, **kwargs)  # type: ignore[arg-type]
        tokens.append(token)
        return token

    monkeypatch.setattr(AccessTokens, "issue", recording)
    return tokens


@pytest.fixture
def captured(
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    issued_tokens: list[str],
) -> Captured:
    """Debug logging in JSON for the whole process, as `logging: {level: debug}` sets it."""
    stream = io.StringIO()
    setup_logging("debug", "json", stream=stream)
    caplog.set_level(logging.DEBUG)
    return Captured(caplog, capfd, stream, issued_tokens)


def write_config(
    sandbox: Sandbox, tmp_path: Path, *, secret: str = SECRET, **overrides: str
) -> Path:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(secret + "\n")
    text = relay_config_text(sandbox, **overrides).replace(
        "client_secret_env: RELAY_TEST_SECRET", f"client_secret_file: {secret_file}"
    )
    path = tmp_path / "relay.yaml"
    path.write_text(text.replace("admin: {address: 127.0.0.1, port: 0}", "") + "\n" + DEBUG_JSON)
    return path


# --- the relay in this process -----------------------------------------------------------


async def test_delivery_and_graph_failures_leak_nothing(
    start_relay: RelayFactory, sandbox: Sandbox, captured: Captured
) -> None:
    """Success, 403 ErrorSendAsDenied, a revoked token (401, fresh token, retry), a persistent
    401, Entra down: replies as documented, and neither secret nor token in any output."""
    relay = await start_relay()
    port = relay.listeners[0].port
    assert (await asmtp_send(port, message())).code == 250
    sandbox.faults.fail_graph(403, "ErrorSendAsDenied", "denied")
    assert (await asmtp_send(port, message())).code == 550
    sandbox.revoke_tokens()
    assert (await asmtp_send(port, message())).code == 250
    sandbox.faults.fail_graph(401, "InvalidAuthenticationToken", "nope", times=2)
    assert (await asmtp_send(port, message())).code == 451
    sandbox.faults.token_endpoint_down(True)
    sandbox.revoke_tokens()  # Graph says 401, the relay asks Entra again, which is down
    assert (await asmtp_send(port, message())).code == 451
    assert len(captured.tokens) >= 2
    captured.assert_clean(SECRET)


async def test_wrong_secret_leaks_neither_secret(
    start_relay: RelayFactory, sandbox: Sandbox, captured: Captured
) -> None:
    """AADSTS7000215: the log explains the fix without printing the wrong or the right secret."""
    relay = await start_relay(secret=WRONG_SECRET)
    outcome = await asmtp_send(relay.listeners[0].port, message())
    assert (outcome.code, outcome.text[:5]) == (451, "4.7.0")
    assert "AADSTS7000215" in captured.caplog.text
    captured.assert_clean(SECRET, WRONG_SECRET)


# --- the CLI, in this process and as processes -------------------------------------------


async def run_main(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(main, list(argv), out=out)
    return code, out.getvalue()


async def test_cli_commands_print_no_secret(
    sandbox: Sandbox, tmp_path: Path, captured: Captured
) -> None:
    """check-config, test-auth and test-mail, each succeeding and failing."""
    good = write_config(sandbox, _dir(tmp_path / "good"))
    bad = write_config(sandbox, _dir(tmp_path / "bad"), secret=WRONG_SECRET)
    results = [
        await run_main("check-config", "-c", str(good)),
        await run_main("check-config", "-c", str(bad)),
        await run_main("test-auth", "-c", str(good)),
        await run_main("test-auth", "-c", str(bad)),
        await run_main(
            "test-mail", "-c", str(good), "--from", MAILBOX, "--to", "b@partner.example"
        ),
    ]
    sandbox.faults.fail_graph(403, "ErrorSendAsDenied", "denied")
    results.append(
        await run_main("test-mail", "-c", str(good), "--from", MAILBOX, "--to", "b@x.example")
    )
    results.append(
        await run_main("test-mail", "-c", str(bad), "--from", MAILBOX, "--to", "b@x.example")
    )
    assert [code for code, _ in results] == [0, 0, 0, 1, 0, 1, 1]
    assert "AADSTS7000215" in results[3][1]
    captured.extra += [output for _, output in results]
    captured.assert_clean(SECRET, WRONG_SECRET)


def _dir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


async def run_process(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    async with asyncio.timeout(120):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode("utf-8", "replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def serving(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[tuple[int, list[bytes]]]:
    """`serve` as a process at debug level, its combined output collected as it runs."""
    port = free_port()
    path = write_config(sandbox, tmp_path, listeners=f"[{{address: 127.0.0.1, port: {port}}}]")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "-c", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: list[bytes] = []
    listening = asyncio.Event()

    async def collect() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            lines.append(line)
            if b"listening on" in line:
                listening.set()

    reader = asyncio.create_task(collect())
    try:
        async with asyncio.timeout(60):
            await listening.wait()
        yield port, lines
    finally:
        if process.returncode is None:
            process.terminate()
            async with asyncio.timeout(60):
                await process.wait()
        await reader


async def test_processes_print_no_secret(
    sandbox: Sandbox,
    tmp_path: Path,
    captured: Captured,
    serving: tuple[int, list[bytes]],
) -> None:
    """`serve` (success, 403, revoked token) and the CLI commands as real processes."""
    port, serve_output = serving
    assert (await asmtp_send(port, message())).code == 250
    sandbox.faults.fail_graph(403, "ErrorSendAsDenied", "denied")
    assert (await asmtp_send(port, message())).code == 550
    sandbox.revoke_tokens()
    assert (await asmtp_send(port, message())).code == 250
    bad = write_config(sandbox, _dir(tmp_path / "bad"), secret=WRONG_SECRET)
    runs = [
        await run_process("check-config", "-c", str(bad)),
        await run_process("test-auth", "-c", str(bad)),
        await run_process("test-mail", "-c", str(bad), "--from", MAILBOX, "--to", "b@x.example"),
    ]
    assert [code for code, _ in runs] == [0, 1, 1]
    captured.extra += [output for _, output in runs]
    captured.extra.append(b"".join(serve_output).decode("utf-8", "replace"))
    assert '"level": "debug"' in captured.extra[-1]
    assert len(captured.tokens) >= 2
    captured.assert_clean(SECRET, WRONG_SECRET)


# --- SMTP AUTH ----------------------------------------------------------------------------


async def test_auth_payloads_are_never_logged(
    start_relay: RelayFactory, relay_tls: TlsFiles, captured: Captured
) -> None:
    """AUTH PLAIN with an initial response (right password) and AUTH LOGIN with its challenges
    (wrong password) against a real AUTH client: neither the password nor the base64 payloads
    appear anywhere."""
    clients = (
        "- name: printer\n"
        "  username: printer\n"
        f'  password_hash: "{hash_password(PASSWORD)}"\n'
        '  senders: ["*@contoso.com"]\n'
    )
    relay = await start_relay(
        tls=True,
        listeners="[{address: 127.0.0.1, port: 0, tls: starttls, auth: optional}]",
        clients=clients,
    )
    plain = base64.b64encode(f"\0printer\0{PASSWORD}".encode()).decode()
    user = base64.b64encode(b"printer").decode()
    wrong_login = base64.b64encode(f"{PASSWORD}-wrong".encode()).decode()

    async def session(*lines: str) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.listeners[0].port)
        try:
            await _reply(reader)
            await _say(writer, reader, "EHLO device.test")
            assert (await _say(writer, reader, "STARTTLS")).startswith("220 ")
            await writer.start_tls(relay_tls.client_context(), server_hostname="localhost")
            await _say(writer, reader, "EHLO device.test")
            return [(await _say(writer, reader, line))[:3] for line in lines]
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    assert await session(f"AUTH PLAIN {plain}") == ["235"]
    assert await session("AUTH LOGIN", user, wrong_login) == ["334", "334", "535"]
    captured.assert_clean(SECRET, PASSWORD, plain, wrong_login, f"{PASSWORD}-wrong")


async def _reply(reader: asyncio.StreamReader) -> str:
    async with asyncio.timeout(30):
        while True:
            line = (await reader.readline()).decode()
            if line[3:4] != "-":
                return line


async def _say(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, line: str) -> str:
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    return await _reply(reader)
