"""The `delivery.mailbox_limits` section: Exchange Online's and Graph's per-mailbox sending budgets.

Why this module exists: Exchange Online lets one mailbox send 30 messages per rolling minute and
10,000 recipients per rolling 24 hours, and Graph lets one app make 4 concurrent requests, 10,000
requests per 10 minutes and 150 MB of uploads per 5 minutes against one mailbox
(exchange-online-limits#sending-limits; graph concepts/throttling-limits.md, "Outlook service
limits"). Past them Exchange does not fail loudly: it answers 202 and returns NDRs later, or
blocks the mailbox. So the defaults here are Microsoft's figures, an administrator may lower
them (an outbound spam policy may set lower ones) or set them per mailbox, and the delivery
engine paces every mailbox to them (`relay.core.budgets`). Pure values, checked without I/O.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from relay.config.units import AddressPattern, ByteSize, StrictModel

__all__ = ["LimitOverride", "MailboxLimitsConfig"]


class LimitOverride(StrictModel):
    """Other figures for the mailboxes matching `mailboxes` (globs); unset keys keep the
    section's value."""

    mailboxes: list[AddressPattern] = Field(min_length=1)
    messages_per_minute: int | None = Field(default=None, ge=1)
    recipients_per_day: int | None = Field(default=None, ge=1)
    concurrent_requests: int | None = Field(default=None, ge=1, le=4)
    requests_per_10_minutes: int | None = Field(default=None, ge=1)
    upload_per_5_minutes: ByteSize | None = Field(default=None, ge=1)


class MailboxLimitsConfig(StrictModel):
    """The budgets of every sending mailbox; the first matching override wins
    (`relay.core.budgets.limits_for`)."""

    messages_per_minute: int = Field(default=30, ge=1)
    recipients_per_day: int = Field(default=10_000, ge=1)
    # Graph answers a fifth concurrent request with 429 MailboxConcurrency: never more than 4.
    concurrent_requests: int = Field(default=4, ge=1, le=4)
    requests_per_10_minutes: int = Field(default=10_000, ge=1)
    # Graph's "150 MB" in binary megabytes, as Exchange counts sizes: the same 150 MB as the
    # largest attachment an upload session takes (relay.graph.large.MAX_ATTACHMENT), which a
    # decimal budget could never let through.
    upload_per_5_minutes: ByteSize = Field(default=150 * 1024 * 1024, ge=1)
    overrides: list[LimitOverride] = Field(default_factory=list)

    @field_validator("overrides")
    @classmethod
    def _something_overridden(cls, value: list[LimitOverride]) -> list[LimitOverride]:
        for number, override in enumerate(value):
            if not override.model_fields_set - {"mailboxes"}:
                raise ValueError(
                    f"override {number} sets no limit; add one such as messages_per_minute: 10, "
                    "or remove it"
                )
        return value
