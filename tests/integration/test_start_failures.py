"""`serve` that cannot start says so in one line: the setting, the cause and the fix, exit 1.

A real `python -m relay serve` process each time, with the fault made for real: a taken port,
a spool path that is a file, a read-only file system, a spool another relay holds. No
traceback may reach the administrator (issue #13 item 1, DESIGN §4).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.store.files.store import FileStore
from tests.mounts import run, tmpfs_mount

TENANT = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
CLIENT_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


def config(tmp_path: Path, *, spool: Path, smtp_port: int = 0, admin_port: int = 0) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""\
smtp:
  hostname: relay.test
  listeners: [{{address: 127.0.0.1, port: {smtp_port}}}]
clients:
  - {{name: local, networks: [127.0.0.1/32], senders: ["*@contoso.com"]}}
auth_objects:
  contoso:
    tenant_id: {TENANT}
    client_id: {CLIENT_ID}
    client_secret: "Sb8Q~relay-test-secret-value-4d2f9e"
routes:
  - {{senders: ["*@contoso.com"], auth_object: contoso}}
delivery: {{mode: queue, spool_dir: {spool}}}
admin: {{address: 127.0.0.1, port: {admin_port}}}
"""
    )
    return path


def serve(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exit 1 and exactly one error line, and no traceback."""
    assert result.returncode == 1, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_a_taken_smtp_port_names_the_listener_and_the_fix(tmp_path: Path, taken_port: int) -> None:
    """EADDRINUSE names smtp.listeners[0], its address and what to change."""
    line = one_line(serve(config(tmp_path, spool=tmp_path / "spool", smtp_port=taken_port)))
    assert f"SMTP listener smtp.listeners[0] (127.0.0.1:{taken_port})" in line
    assert "the port is taken" in line
    assert "choose another port in smtp.listeners[0]" in line


def test_a_taken_admin_port_names_the_admin_endpoint(tmp_path: Path, taken_port: int) -> None:
    """The admin endpoint (on by default, port 9025) fails by its own name, not as SMTP."""
    line = one_line(serve(config(tmp_path, spool=tmp_path / "spool", admin_port=taken_port)))
    assert f"admin endpoint admin (127.0.0.1:{taken_port})" in line
    assert "choose another port in admin" in line


def test_a_spool_path_that_is_a_file_names_delivery_spool_dir(tmp_path: Path) -> None:
    """A spool_dir that cannot be a directory is one line naming the key and the fix."""
    in_the_way = tmp_path / "spool"
    in_the_way.write_text("not a directory")
    line = one_line(serve(config(tmp_path, spool=in_the_way)))
    assert f"delivery.spool_dir {in_the_way} cannot be created as a directory" in line
    assert "choose another delivery.spool_dir" in line


def test_a_read_only_spool_says_so_and_how_to_fix_it(tmp_path: Path) -> None:
    """A spool on a read-only file system (a real tmpfs remounted ro) names the volume fix."""
    with tmpfs_mount(tmp_path / "disk", "2m") as disk:
        assert run("mount", "-o", "remount,ro", str(disk)).returncode == 0
        line = one_line(serve(config(tmp_path, spool=disk / "spool")))
    assert "is on a read-only file system" in line
    assert "mount a writable volume there" in line


async def test_a_spool_held_by_another_relay_says_which_and_what_to_do(tmp_path: Path) -> None:
    """The spool lock is taken: one line, no second relay on the same spool."""
    spool = tmp_path / "spool"
    holder = FileStore(spool, reserve_bytes=0)
    await holder.recover()
    try:
        line = one_line(serve(config(tmp_path, spool=spool)))
    finally:
        await holder.close()
    assert "is in use by another relay" in line
    assert "give this one its own delivery.spool_dir" in line
