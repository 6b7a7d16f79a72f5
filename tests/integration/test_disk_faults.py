"""The whole relay on a real 20 MB tmpfs spool that fills up or turns read-only mid-delivery
(issue #11 item 2): outcomes the disk refuses are kept, retried and recorded once it recovers.

Real parts only: the relay as `serve` builds it, smtplib, the sandbox's Graph over TLS with its
fault injection, and the kernel's own ENOSPC and EROFS. Needs root to mount; skips with the
reason where mounting is not permitted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from relay.ops.admin import AdminServer
from relay.ops.metrics import RelayMetrics
from relay.sandbox import Sandbox
from relay.service import RelayService
from relay.store.files.store import FileStore
from tests.conftest import asmtp_send, build_config, message, relay_config_text
from tests.mounts import run, tmpfs_mount

RESCAN = 0.5  # seconds; "settles within one rescan" is checked against this
SMALL = "max_message_size: 1MB\n"  # the spool's reserve is 1.5 x this: a 20 MB disk takes mail


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MB tmpfs for the spool, unmounted afterwards."""
    with tmpfs_mount(tmp_path / "spool-disk", "20m") as mountpoint:
        yield mountpoint


def relay_on(sandbox: Sandbox, disk: Path, tmp_path: Path) -> RelayService:
    delivery = (
        f"{{mode: queue, spool_dir: {disk / 'spool'}, concurrency: 16,"
        " retry: {first: 1s, max: 1h, lifetime: 5d}}"
    )
    config = build_config(relay_config_text(sandbox, smtp_extra=SMALL, delivery=delivery), tmp_path)
    return RelayService(config, rescan_seconds=RESCAN)


async def until(condition: Callable[[], Awaitable[bool] | bool], within: float = 20.0) -> None:
    """Poll `condition` (plain or async) until true; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def store_of(relay: RelayService) -> FileStore:
    assert isinstance(relay.store, FileStore)
    return relay.store


async def send(relay: RelayService, count: int) -> list[str]:
    """Submit `count` messages; the queue ids from the 250 replies."""
    port = relay.listeners[0].port
    ids = []
    for n in range(count):
        outcome = await asmtp_send(port, message(subject=f"disk {n}"))
        assert outcome.code == 250, outcome
        ids.append(outcome.text.rsplit(" ", 1)[-1])
    return ids


async def admin_of(relay: RelayService) -> AdminServer:
    """The relay's /healthz and /readyz, as `serve` wires them."""
    admin = AdminServer(
        relay.current_config().admin, metrics=RelayMetrics(), health=relay.health_sources()
    )
    await admin.start()
    return admin


async def get(admin: AdminServer, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin.port}{path}") as response,
    ):
        return response.status, await response.text()


def fill(disk: Path) -> Path:
    """Write a file until the kernel says ENOSPC; delete it to free the disk."""
    filler = disk / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


async def test_a_full_disk_while_graph_answers_503_strands_nothing(
    sandbox: Sandbox, tmpfs: Path, tmp_path: Path
) -> None:
    """8 accepted messages, the disk fills while Graph answers 503: the deferrals cannot be
    written, so they are kept and the relay says it is degraded. Once space is freed, all 8
    are deferred within one rescan (no restart, no crash counted) and then delivered once."""
    relay = relay_on(sandbox, tmpfs, tmp_path)
    await relay.start()
    admin = await admin_of(relay)
    try:
        sandbox.faults.hold_graph()
        ids = await send(relay, 8)
        await until(lambda: relay.delivery.in_flight == 4)  # MailboxConcurrency: 4 at Graph
        filler = fill(tmpfs)
        sandbox.faults.fail_graph(503, "ServiceUnavailable", "busy", times=8)
        sandbox.faults.release_graph()
        health = relay.health_sources()
        await until(lambda: list(health.degraded()) == ["outcomes not recorded: 8"])
        _, text = await get(admin, "/healthz")
        assert "degraded: outcomes not recorded: 8" in text  # beside "free space is below..."
        assert (await get(admin, "/readyz"))[0] == 503
        assert sandbox.graph_requests == 8
        assert (await store_of(relay).stats(0)).active == 8
        filler.unlink()
        freed = asyncio.get_running_loop().time()
        await until(lambda: not list(health.degraded()))
        assert asyncio.get_running_loop().time() - freed <= RESCAN + 0.5
        for qid in ids:
            found = await store_of(relay).find(qid)
            assert found is not None
            assert (found[1].attempts, found[1].crashes) == (1, 0)
        mails = await sandbox.wait_for_mail(8, timeout=20)
        assert sorted(m.subject for m in mails) == sorted(f"disk {n}" for n in range(8))
        await until(lambda: relay.delivery.in_flight == 0)
        assert sandbox.graph_requests == 16
        assert await get(admin, "/readyz") == (200, "ok\n")
    finally:
        await admin.stop()
        await relay.stop()


async def test_a_read_only_disk_mid_delivery_sends_nothing_twice(
    sandbox: Sandbox, tmpfs: Path, tmp_path: Path
) -> None:
    """The spool turns read-only while 4 deliveries are at Graph; Graph accepts all 4, their
    completions wait in memory; after the remount read-write they are recorded, and a restart
    finds nothing to send again."""
    relay = relay_on(sandbox, tmpfs, tmp_path)
    await relay.start()
    admin = await admin_of(relay)
    try:
        sandbox.faults.hold_graph()
        await send(relay, 4)
        await until(lambda: relay.delivery.in_flight == 4)
        remounted = run("mount", "-o", "remount,ro", str(tmpfs))
        if remounted.returncode != 0:
            pytest.skip(f"remounting read-only is not permitted: {remounted.stderr.strip()}")
        sandbox.faults.release_graph()
        await sandbox.wait_for_mail(4)
        health = relay.health_sources()
        await until(lambda: list(health.degraded()) == ["outcomes not recorded: 4"])
        assert "degraded: outcomes not recorded: 4" in (await get(admin, "/healthz"))[1]
        assert (await get(admin, "/readyz"))[0] == 503
        assert (await store_of(relay).stats(0)).active == 4
        assert run("mount", "-o", "remount,rw", str(tmpfs)).returncode == 0
        await until(lambda: not list(health.degraded()), within=RESCAN + 1.0)
        stats = await store_of(relay).stats(0)
        assert (stats.queued, stats.active) == (0, 0)
        assert await get(admin, "/readyz") == (200, "ok\n")
    finally:
        await admin.stop()
        await relay.stop()
    again = relay_on(sandbox, tmpfs, tmp_path)
    await again.start()
    try:
        stats = await store_of(again).stats(0)
        assert (stats.queued, stats.active, stats.quarantined) == (0, 0, 0)
        assert len(sandbox.received) == 4
        assert sandbox.graph_requests == 4
    finally:
        await again.stop()
