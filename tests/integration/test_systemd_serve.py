"""`serve` under a (fake) systemd: READY after listening, watchdog pings, reload, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

WAIT = 20.0


async def next_message(sock: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT)).decode()


async def message_starting(sock: socket.socket, prefix: str) -> str:
    """Skip watchdog pings (they may come at any time) until the expected message."""
    while True:
        message = await next_message(sock)
        if message.startswith(prefix):
            return message
        assert message == "WATCHDOG=1", message


async def test_serve_speaks_sd_notify(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "contoso").write_text("Zq8Q~not-a-real-secret\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            smtp:
              listeners: [{{address: 127.0.0.1, port: 0}}]
            clients: [{{name: c, networks: [127.0.0.1/32], senders: ["*@contoso.com"]}}]
            auth_objects:
              contoso:
                tenant_id: contoso.onmicrosoft.com
                client_id: 66666666-7777-8888-9999-000000000000
                client_secret_file: ${{CREDENTIALS_DIRECTORY}}/contoso
            routes: [{{senders: ["*"], auth_object: contoso}}]
            delivery: {{mode: queue, spool_dir: {tmp_path / "spool"}}}
            admin: {{address: 127.0.0.1, port: 0}}
            """
        )
    )
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify),
        "WATCHDOG_USEC": "200000",
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "serve",
        "-c",
        str(config),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        ready = await next_message(sock)
        assert ready.startswith("READY=1\nSTATUS=accepting mail on 127.0.0.1:")
        assert await next_message(sock) == "WATCHDOG=1"
        assert await next_message(sock) == "WATCHDOG=1"
        proc.send_signal(signal.SIGHUP)
        reloading = await message_starting(sock, "RELOADING=1")
        assert "\nMONOTONIC_USEC=" in reloading
        assert (await message_starting(sock, "READY=1")).startswith(
            "READY=1\nSTATUS=configuration reloaded"
        )
        config.write_text("clients: [")  # broken: the reload is refused, READY=1 still follows
        proc.send_signal(signal.SIGHUP)
        await message_starting(sock, "RELOADING=1")
        assert "reload rejected" in await message_starting(sock, "READY=1")
        proc.send_signal(signal.SIGTERM)
        assert (await message_starting(sock, "STOPPING=1")).startswith("STOPPING=1\nSTATUS=")
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
        out = (await proc.stdout.read()).decode() if proc.stdout else ""
        print(out)
