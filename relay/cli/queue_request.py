"""`QueueRequest`: what the command line asked of `smtp-graph-relay queue`, as one value.

Why this module exists: the parser (relay/cli/main.py), the reading commands (`relay.cli.queue`)
and the changing ones (`relay.cli.queue_ops`) all need it; kept apart, none imports another.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from relay.config.units import parse_duration

__all__ = ["QueueRequest", "add_queue_arguments"]

# Postfix's names where it has one (hold/release: postsuper -h/-H; shape: qshape).
_ACTIONS = (
    "list",
    "show",
    "shape",
    "hold",
    "release",
    "retry",
    "delete",
    "purge",
    "pause",
    "resume",
)


@dataclass(frozen=True, slots=True)
class QueueRequest:
    """What the command line asked of `queue` (parsed by relay/cli/main.py)."""

    action: str
    target: str | None = None  # a queue id, a mailbox (pause/resume) or ALL (delete)
    dead: bool = False
    json: bool = False
    mailbox: str | None = None
    sender: str | None = None
    older_than: float | None = None  # seconds
    all: bool = False
    eml: str | None = None  # "-" = standard output

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> QueueRequest:
        """ValueError (with the fix) for an --older-than that is not a duration."""
        older = parse_duration(args.older_than) if args.older_than is not None else None
        return cls(
            action=args.action,
            target=args.queue_id,
            dead=args.dead,
            json=args.json,
            mailbox=args.mailbox,
            sender=args.sender,
            older_than=older,
            all=args.all,
            eml=args.eml,
        )


def add_queue_arguments(parser: argparse.ArgumentParser) -> None:
    """The `queue` subcommand's arguments (main.py builds the subcommand)."""
    parser.add_argument("action", choices=_ACTIONS)
    parser.add_argument(
        "queue_id",
        nargs="?",
        metavar="ID|MAILBOX|ALL",
        help="a queue id (any case); pause/resume: a mailbox; delete: ALL deletes every message",
    )
    parser.add_argument(
        "--dead", action="store_true", help="list: dead letters; purge: required, purges them"
    )
    parser.add_argument("--json", action="store_true", help="list: a JSON array of the entries")
    parser.add_argument("--mailbox", help="list, retry: only this sending mailbox")
    parser.add_argument("--sender", help="list: only this envelope sender")
    parser.add_argument("--older-than", metavar="AGE", help="list: only mail older than AGE (1h)")
    parser.add_argument("--all", action="store_true", help="hold, release, retry: every message")
    parser.add_argument(
        "--eml",
        nargs="?",
        const="-",
        metavar="FILE",
        help="show: write the stored message to FILE (standard output without FILE)",
    )
