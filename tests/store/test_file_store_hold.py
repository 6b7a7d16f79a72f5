"""The file store's hold/ directory and paused.json as the CLI and a running relay share them:
a spool made before hold/ existed, the relay taking in a CLI hold, release and pause at its next
refresh, and a hold racing a worker's claim."""

from __future__ import annotations

import asyncio
import shutil

from relay.store.files import FileStore
from relay.store.protocol import mailbox_key
from tests.store.contract import MESSAGE, NOW, entry


async def test_a_spool_from_before_hold_gets_the_directory_on_first_hold(
    relay: FileStore, cli: FileStore
) -> None:
    await relay.put(entry("Q1"), MESSAGE)
    shutil.rmtree(relay.root / "hold")
    await cli.refresh()
    assert await cli.hold("Q1") is True
    assert (relay.root / "hold" / "Q1.json").exists()
    assert (relay.root / "hold").stat().st_mode & 0o777 == 0o700


async def test_the_relay_takes_in_a_cli_hold_and_release_at_its_refresh(
    relay: FileStore, cli: FileStore
) -> None:
    await relay.put(entry("Q1"), MESSAGE)
    assert await cli.hold("Q1") is True
    assert await relay.claim("Q1") is None  # before any refresh: the rename already won
    await relay.refresh()
    assert (await relay.stats(NOW)).held == 1
    assert await relay.due(NOW, 10) == []
    assert await cli.unhold("Q1") is True
    await relay.refresh()
    assert [e.queue_id for e in await relay.due(NOW, 10)] == ["Q1"]
    assert (await relay.stats(NOW)).held == 0


async def test_a_hold_racing_a_claim_has_one_winner(relay: FileStore, cli: FileStore) -> None:
    for n in range(20):
        await relay.put(entry(f"R{n}"), MESSAGE)
    ids = [f"R{n}" for n in range(20)]
    claims, holds = await asyncio.gather(
        asyncio.gather(*(relay.claim(qid) for qid in ids)),
        asyncio.gather(*(cli.hold(qid) for qid in ids)),
    )
    for claimed, held in zip(claims, holds, strict=True):
        assert (claimed is not None) != held
    on_disk = {p.stem for d in ("active", "hold") for p in (relay.root / d).iterdir()}
    assert on_disk == set(ids)
    assert not list((relay.root / "queue").iterdir())


async def test_the_relay_reads_a_cli_pause_at_its_refresh(relay: FileStore, cli: FileStore) -> None:
    key = mailbox_key("contoso", "Scanner@contoso.com")
    await cli.pause_mailbox(key)
    assert await relay.paused_mailboxes() == frozenset()
    await relay.refresh()
    assert await relay.paused_mailboxes() == {key}
    await cli.resume_mailbox(key)
    await relay.refresh()
    assert await relay.paused_mailboxes() == frozenset()


async def test_a_damaged_paused_file_pauses_nothing_and_is_rewritten(
    relay: FileStore, cli: FileStore
) -> None:
    (relay.root / "paused.json").write_bytes(b"{not json")
    await relay.refresh()
    assert await relay.paused_mailboxes() == frozenset()
    key = mailbox_key("contoso", "scanner@contoso.com")
    await cli.pause_mailbox(key)
    await relay.refresh()
    assert await relay.paused_mailboxes() == {key}


async def test_two_operators_pausing_at_once_lose_neither(relay: FileStore) -> None:
    others = [FileStore(relay.root, reserve_bytes=0, threads=2) for _ in range(2)]
    for other in others:
        await other.open_for_operator()
    keys = [mailbox_key("contoso", f"m{n}@contoso.com") for n in range(10)]
    await asyncio.gather(*(others[n % 2].pause_mailbox(key) for n, key in enumerate(keys)))
    await relay.refresh()
    assert await relay.paused_mailboxes() == set(keys)
    for other in others:
        await other.close()
