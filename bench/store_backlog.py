"""What the store's read paths cost at a large backlog: the figures behind hardening #7.

Why this module exists: /metrics used to call `Spool.stats`, which reads every metadata file
(2.1 s CPU per scrape at a 20k backlog). `FileStore.stats`, `due` and `next_due` answer from the
in-memory index instead, and `refresh` rescans with one readdir per directory, reading only
metadata it has not seen. This fills a spool (fsync off: the fill is not what is measured) and
prints the CPU time of each call:

    python -m bench.store_backlog --entries 20000

Figures printed per call: CPU milliseconds (process time, median of --repeat runs), directory
listings and metadata files read.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.core.values import EntryMeta
from relay.store.files import FileStore

NOW = 1_700_000_000.0
MESSAGE = b"Subject: backlog\r\n\r\n" + b"x" * 2000 + b"\r\n"


def _entry(n: int) -> EntryMeta:
    return EntryMeta(
        queue_id=f"B{n:08}",
        created=NOW + n,
        mail_from="scanner@contoso.com",
        recipients=("alice@contoso.com",),
        client="printers",
        client_ip="10.0.5.7",
        auth_object="contoso",
        mailbox=f"box{n % 50}@contoso.com",
        route="routes[0]",
        message_id=f"<B{n}@bench>",
        size=0,
        next_attempt=NOW + n % 600,
    )


async def _measure(
    store: FileStore, name: str, call: Callable[[], Awaitable[object]], repeat: int
) -> str:
    times: list[float] = []
    scans, reads = store.layout.scans, store.layout.reads
    for _ in range(repeat):
        started = time.process_time()
        await call()
        times.append((time.process_time() - started) * 1000)
    per_scans = (store.layout.scans - scans) / repeat
    per_reads = (store.layout.reads - reads) / repeat
    return f"| {name} | {statistics.median(times):.3f} | {per_scans:g} | {per_reads:g} |"


async def run(entries: int, repeat: int, root: Path) -> list[str]:
    store = FileStore(root, reserve_bytes=0, fsync=False)
    await store.recover()
    for n in range(entries):
        await store.put(_entry(n), MESSAGE)
    await store.refresh()  # first rescan after the puts: reads each entry once
    spool = store.spool
    busy = {("contoso", f"box{n}@contoso.com") for n in range(0, 50, 2)}
    rows = [
        f"{entries} queued entries, {repeat} calls each",
        "",
        "| call | CPU ms (median) | listings / call | metadata reads / call |",
        "|---|---:|---:|---:|",
        await _measure(store, "FileStore.stats", lambda: store.stats(NOW + 300), repeat),
        await _measure(
            store, "FileStore.due(100, 25 busy)", lambda: store.due(NOW, 100, busy), repeat
        ),
        await _measure(store, "FileStore.next_due", store.next_due, repeat),
        await _measure(
            store, "FileStore.refresh (nothing new)", store.refresh, max(1, repeat // 10)
        ),
        await _measure(
            store, "Spool.stats (the old scan)", lambda: asyncio.to_thread(spool.stats, NOW), 1
        ),
    ]
    await store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the spool")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = asyncio.run(run(args.entries, args.repeat, Path(folder) / "spool"))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
