"""The SMTP session's own replies, named, each with its RFC 3463 enhanced status code.

Why this module exists: the handler (`relay.smtp`), the protocol (`relay.smtp_protocol`) and the
connection limiter (`relay.connections`) answer with some of the same replies (`421 4.7.0` for a
connection limit, `421 4.3.2` at shutdown). Naming them once, here, keeps the three modules from
importing each other for a constant, and gives one place to read every reply the SMTP layer
makes up itself (the shape of aiosmtpd's `testing/statuscodes.py`). Replies decided by policy
or the delivery engine live with their decision, not here.
"""

from __future__ import annotations

from relay.core.errors import SmtpReply

__all__ = [
    "BAD_RECIPIENT",
    "BAD_SENDER",
    "DATA_SYNTAX",
    "DATA_TIMEOUT",
    "INTERNAL_ERROR",
    "NEED_RCPT",
    "NON_ASCII_RECIPIENT",
    "NON_ASCII_SENDER",
    "SHUTTING_DOWN",
    "TOO_MANY_COMMANDS",
    "TOO_MANY_CONNECTIONS",
]

INTERNAL_ERROR = SmtpReply(451, "4.3.0", "Internal error, please try again later")
TOO_MANY_CONNECTIONS = SmtpReply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN = SmtpReply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_COMMANDS = SmtpReply(421, "4.7.0", "Too many commands, closing connection")
DATA_TIMEOUT = SmtpReply(421, "4.4.2", "DATA took too long, closing connection")
NEED_RCPT = SmtpReply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = SmtpReply(501, "5.5.4", "Syntax: DATA")
BAD_SENDER = SmtpReply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = SmtpReply(501, "5.1.3", "Bad recipient address syntax")
# RFC 6531: non-ASCII addresses need the SMTPUTF8 parameter of MAIL FROM; X.6.7 is the code it
# registers for refusing them ("Non-ASCII addresses not permitted").
NON_ASCII_SENDER = SmtpReply(553, "5.6.7", "Non-ASCII sender address needs MAIL FROM ... SMTPUTF8")
NON_ASCII_RECIPIENT = SmtpReply(
    553, "5.6.7", "Non-ASCII recipient address needs MAIL FROM ... SMTPUTF8"
)
