"""Each sending mailbox's budget as /metrics, the status page and `queue list` show it.

Why this module exists: an administrator must see a mailbox running into Exchange Online's
limits before its mail is late: how much of each budget the rolling windows hold, how many
messages wait for it, and when its queue is expected to drain (issue #12). Like the queue gauges
(`relay.ops.queue_gauges`) this is state read once per request, not an event, so it has its own
module: `MailboxRow` values in (built by `relay.delivery.mailboxes`), gauge families out.

    mailbox_budget_used{mailbox,limit}    what the limit's rolling window holds (in flight too)
    mailbox_budget_limit{mailbox,limit}   the limit in force for the mailbox
    queue_drain_eta_seconds{mailbox}      when its waiting messages could all have been sent
    mailbox_waiting{mailbox}              queued messages waiting for it
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from relay.ops.queue_gauges import Precomputed

__all__ = ["MailboxRow", "mailbox_families", "render_mailboxes"]

_PREFIX = "smtp_graph_relay_"


@dataclass(frozen=True, slots=True)
class MailboxRow:
    """One mailbox (or pool) at one moment."""

    auth_object: str
    mailbox: str
    used: Mapping[str, int]  # limit name -> what its window holds
    limits: Mapping[str, int]  # limit name -> the limit
    in_flight: int
    waiting: int
    drain_eta: float  # seconds; 0 when nothing waits
    paused_for: float  # seconds left of a pause after a limit answer; 0 when not paused


def mailbox_families(rows: Sequence[MailboxRow]) -> Sequence[Metric]:
    used = GaugeMetricFamily(
        f"{_PREFIX}mailbox_budget_used",
        "What the rolling window of each sending limit holds for the mailbox.",
        labels=["mailbox", "limit"],
    )
    limit = GaugeMetricFamily(
        f"{_PREFIX}mailbox_budget_limit",
        "The sending limit in force for the mailbox (delivery.mailbox_limits).",
        labels=["mailbox", "limit"],
    )
    eta = GaugeMetricFamily(
        f"{_PREFIX}queue_drain_eta_seconds",
        "Seconds until the mailbox's waiting messages could all be sent within its budgets.",
        labels=["mailbox"],
    )
    waiting = GaugeMetricFamily(
        f"{_PREFIX}mailbox_waiting",
        "Queued messages waiting to be sent as the mailbox.",
        labels=["mailbox"],
    )
    for row in rows:
        for name, value in row.used.items():
            used.add_metric([row.mailbox, name], value)
        for name, value in row.limits.items():
            limit.add_metric([row.mailbox, name], value)
        eta.add_metric([row.mailbox], row.drain_eta)
        waiting.add_metric([row.mailbox], row.waiting)
    return (used, limit, eta, waiting)


def render_mailboxes(rows: Sequence[MailboxRow]) -> bytes:
    """The mailbox gauge families in the Prometheus text format (nothing when no rows)."""
    if not rows:
        return b""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Precomputed(mailbox_families(rows)))
    return generate_latest(registry)
