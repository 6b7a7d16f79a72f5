"""Every limit the relay keeps to, each one named once (Graph's, Exchange Online's and our own).

Why this module exists: the same number written in three modules drifts apart, and a reader cannot
tell a Microsoft rule from a choice of ours. Microsoft's figures cite the document that states
them (microsoftgraph/microsoft-graph-docs-contrib); the sandbox (`relay.sandbox`) keeps its own
copy of each, on purpose: it models Microsoft, so a wrong figure here must not silently become
right there too.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CRASH_LIMIT",
    "GRAPH_MAX_REQUEST_BYTES",
    "HEADER_HEADROOM",
    "MAILBOX_CONCURRENCY",
    "MAX_LARGE_MESSAGE",
    "base64_size",
    "single_request_limit",
]

# user-sendmail.md: a request body over 4 MB is refused; the MIME form is base64 (+4/3).
GRAPH_MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024

# concepts/throttling-limits.md (Outlook service limits): 4 concurrent requests per app and
# mailbox ("MailboxConcurrency"); a fifth only earns a 429.
MAILBOX_CONCURRENCY: Final = 4

# attachment-createuploadsession.md: upload sessions take files of up to 150 MB. In MIME such a
# file is base64 in 76-column lines (x 4/3 x 78/76 = 205.3 MiB), plus room for the text and
# small attachments: the largest message taken with `large_messages: upload`.
MAX_LARGE_MESSAGE: Final = 210 * 1024 * 1024

# Room for what the relay adds to a message: Received, Date, Message-ID and a Bcc field.
HEADER_HEADROOM: Final = 64 * 1024

# Ours: an entry whose handling crashed the relay this often is quarantined for an operator
# (as GNU Mailman's switchboard does), instead of crashing it for ever.
CRASH_LIMIT: Final = 3


def base64_size(size: int) -> int:
    """Length of the unbroken base64 form of `size` bytes."""
    return 4 * ((size + 2) // 3)


def single_request_limit() -> int:
    """Largest message (as received) whose prepared MIME still fits one sendMail request."""
    return (GRAPH_MAX_REQUEST_BYTES // 4) * 3 - HEADER_HEADROOM
