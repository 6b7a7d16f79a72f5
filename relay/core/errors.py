"""The relay's own exceptions, named for what the caller should do next.

Third-party exceptions (aiohttp, msal, yaml, pydantic) are converted into these once, at the
module boundary where they occur (`raise ... from`), so nothing above the Graph client or the
config loader ever has to know which library failed:

- `ConfigError`: fix the configuration file; the message names the key path and the fix.
- `PolicyError`: refuse this SMTP command with the attached reply.
- `TransientDeliveryError`: try again later (optionally not before `retry_after` seconds).
- `PermanentDeliveryError`: give up on this message and tell the sender.

`SmtpReply` lives here because both the pure core (policy) and the delivery errors carry one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "DeliveryError",
    "PermanentDeliveryError",
    "PolicyError",
    "RelayError",
    "SmtpReply",
    "TransientDeliveryError",
]


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One RFC 5321 reply line with its RFC 3463 enhanced status code."""

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.status and self.status[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status {self.status} does not match reply code {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("SMTP reply text must be a single line")

    def __str__(self) -> str:
        return (
            f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"
        )

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500


class RelayError(Exception):
    """Base class of every error the relay raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake in the configuration: where it is, what is wrong, how to fix it."""

    path: str
    problem: str
    fix: str = ""

    def __str__(self) -> str:
        where = self.path or "(top level)"
        return f"{where}: {self.problem}" + (f" (fix: {self.fix})" if self.fix else "")


class ConfigError(RelayError):
    """The configuration cannot be used. Fix the file; every problem names its key path."""

    def __init__(self, problems: Sequence[ConfigProblem], source: str = "") -> None:
        self.problems = tuple(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"invalid configuration{f' in {self.source}' if self.source else ''}"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


class PolicyError(RelayError):
    """The SMTP client may not do this. The attached reply says why."""

    def __init__(self, reply: SmtpReply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class DeliveryError(RelayError):
    """Graph (or the token endpoint) did not accept the message.

    Attributes carry what an operator needs in the log: the Graph or AADSTS error code, Graph's
    message, the `request-id` response header, the HTTP status and the remedy. `reply` is what a
    still-waiting SMTP client is told; it never contains secrets or Graph internals beyond the code.
    """

    def __init__(
        self,
        message: str,
        *,
        reply: SmtpReply,
        code: str | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
        remedy: str = "",
    ) -> None:
        self.message = message
        self.reply = reply
        self.code = code
        self.http_status = http_status
        self.request_id = request_id
        self.remedy = remedy
        super().__init__(message)

    def describe(self) -> str:
        """One log-friendly line: status, code, message, request-id, remedy."""
        parts = [
            f"http_status={self.http_status}" if self.http_status is not None else "",
            f"code={self.code}" if self.code else "",
            f"request_id={self.request_id}" if self.request_id else "",
            f"error={self.message!r}",
            f"remedy={self.remedy!r}" if self.remedy else "",
        ]
        return " ".join(p for p in parts if p)


class TransientDeliveryError(DeliveryError):
    """Try again later; not before `retry_after` seconds when Graph said so.

    `alert` marks failures that will not heal by themselves (wrong client secret, unknown app or
    tenant): they are retried like any transient error so no mail is lost while an administrator
    fixes the setup, but they are logged at error level with the remedy.
    """

    def __init__(
        self,
        message: str,
        *,
        reply: SmtpReply = SmtpReply(
            451, "4.4.2", "Temporary failure delivering to Microsoft 365, try again later"
        ),
        retry_after: float | None = None,
        alert: bool = False,
        mailbox_limit: str | None = None,
        code: str | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
        remedy: str = "",
    ) -> None:
        super().__init__(
            message,
            reply=reply,
            code=code,
            http_status=http_status,
            request_id=request_id,
            remedy=remedy,
        )
        self.retry_after = retry_after
        self.alert = alert
        self.mailbox_limit = mailbox_limit


class PermanentDeliveryError(DeliveryError):
    """Give up on this message: retrying cannot succeed. `code` is Graph's error code."""
