"""`smtp-graph-relay sandbox` as a new administrator meets it (issue 13 item 2).

The command runs as a real process; it is driven with real smtplib and aiohttp and stopped
with a signal, then its leftovers are checked with `check-config` through `main(argv)`.
"""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from relay.cli.main import main
from tests.integration.test_cli import child_env, free_port, wait_for_line


@asynccontextmanager
async def running_sandbox(tmp_path: Path, *args: str) -> AsyncIterator[str]:
    """Start the command in `tmp_path`, yield what it printed, stop it with SIGINT (exit 0)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "sandbox", "--port", str(free_port()),
        "--admin-port", "0", *args,
        stdout=asyncio.subprocess.PIPE, env=child_env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        yield "".join(await wait_for_line(process.stdout, "Stop with Ctrl-C"))
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "scanner@example.com",
            ["to@example.com", "cc@example.com", "hidden@example.com"],
            b"From: scanner@example.com\r\nTo: to@example.com\r\nCc: cc@example.com\r\n"
            b"Subject: columns\r\n\r\nhello\r\n",
        )


async def test_the_config_is_left_behind_and_passes_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After stop: ./sandbox-config.yaml, its secret (0600) and CA in ./sandbox-state/, valid."""
    async with running_sandbox(tmp_path) as printed:
        assert f"check-config -c {tmp_path / 'sandbox-config.yaml'}" in printed
    config = tmp_path / "sandbox-config.yaml"
    assert "client_secret_file: sandbox-state/client-secret" in config.read_text()
    secret = tmp_path / "sandbox-state" / "client-secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (tmp_path / "sandbox-state" / "ca.pem").is_file()
    capsys.readouterr()
    assert main(["check-config", "-c", str(config)]) == 0
    assert "check-config: valid" in capsys.readouterr().out


async def test_config_out_moves_the_config_and_its_state_folder(tmp_path: Path) -> None:
    target = tmp_path / "examples" / "relay.yaml"
    async with running_sandbox(tmp_path, "--config-out", str(target)):
        pass
    assert target.is_file()
    assert (tmp_path / "examples" / "sandbox-state" / "client-secret").is_file()
    assert not (tmp_path / "sandbox-config.yaml").exists()


async def test_admin_endpoint_limits_and_index_columns(tmp_path: Path) -> None:
    """The printed /metrics answers; --limit reaches the sandbox; index.html has the send path,
    the size and To / Cc / Bcc apart."""
    async with running_sandbox(
        tmp_path, "--limit", "messages_per_minute=7", "--limit", "upload_per_5_minutes=20MB",
        "--exchange-answer", "ndr",
    ) as printed:  # fmt: skip
        metrics_url = re.search(r"Metrics: +(\S+)", printed)
        port = re.search(r"SMTP relay: +127\.0\.0\.1:(\d+)", printed)
        control = re.search(r"(https://\S+/_sandbox/limits)", printed)
        assert metrics_url, printed
        assert port, printed
        assert control, printed
        assert "7 messages per minute" in printed
        async with aiohttp.ClientSession() as http, http.get(metrics_url[1]) as response:
            assert response.status == 200
            assert "# TYPE" in await response.text()
        tls = ssl.create_default_context(cafile=str(tmp_path / "sandbox-state" / "ca.pem"))
        connector = aiohttp.TCPConnector(ssl=tls)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(control[1]) as response,
        ):
            limits = (await response.json())["limits"]
        assert limits["messages_per_minute"] == 7
        assert limits["upload_per_5_minutes"] == 20_000_000
        assert limits["exchange_answer"] == "ndr"
        await asyncio.to_thread(send, int(port[1]))
        index = (tmp_path / "sandbox-mail" / "index.html").read_text()
    for column in ("<th>Path</th>", "<th>Size</th>", "<th>To</th>", "<th>Cc</th>", "<th>Bcc</th>"):
        assert column in index
    row = next(line for line in index.splitlines() if "columns" in line)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[2] == "MIME"
    assert cells[5:8] == ["to@example.com", "cc@example.com", "hidden@example.com"]
    assert "rebuilt from draft" in index


def test_listening_beyond_loopback_without_allow_exits_2_with_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cfg.yaml"
    assert main(["sandbox", "--listen", "0.0.0.0", "--config-out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "--listen 0.0.0.0 lets other machines connect: add --allow 192.168.1.0/24 "
        "(the network of your printer)"
    )
    assert len(error.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--allow", "not-a-network", "--listen", "0.0.0.0"], "--allow not-a-network"),
        (["--listen", "printer.lan"], "--listen printer.lan: give an IP address"),
        (["--limit", "messages_per_hour=5"], "unknown sandbox limit messages_per_hour"),
        (["--limit", "messages_per_minute=fast"], "--limit messages_per_minute=fast"),
        (["--limit", "messages_per_minute"], "write NAME=VALUE"),
    ],
)
def test_bad_sandbox_flags_exit_2_with_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sandbox", *argv]) == 2
    assert words in capsys.readouterr().err


async def test_allowed_networks_become_the_clients_networks(tmp_path: Path) -> None:
    async with running_sandbox(
        tmp_path, "--listen", "0.0.0.0", "--allow", "10.9.0.0/16"
    ) as printed:
        assert "this machine and 10.9.0.0/16 may connect" in printed
    config = (tmp_path / "sandbox-config.yaml").read_text()
    assert 'networks: ["127.0.0.0/8", "::1/128", "10.9.0.0/16"]' in config
    assert 'address: "0.0.0.0"' in config
