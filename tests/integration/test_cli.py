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
    """An unknown subcommand or a missing -c is a usage error (exit 2)."""
    assert main(["frobnicate"]) == 2
    assert main(["serve"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_the_bare_command_points_at_the_sandbox_and_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """#13 item 5: no arguments is still a usage error (exit 2), but instead of the whole usage
    it names the two commands a newcomer wants."""
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "smtp-graph-relay: no command given.\n"
        "  Try the relay without a tenant:  smtp-graph-relay sandbox\n"
        "  All commands and options:        smtp-graph-relay --help\n"
    )


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["serve", "-c", "x.yaml", "--verbose"], "usage: smtp-graph-relay serve [-h] -c CONFIG"),
        (
            ["check-config", "-c", "x.yaml", "--strict"],
            "usage: smtp-graph-relay check-config [-h] -c CONFIG",
        ),
    ],
)
def test_an_unknown_option_after_a_subcommand_shows_that_subcommands_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], usage: str
) -> None:
    """#13 item 5: `serve -c x --verbose` shows serve's usage and names the option, not the
    top-level usage (which does not say what serve takes)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert f"error: unrecognized arguments: {argv[-1]}" in err
    assert "COMMAND" not in err


async def test_check_config_prints_the_routing_table_without_secrets(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """check-config exits 0 and shows listeners, clients, auth objects and routes, no secret."""
    code, output = await run_main("check-config", "-c", str(write_config(sandbox, tmp_path)))
    assert code == 0
    assert "is valid" in output
    assert (
        'routes[0] "*@contoso.com" (named after its first sender): '
        "*@contoso.com -> contoso, the sender's own mailbox"
    ) in output
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


# check-config on a file of its own: no network is involved, so no sandbox either. Port 0 and a
# spool beside the file keep its checks of this machine (ops.preflight) quiet anywhere.
OFFLINE_CONFIG = """
smtp: {{listeners: [{{address: 127.0.0.1, port: 0}}]}}
admin: {{port: 0}}
delivery: {{spool_dir: spool}}
clients:
  - name: printers
    networks: [10.0.5.0/24]
    senders: {senders}
auth_objects:
  contoso:
    tenant_id: 11111111-2222-3333-4444-555555555555
    client_id: 66666666-7777-8888-9999-000000000000
    client_secret_file: secret.txt
routes:
{routes}
"""
ONE_ROUTE = "  - {senders: ['*@contoso.com'], auth_object: contoso}"


def check_config(tmp_path: Path, senders: str, routes: str = ONE_ROUTE) -> tuple[int, str]:
    """Run `check-config` on a file with these client senders and routes."""
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "secret.txt").chmod(0o600)  # as the README says; a 0644 secret is a warning
    path = tmp_path / "relay.yaml"
    path.write_text(OFFLINE_CONFIG.format(senders=senders, routes=routes))
    out = io.StringIO()
    return main(["check-config", "-c", str(path)], out=out), out.getvalue()


@pytest.mark.parametrize("pattern", ["*@*", "ops@*"])
def test_check_config_warns_about_a_client_that_may_send_as_any_domain(
    tmp_path: Path, pattern: str
) -> None:
    """#11 item 5: `senders: ["*"]` (or any pattern with a wildcard-only domain) lets a forged
    MAIL FROM through and turns bounces into backscatter. check-config still exits 0, names the
    key, says what to write instead and ends with a summary line."""
    code, output = check_config(tmp_path, f'["scanner@contoso.com", "{pattern}"]')
    assert code == 0
    assert f"clients[0].senders[1]: '{pattern}' matches senders at every domain" in output
    assert "backscatter" in output
    assert "fix: list the senders this client really uses, such as '*@contoso.com'" in output
    assert output.rstrip().endswith("check-config: valid, 1 warning")


def test_check_config_warns_that_a_network_client_with_star_may_send_as_anyone(
    tmp_path: Path,
) -> None:
    """#13 item 4: `senders: ["*"]` on a client known by its network alone means any device on
    that network may send as anyone; one warning at the key, with the network named."""
    code, output = check_config(tmp_path, '["*"]')
    assert code == 0
    assert (
        "  clients[0].senders[0]: '*' on client 'printers', which is known by its network "
        "only: any device on 10.0.5.0/24 may send as anyone, with no password asked"
    ) in output
    assert "fix: list the addresses these devices send as, such as '*@contoso.com'" in output
    assert output.rstrip().endswith("check-config: valid, 1 warning")


def test_check_config_counts_every_warning(tmp_path: Path) -> None:
    """Two such patterns are two warnings, each at its own key."""
    code, output = check_config(tmp_path, '["*", "*@*"]')
    assert code == 0
    assert "clients[0].senders[0]:" in output
    assert "clients[0].senders[1]:" in output
    assert output.rstrip().endswith("check-config: valid, 2 warnings")


def test_check_config_without_warnings_says_so(tmp_path: Path) -> None:
    """Senders named by domain or address are fine: no Warnings section, the summary says so."""
    code, output = check_config(tmp_path, '["*@contoso.com", "scanner@contoso.com"]')
    assert code == 0
    assert "Warnings" not in output
    assert "messages in DATA hold at most 536870912 bytes together" in output
    assert "\nAdmin: http://127.0.0.1:0/ (Host header: 127.0.0.1, localhost)" in output
    assert output.rstrip().endswith("check-config: valid, no warnings")


def test_check_config_shows_each_route_by_the_name_logs_and_metrics_use(tmp_path: Path) -> None:
    """The routing table names each route as logs and metrics do: its `name`, else its first
    sender pattern; with its senders, auth object, mailbox and the options that change the
    message."""
    routes = (
        "  - name: alerts\n"
        "    senders: [alerts@contoso.com, ops@contoso.com]\n"
        "    auth_object: contoso\n"
        "    mailbox: noreply@contoso.com\n"
        "    save_to_sent_items: false\n"
        "  - {senders: ['*@contoso.com'], auth_object: contoso}"
    )
    code, output = check_config(tmp_path, '["*@contoso.com"]', routes)
    assert code == 0
    lines = output.splitlines()
    first = lines.index(
        '  routes[0] "alerts": alerts@contoso.com, ops@contoso.com -> contoso, noreply@contoso.com'
    )
    assert lines[first + 1] == "      rewrite_from false, save_to_sent_items false"
    assert lines[first + 2] == (
        '  routes[1] "*@contoso.com" (named after its first sender): '
        "*@contoso.com -> contoso, the sender's own mailbox"
    )


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


async def test_test_mail_explains_a_graph_refusal_in_one_line(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """#13 item 5: a mailbox Graph does not know is exit 1 and one line in words: the HTTP
    status, ErrorInvalidUser, Graph's message, the request-id and the fix, once; no repr."""
    path = write_config(sandbox, tmp_path)
    code, output = await run_main(
        "test-mail", "-c", str(path), "--from", "ghost@contoso.com", "--to", "x@y.example"
    )
    assert code == 1
    [line] = output.splitlines()
    assert line.startswith("FAIL  HTTP 404 ErrorInvalidUser: ")
    assert "(request-id " in line
    assert line.count("fix: ") == 1
    assert (
        line.partition("fix: ")[2]
        == "the mailbox does not exist in this tenant; check the route's mailbox"
    )
    assert "remedy=" not in line
    assert "error='" not in line


async def test_test_mail_prints_only_its_result_line_as_a_process(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """#13 item 5: as a process, test-mail writes its one result line to stdout and nothing to
    stderr: no relay or urllib3 log records repeat it."""
    path = write_config(sandbox, tmp_path)
    for sender, expected in ((MAILBOX, "OK    "), ("ghost@contoso.com", "FAIL  ")):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "test-mail", "-c", str(path),
            "--from", sender, "--to", "x@y.example",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env(),
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        [line] = out.decode().splitlines()
        assert line.startswith(expected)
        assert err.decode() == ""


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
        "--admin-port", "0", stdout=asyncio.subprocess.PIPE, env=child_env(), cwd=tmp_path,
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
