"""The message core: what the relay reads in a message and what it changes for Graph (DESIGN §7).

One module per step, all pure (standard library and `relay.core.errors` only): `headers` cuts the
header block from the body once per DATA, `addresses` reads address lists (leniently, and strictly
where a second reading matters), `authors` the From/Sender/Resent-From the policy checks,
`recipients` the one To/Cc/Bcc reconciliation, `prepare` the MIME form for Graph, `multipart` the
one MIME walker, `parts` and `graph_json` the JSON form, `split` the large-message skeleton,
`limits` and `structure` the DATA checks, `dsn`, `dsn_gates` and `loops` the bounces. Code outside
the core imports from `prepare`, which re-exports what is public.
"""

from __future__ import annotations

from relay.core.errors import RelayError, SmtpReply

__all__ = ["UnparseableMessageError"]


class UnparseableMessageError(RelayError, ValueError):
    """The message cannot be delivered faithfully (e.g. a recipient field cannot be tokenized).

    The SMTP layer answers it with `reply`; the text never echoes message content.
    """

    reply = SmtpReply(554, "5.6.0", "Message header cannot be parsed")
