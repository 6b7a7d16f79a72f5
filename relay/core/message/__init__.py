"""Byte-preserving building blocks of `relay.message`: header fields and RFC 5322 address lists.

Split out of `relay.message` so that each grammar lives in one short module; like `relay.message`
these modules are pure (standard library and `relay.errors` only). Code outside the message core
imports from `relay.message`, which re-exports what is public.
"""

from __future__ import annotations

from relay.core.errors import RelayError, SmtpReply

__all__ = ["UnparseableMessageError"]


class UnparseableMessageError(RelayError, ValueError):
    """The message cannot be delivered faithfully (e.g. a recipient field cannot be tokenized).

    The SMTP layer answers it with `reply`; the text never echoes message content.
    """

    reply = SmtpReply(554, "5.6.0", "Message header cannot be parsed")
