"""Prometheus metrics: named events in, exposition text out (DESIGN §9 `/metrics`).

Why this module exists: observability is events (STYLE habit 12). The modules that see a
message's life (`smtp`, `delivery`, `runner`, `attempts`, `tokens`) report what happened through
`MetricsSink`, a small typed protocol in the manner of stamina's instrumentation hooks, and never
touch a Prometheus object. `NullMetrics` is their default, so each module works (and is tested)
without metrics; `RelayMetrics` turns the events into Prometheus series on its own
`CollectorRegistry` (never the global one: tests and several relays in one process must not share
counters). It also keeps the last delivery errors for the admin status page.

Exposed series (all prefixed `smtp_graph_relay_`; `route` is the route's name, `routes[].name`
or, when it has none, its first sender pattern (`RouteConfig.label`), so label values are bounded
by the configuration, and a route keeps its series when routes are inserted or reordered):

    messages_accepted_total{route,outcome}      the client got 250; outcome delivered|queued
    messages_delivered_total{route,auth_object} Graph answered 202 (DSNs the relay sends count)
    messages_deferred_total{route}              a transient failure; the message is retried
                                                (direct mode: the client got 451 and keeps it)
    messages_failed_total{route,reason}         given up: reason permanent (Graph refused it)
                                                or expired (retry.lifetime ran out)
    messages_bounced_total{route}               DSNs queued to the envelope sender
    delivery_delay_seconds                      histogram: acceptance to Graph's 202
    smtp_refused_total{code}                    refused by policy or limits at SMTP, by reply
                                                code (550 unknown client/sender, 452 too many
                                                recipients, 421 too many connections)
    smtp_connections_open                       gauge: open SMTP connections
    graph_request_duration_seconds              histogram: one sendMail call, token included
                                                when it had to be fetched (50 ms .. 30 s)
    graph_responses_total{status_class,status}  by HTTP status (2xx/4xx/5xx, 202/429/...);
                                                no_response/none: timeout or network error
    graph_throttled_total                       429 answers (also in graph_responses_total)
    graph_errors_total{code}                    Graph error codes (ErrorSendAsDenied, ...);
                                                at most MAX_ERROR_CODES values, then "other"
    token_acquisitions_total{auth_object,outcome}  round trips to Entra; outcome ok|failed
                                                (tokens served from MSAL's cache do not count)
    mailbox_paused_seconds_total{mailbox,reason}   seconds a mailbox was paused after a limit
                                                answer (reason: the limit, e.g. MailboxConcurrency)
    mailbox_budget_used / _limit, queue_drain_eta_seconds, mailbox_waiting: per mailbox at
                                                scrape time (relay.ops.mailbox_gauges)
    queue_depth{state}                          gauge at scrape time: queued|active|held entries
    queue_oldest_age_seconds                    gauge at scrape time: oldest undelivered entry
    dead_letters{state}                         gauge at scrape time: dead|quarantine|corrupt
    spool_readable                              1 if the queue's counts could be read
    build_info{version}                         always 1

The queue gauges come from one reading of the store's incrementally kept counts
(`Store.stats`), taken by the admin server per scrape and passed to `render()`
(`relay.ops.queue_gauges`); nothing here reads the store, so `render()` does no I/O.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from relay import __version__
from relay.ops.mailbox_gauges import MailboxRow, render_mailboxes
from relay.ops.queue_gauges import QueueReading, render_queue

__all__ = [
    "GRAPH_LATENCY_BUCKETS",
    "NULL_METRICS",
    "PREFIX",
    "AcceptedOutcome",
    "ErrorReport",
    "FailReason",
    "MetricsSink",
    "NullMetrics",
    "RelayMetrics",
]

PREFIX: Final = "smtp_graph_relay_"
# Graph's sendMail usually answers in 0.2-2 s; 30 s is already a timeout in all but name.
GRAPH_LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
# Inline delivery takes a second; queued mail minutes to hours; retry.lifetime is 5 days.
DELAY_BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
                        86400.0, 432000.0)  # fmt: skip
# Graph error codes come from the server: a bound keeps a misbehaving proxy from creating series.
MAX_ERROR_CODES: Final = 50
RECENT_ERRORS: Final = 20
_CODE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")

AcceptedOutcome = Literal["delivered", "queued"]
FailReason = Literal["permanent", "expired"]


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """One delivery failure as the status page shows it. Never holds a secret: the texts come
    from `DeliveryError`, whose messages are redacted where they are built."""

    at: float  # wall-clock seconds
    event: str  # deferred | failed | expired
    queue_id: str
    route: str
    auth_object: str
    mailbox: str
    http_status: int | None
    code: str | None  # Graph or AADSTS error code
    request_id: str | None
    reply: str  # the SMTP reply the failure maps to
    remedy: str
    message: str


class MetricsSink(Protocol):
    """The events the relay reports. Implementations must be cheap and must never raise."""

    def accepted(self, route: str, outcome: AcceptedOutcome) -> None:
        """The SMTP client was answered 250 for a message of `route`."""

    def delivered(self, route: str, auth_object: str, seconds: float) -> None:
        """Graph took the message (202), `seconds` after the relay accepted it."""

    def deferred(self, route: str) -> None:
        """An attempt failed transiently; the message will be tried again."""

    def failed(self, route: str, reason: FailReason) -> None:
        """The relay gave up on the message (permanent refusal or lifetime expired)."""

    def bounced(self, route: str) -> None:
        """A DSN for a failed message was queued to its envelope sender."""

    def refused(self, code: int) -> None:
        """Policy or a limit refused an SMTP command or connection with reply `code`."""

    def connections(self, count: int) -> None:
        """The number of open SMTP connections changed to `count`."""

    def graph_response(self, status: int | None, code: str | None, seconds: float) -> None:
        """A sendMail call ended: HTTP `status` (None: no answer), Graph error `code`."""

    def token_request(self, auth_object: str, ok: bool) -> None:
        """A round trip to the identity provider for `auth_object` ended."""

    def delivery_error(self, report: ErrorReport) -> None:
        """Details of a failed attempt, for the status page."""

    def mailbox_paused(self, mailbox: str, reason: str, seconds: float) -> None:
        """A limit answer paused `mailbox` for `seconds` more."""


class NullMetrics:
    """A `MetricsSink` that records nothing: the default of every instrumented constructor."""

    def accepted(self, route: str, outcome: AcceptedOutcome) -> None:
        pass

    def delivered(self, route: str, auth_object: str, seconds: float) -> None:
        pass

    def deferred(self, route: str) -> None:
        pass

    def failed(self, route: str, reason: FailReason) -> None:
        pass

    def bounced(self, route: str) -> None:
        pass

    def refused(self, code: int) -> None:
        pass

    def connections(self, count: int) -> None:
        pass

    def graph_response(self, status: int | None, code: str | None, seconds: float) -> None:
        pass

    def token_request(self, auth_object: str, ok: bool) -> None:
        pass

    def delivery_error(self, report: ErrorReport) -> None:
        pass

    def mailbox_paused(self, mailbox: str, reason: str, seconds: float) -> None:
        pass


NULL_METRICS: Final[MetricsSink] = NullMetrics()  # stateless, so one instance serves everyone


class RelayMetrics:
    """Prometheus implementation of `MetricsSink` (series listed in the module docstring).

    Events arrive on the event loop; `render()` may run in another thread (prometheus-client's
    metrics are thread-safe).
    """

    CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        recent_errors: int = RECENT_ERRORS,
    ) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        self._recent: deque[ErrorReport] = deque(maxlen=recent_errors)
        self._error_codes: set[str] = set()
        r = self.registry
        self._accepted = Counter(
            f"{PREFIX}messages_accepted",
            "Messages answered 250 at SMTP, by route and by whether Graph already took them.",
            ["route", "outcome"],
            registry=r,
        )
        self._delivered = Counter(
            f"{PREFIX}messages_delivered",
            "Messages Graph accepted (202), by route and auth object.",
            ["route", "auth_object"],
            registry=r,
        )
        self._deferred = Counter(
            f"{PREFIX}messages_deferred",
            "Attempts that failed transiently; the message is retried.",
            ["route"],
            registry=r,
        )
        self._failed = Counter(
            f"{PREFIX}messages_failed",
            "Messages given up: refused permanently by Graph or expired.",
            ["route", "reason"],
            registry=r,
        )
        self._bounced = Counter(
            f"{PREFIX}messages_bounced",
            "Delivery status notifications queued to envelope senders.",
            ["route"],
            registry=r,
        )
        self._delay = Histogram(
            f"{PREFIX}delivery_delay_seconds",
            "Time from acceptance of a message to Graph's 202.",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self._refused = Counter(
            f"{PREFIX}smtp_refused",
            "SMTP commands or connections refused by policy or limits, by reply code.",
            ["code"],
            registry=r,
        )
        self._connections = Gauge(
            f"{PREFIX}smtp_connections_open", "Open SMTP connections.", registry=r
        )
        self._graph_latency = Histogram(
            f"{PREFIX}graph_request_duration_seconds",
            "Duration of one Graph sendMail call, including a token fetch when one was needed.",
            buckets=GRAPH_LATENCY_BUCKETS,
            registry=r,
        )
        self._graph_responses = Counter(
            f"{PREFIX}graph_responses",
            "Graph sendMail answers by HTTP status; no_response for timeouts and network errors.",
            ["status_class", "status"],
            registry=r,
        )
        self._throttled = Counter(
            f"{PREFIX}graph_throttled", "Graph answers 429 Too Many Requests.", registry=r
        )
        self._graph_errors = Counter(
            f"{PREFIX}graph_errors",
            "Graph error codes in sendMail answers.",
            ["code"],
            registry=r,
        )
        self._paused = Counter(
            f"{PREFIX}mailbox_paused_seconds",
            "Seconds sending mailboxes were paused after a limit answer, by limit.",
            ["mailbox", "reason"],
            registry=r,
        )
        self._tokens = Counter(
            f"{PREFIX}token_acquisitions",
            "Token requests to the identity provider (cache hits excluded), by outcome.",
            ["auth_object", "outcome"],
            registry=r,
        )
        Gauge(f"{PREFIX}build_info", "The relay's version.", ["version"], registry=r).labels(
            __version__
        ).set(1)

    # --- the exposition ------------------------------------------------------------------------

    def render(
        self,
        queue: QueueReading | None = None,
        *,
        now: float | None = None,
        mailboxes: Sequence[MailboxRow] = (),
    ) -> bytes:
        """The Prometheus text exposition: the event series, the mailbox gauges from
        `mailboxes`, and the queue gauges from `queue` (one reading of `Store.stats`; None in
        direct mode: no queue series). No I/O."""
        text = generate_latest(self.registry) + render_mailboxes(mailboxes)
        if queue is None:
            return text
        return text + render_queue(queue, self._clock() if now is None else now)

    def recent_errors(self) -> list[ErrorReport]:
        """The last delivery errors, newest first."""
        return list(reversed(self._recent))

    # --- MetricsSink ---------------------------------------------------------------------------

    def accepted(self, route: str, outcome: AcceptedOutcome) -> None:
        self._accepted.labels(route, outcome).inc()

    def delivered(self, route: str, auth_object: str, seconds: float) -> None:
        self._delivered.labels(route, auth_object).inc()
        self._delay.observe(max(0.0, seconds))

    def deferred(self, route: str) -> None:
        self._deferred.labels(route).inc()

    def failed(self, route: str, reason: FailReason) -> None:
        self._failed.labels(route, reason).inc()

    def bounced(self, route: str) -> None:
        self._bounced.labels(route).inc()

    def refused(self, code: int) -> None:
        self._refused.labels(str(code)).inc()

    def connections(self, count: int) -> None:
        self._connections.set(count)

    def graph_response(self, status: int | None, code: str | None, seconds: float) -> None:
        self._graph_latency.observe(max(0.0, seconds))
        if status is None:
            self._graph_responses.labels("no_response", "none").inc()
        else:
            self._graph_responses.labels(f"{status // 100}xx", str(status)).inc()
        if status == 429:
            self._throttled.inc()
        if code:
            self._graph_errors.labels(self._error_code(code)).inc()

    def token_request(self, auth_object: str, ok: bool) -> None:
        self._tokens.labels(auth_object, "ok" if ok else "failed").inc()

    def delivery_error(self, report: ErrorReport) -> None:
        self._recent.append(report)

    def _error_code(self, code: str) -> str:
        clean = _CODE_CHARS.sub("", code)[:64] or "other"
        if clean in self._error_codes:
            return clean
        if len(self._error_codes) >= MAX_ERROR_CODES:
            return "other"
        self._error_codes.add(clean)
        return clean

    def mailbox_paused(self, mailbox: str, reason: str, seconds: float) -> None:
        self._paused.labels(mailbox, self._error_code(reason)).inc(max(0.0, seconds))
