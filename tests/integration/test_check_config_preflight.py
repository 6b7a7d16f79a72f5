"""check-config tries on this machine what would stop `serve`: ports, the spool and the log file
(no network).

Real sockets and real files: a port another program holds, a file where the spool should be.
The words are serve's own (relay.core.start_problems); check-config still exits 0, counts each
as a warning and leaves nothing behind.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli.main import main

SECRET = "Sb8Q~relay-test-secret-value-4d2f9e"


def check(
    tmp_path: Path,
    *,
    smtp_port: int = 0,
    admin_port: int = 0,
    spool: str = "spool",
    secret_mode: int = 0o600,
    extra: str = "",
) -> str:
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (tmp_path / "secret.txt").chmod(secret_mode)
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"""\
smtp: {{listeners: [{{address: 127.0.0.1, port: {smtp_port}}}]}}
admin: {{address: 127.0.0.1, port: {admin_port}}}
delivery: {{spool_dir: {spool}}}
clients:
  - {{name: printers, networks: [10.0.5.0/24], senders: ["scanner@contoso.com"]}}
auth_objects:
  contoso:
    tenant_id: 11111111-2222-3333-4444-555555555555
    client_id: 66666666-7777-8888-9999-000000000000
    client_secret_file: secret.txt
routes:
  - {{senders: ["*@contoso.com"], auth_object: contoso}}
{extra}"""
    )
    out = io.StringIO()
    assert main(["check-config", "-c", str(path)], out=out) == 0
    return out.getvalue()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_a_machine_that_can_run_the_config_adds_no_warning(tmp_path: Path) -> None:
    """Free ports and a spool that can be created: no section, no warning, nothing left."""
    output = check(tmp_path)
    assert "On this machine" not in output
    assert output.rstrip().endswith("check-config: valid, no warnings")
    assert not (tmp_path / "spool").exists()  # checked through its parent, not created


def test_a_taken_port_is_named_with_its_listener(tmp_path: Path, taken_port: int) -> None:
    """The SMTP port another program holds is reported as serve would report it."""
    output = check(tmp_path, smtp_port=taken_port)
    assert "On this machine, as user" in output
    assert f"SMTP listener smtp.listeners[0] (127.0.0.1:{taken_port}): the port is taken" in output
    assert "(expected if this relay is already running there)" in output
    assert output.rstrip().endswith("check-config: valid, 1 warning")


def test_a_taken_admin_port_is_named_as_the_admin_endpoint(tmp_path: Path, taken_port: int) -> None:
    output = check(tmp_path, admin_port=taken_port)
    assert f"admin endpoint admin (127.0.0.1:{taken_port}): the port is taken" in output


def test_a_file_in_the_spools_place_is_reported(tmp_path: Path) -> None:
    """A spool_dir whose parent is a file cannot be created: named with the fix."""
    (tmp_path / "blocker").write_text("a file, not a directory")
    output = check(tmp_path, spool="blocker/spool")
    assert f"delivery.spool_dir {tmp_path / 'blocker' / 'spool'} cannot be created" in output
    assert "choose another delivery.spool_dir" in output
    assert list(tmp_path.glob("**/.check-config-*")) == []


def test_a_secret_file_every_user_may_read_is_reported(tmp_path: Path) -> None:
    """A 0644 client secret file: named, with the chmod and the systemd/Docker alternatives."""
    output = check(tmp_path, secret_mode=0o644)
    secret = tmp_path / "secret.txt"
    assert f"auth_objects.contoso.client_secret_file {secret} is readable by every user" in output
    assert f"chmod 600 {secret}" in output
    assert SECRET not in output
    assert output.rstrip().endswith("check-config: valid, 1 warning")


def test_a_secret_id_pasted_as_the_secret_is_a_warning(tmp_path: Path) -> None:
    """A GUID in the secret file is the Secret ID, not the Value: say which to copy."""
    secret_id = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    check(tmp_path)  # writes the file set
    (tmp_path / "secret.txt").write_text(secret_id + "\n")
    out = io.StringIO()
    assert main(["check-config", "-c", str(tmp_path / "relay.yaml")], out=out) == 0
    output = out.getvalue()
    assert (
        "auth_objects.contoso: the client secret is a GUID: that is the secret's Secret ID"
        in output
    )
    assert "copy the secret's Value instead" in output
    assert secret_id not in output
    assert output.rstrip().endswith("check-config: valid, 1 warning")


def test_a_log_file_in_a_missing_folder_is_reported(tmp_path: Path) -> None:
    """logging.file where serve could not open it: named with both fixes, nothing left behind."""
    output = check(tmp_path, extra="logging: {file: logs/relay.log}")
    assert (
        f"logging.file {tmp_path / 'logs' / 'relay.log'}: No such file or directory; serve "
        "would not start. Create the folder"
    ) in output
    assert "(systemd: LogsDirectory=)" in output
    assert output.rstrip().endswith("check-config: valid, 1 warning")


def test_a_log_file_serve_can_create_adds_no_warning(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    output = check(tmp_path, extra="logging: {file: logs/relay.log}")
    assert output.rstrip().endswith("check-config: valid, no warnings")
    assert list((tmp_path / "logs").iterdir()) == []
