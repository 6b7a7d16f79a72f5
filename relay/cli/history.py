"""`smtp-graph-relay history`: what became of each message, searched from the command line.

Why this module exists: "was my scan sent, and if not why" must be answerable without reading
logs (issue 13 item 7). The relay keeps each final outcome in its store's history
(`relay.core.history`); this command reads it, also while the relay runs (the relay only
appends and renames whole segments, so a reader sees each segment whole), newest first: one
line per message, or `--json` (a JSON array of the records) for scripts. Records older than
`history.retention` are not shown even when the relay has not pruned them yet.

Exit codes: 0 (also when nothing matches), 1 when the history cannot be read, 2 on usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TextIO

from relay.config.schema import Config, parse_duration
from relay.core.history import HistoryQuery, HistoryRecord
from relay.store.protocol import StoreUnavailableError

__all__ = ["add_history_arguments", "format_record", "run_history_command"]

EXIT_OK, EXIT_FAILURE = 0, 1
DEFAULT_LIMIT = 100


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `history` (the subcommand itself is made by `relay.cli.main`)."""
    parser.add_argument(
        "--since", type=_duration, help="only outcomes settled in this last span (1h, 2d)"
    )
    parser.add_argument("--sender", help="envelope sender; a glob without case: *@contoso.com")
    parser.add_argument("--message-id", dest="message_id", help="Message-ID, with or without <>")
    parser.add_argument("--failed", action="store_true", help="only what was not delivered")
    parser.add_argument("--json", action="store_true", help="a JSON array of the records")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"at most this many (default {DEFAULT_LIMIT})",
    )


def run_history_command(
    config: Config, args: argparse.Namespace, out: TextIO, clock: Callable[[], float] = time.time
) -> int:
    now = clock()
    oldest = now - config.history.retention
    query = HistoryQuery(
        since=oldest if args.since is None else max(oldest, now - args.since),
        sender=args.sender or "",
        message_id=args.message_id or "",
        failed=args.failed,
        limit=max(1, args.limit),
    )
    try:
        records = asyncio.run(_read(config, query))
    except StoreUnavailableError as exc:
        out.write(f"cannot read the history in {config.delivery.spool_dir}: {exc}\n")
        return EXIT_FAILURE
    if args.json:
        out.write(json.dumps([r.to_dict() for r in records], indent=2) + "\n")
    elif not records:
        out.write("no outcome recorded matches\n")
    else:
        out.writelines(format_record(r) + "\n" for r in records)
    return EXIT_OK


async def _read(config: Config, query: HistoryQuery) -> Sequence[HistoryRecord]:
    from relay.store.files import FileStore  # the file store's modules, only when asked

    return await FileStore.history_only(config.delivery.spool_dir).history(query)


def format_record(record: HistoryRecord) -> str:
    """One record as a line (and its error and remedy indented below it)."""
    when = datetime.fromtimestamp(record.settled, UTC).strftime("%Y-%m-%d %H:%M:%S")
    graph = "-" if record.http_status is None else str(record.http_status)
    line = (
        f"{when} {record.outcome:<9} {record.queue_id} from=<{record.sender}> "
        f"rcpts={record.recipients} route={record.route} mailbox={record.mailbox} "
        f"path={record.path or '-'} graph={graph} request_id={record.request_id or '-'} "
        f"attempts={record.attempts} message_id={record.message_id or '-'}"
    )
    if record.subject is not None:
        line += f"\n    subject: {record.subject}"
    if record.error:
        line += f"\n    error: {record.error}"
    if record.remedy:
        line += f"\n    remedy: {record.remedy}"
    return line


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
