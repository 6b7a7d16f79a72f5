"""`smtp-graph-relay queue ...`: what an operator sees and can do with the spool."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.cli.main import main
from relay.core.values import EntryMeta
from relay.sandbox import Sandbox
from relay.store.files import FileStore
from tests.conftest import MAILBOX
from tests.integration.test_cli import write_config

QUEUE = "{mode: queue, spool_dir: spool}"


def entry(queue_id: str, **changes: object) -> EntryMeta:
    meta = EntryMeta(
        queue_id=queue_id,
        created=time.time() - 7200,
        mail_from=MAILBOX,
        recipients=("bob@partner.example", "eve@partner.example"),
        client="local",
        client_ip="127.0.0.1",
        auth_object="contoso",
        mailbox=MAILBOX,
        route="routes[0]",
        message_id=f"<{queue_id}@relay.test>",
        size=42,
        attempts=3,
        last_error="451 4.4.2 Microsoft 365 is busy (ServiceUnavailable)",
    )
    return _replace(meta, **changes) if changes else meta


def _replace(meta: EntryMeta, **changes: object) -> EntryMeta:
    from dataclasses import replace

    return replace(meta, **changes)  # type: ignore[arg-type]


@pytest.fixture
def config_file(sandbox: Sandbox, tmp_path: Path) -> Path:
    """A config whose spool holds one waiting and one dead message."""

    async def fill() -> None:
        store = FileStore(tmp_path / "spool", reserve_bytes=0)
        await store.recover()
        await store.put(entry("WAITING1"), b"Subject: waiting\r\n\r\nx\r\n")
        await store.put(entry("DEAD1"), b"Subject: dead\r\n\r\nx\r\n", claimed=True)
        await store.bury(
            _replace(entry("DEAD1"), attempts=4), "refused: 550 5.1.1 ErrorInvalidUser"
        )
        await store.close()

    asyncio.run(fill())
    return write_config(sandbox, tmp_path, delivery=QUEUE)


def run(config_file: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["queue", "-c", str(config_file), *argv], out=out)
    return code, out.getvalue()


def test_list_shows_every_message_with_its_state_and_last_error(config_file: Path) -> None:
    """list: counts, then one line per message with state, age, tries and the reason."""
    code, output = run(config_file, "list")
    assert code == 0
    assert output.startswith("1 queued, 0 in delivery, 1 dead, 0 quarantined, 0 corrupt; oldest 2h")
    assert "WAITING1" in output
    assert "DEAD1" in output
    assert "refused: 550 5.1.1 ErrorInvalidUser" in output
    assert "ServiceUnavailable" in output


def test_list_dead_shows_only_dead_letters(config_file: Path) -> None:
    """list --dead narrows the table to dead letters."""
    _, output = run(config_file, "list", "--dead")
    assert "DEAD1" in output
    assert "WAITING1" not in output


def test_show_prints_the_whole_envelope(config_file: Path) -> None:
    """show ID: state, sender, every recipient, route, attempts and why it is dead."""
    code, output = run(config_file, "show", "DEAD1")
    assert code == 0
    assert "state:        dead" in output
    assert "recipients:   bob@partner.example, eve@partner.example" in output
    assert "route:        routes[0] -> contoso, mailbox scanner@contoso.com" in output
    assert "dead reason:  refused: 550 5.1.1 ErrorInvalidUser" in output


def test_retry_moves_a_dead_letter_back_to_the_queue(config_file: Path) -> None:
    """retry ID: the message is queued for immediate delivery."""
    code, output = run(config_file, "retry", "DEAD1")
    assert code == 0
    assert "queued for immediate delivery (was dead)" in output
    _, listing = run(config_file, "list")
    assert listing.startswith("2 queued, 0 in delivery, 0 dead")


def test_delete_removes_a_message(config_file: Path) -> None:
    """delete ID removes it; a second delete says it is not there (exit 1)."""
    assert run(config_file, "delete", "WAITING1")[0] == 0
    code, output = run(config_file, "delete", "WAITING1")
    assert code == 1
    assert "not in the spool" in output


def test_purge_needs_dead_and_removes_only_dead_letters(config_file: Path) -> None:
    """purge without --dead is a usage error; purge --dead keeps waiting messages."""
    assert run(config_file, "purge")[0] == 2
    code, output = run(config_file, "purge", "--dead")
    assert (code, output) == (0, "purged 1 dead message(s)\n")
    _, listing = run(config_file, "list")
    assert listing.startswith("1 queued, 0 in delivery, 0 dead")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "a/b"])
def test_ids_that_are_not_queue_ids_are_refused(config_file: Path, bad: str) -> None:
    """A path instead of an id is a usage error, never a file operation."""
    assert run(config_file, "show", bad)[0] == 2


def test_the_cli_works_beside_a_running_relay_and_never_recovers(config_file: Path) -> None:
    """The relay holds the lock and a message in delivery: list shows it as in delivery, retry
    refuses it, and it stays claimed (a CLI that ran recovery would have requeued it)."""
    spool_dir = config_file.parent / "spool"

    async def relay_holds(then: Callable[[], None]) -> None:
        relay = FileStore(spool_dir, reserve_bytes=0)
        await relay.recover()
        got = await relay.claim("WAITING1")
        assert got is not None
        try:
            await asyncio.to_thread(then)
        finally:
            await relay.close()

    def operate() -> None:
        code, listing = run(config_file, "list")
        assert code == 0
        assert listing.startswith("0 queued, 1 in delivery, 1 dead")
        assert run(config_file, "retry", "WAITING1") == (
            1,
            "WAITING1: cannot retry while it is active\n",
        )

    asyncio.run(relay_holds(operate))
    assert (spool_dir / "active" / "WAITING1.json").exists()
