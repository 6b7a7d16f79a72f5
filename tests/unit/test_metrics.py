"""RelayMetrics: each event becomes the documented Prometheus series (parsed back from the text
exposition), the queue gauges render one reading of the store's counts, and GraphAttempts
reports Graph's answers but not token failures."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config.load import parse_config
from relay.config.schema import Config
from relay.core.errors import (
    DeliveryError,
    PermanentDeliveryError,
    SmtpReply,
    TransientDeliveryError,
)
from relay.core.values import EntryMeta, Route
from relay.delivery.attempt import GraphAttempts
from relay.ops.mailbox_gauges import MailboxRow
from relay.ops.metrics import (
    MAX_ERROR_CODES,
    NULL_METRICS,
    ErrorReport,
    MetricsSink,
    NullMetrics,
    RelayMetrics,
)
from relay.ops.queue_gauges import QueueReading
from relay.store.protocol import StoreStats
from relay.testing.fake_graph import FakeGraph

P = "smtp_graph_relay_"


EMPTY = QueueReading(StoreStats(0, 0, 0, 0, 0, None))


def sample(metrics: RelayMetrics | bytes, name: str, **labels: str) -> float | None:
    """The value of one sample in the exposition (or in `render()`'s bytes), None when absent."""
    text = metrics if isinstance(metrics, bytes) else metrics.render()
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def families(metrics: RelayMetrics, queue: QueueReading | None = None) -> dict[str, str]:
    """Family name -> type, as a scraper sees them (prometheus-client's `_created` aside)."""
    text = metrics.render(queue).decode()
    found = text_string_to_metric_families(text)
    return {f.name: f.type for f in found if not f.name.endswith("_created")}


def report(**changes: object) -> ErrorReport:
    fields: dict[str, object] = {
        "at": 1_700_000_000.0,
        "event": "failed",
        "queue_id": "Q1",
        "route": "routes[0]",
        "auth_object": "contoso",
        "mailbox": "scanner@contoso.com",
        "http_status": 404,
        "code": "MailboxNotEnabledForRESTAPI",
        "request_id": "rid-1",
        "reply": "550 5.1.1 Mailbox cannot send through Graph",
        "remedy": "assign an Exchange Online licence to the mailbox",
        "message": "Graph answered HTTP 404",
    }
    fields.update(changes)
    return ErrorReport(**fields)  # type: ignore[arg-type]


def test_every_documented_family_is_exposed_with_its_type() -> None:
    """A fresh registry already names every series, with counters as counters."""
    metrics = RelayMetrics()
    assert families(metrics, EMPTY) == {
        f"{P}messages_accepted": "counter",
        f"{P}messages_delivered": "counter",
        f"{P}messages_deferred": "counter",
        f"{P}messages_failed": "counter",
        f"{P}messages_bounced": "counter",
        f"{P}delivery_delay_seconds": "histogram",
        f"{P}smtp_refused": "counter",
        f"{P}smtp_connections_open": "gauge",
        f"{P}graph_request_duration_seconds": "histogram",
        f"{P}graph_responses": "counter",
        f"{P}graph_throttled": "counter",
        f"{P}graph_errors": "counter",
        f"{P}token_acquisitions": "counter",
        f"{P}build_info": "gauge",
        f"{P}spool_readable": "gauge",
        f"{P}queue_depth": "gauge",
        f"{P}queue_oldest_age_seconds": "gauge",
        f"{P}dead_letters": "gauge",
        f"{P}mailbox_paused_seconds": "counter",
    }


def test_accepted_counts_by_route_and_outcome() -> None:
    """accepted(route, outcome) -> messages_accepted_total{route,outcome}."""
    metrics = RelayMetrics()
    metrics.accepted("routes[0]", "delivered")
    metrics.accepted("routes[0]", "delivered")
    metrics.accepted("routes[1]", "queued")
    name = f"{P}messages_accepted_total"
    assert sample(metrics, name, route="routes[0]", outcome="delivered") == 2
    assert sample(metrics, name, route="routes[1]", outcome="queued") == 1
    assert sample(metrics, name, route="routes[0]", outcome="queued") is None


def test_delivered_counts_by_route_and_auth_object_and_observes_the_delay() -> None:
    """delivered(...) -> messages_delivered_total and one delivery_delay_seconds observation."""
    metrics = RelayMetrics()
    metrics.delivered("routes[0]", "contoso", 0.7)
    assert sample(metrics, f"{P}messages_delivered_total", route="routes[0]", auth_object="contoso")
    assert sample(metrics, f"{P}delivery_delay_seconds_count") == 1
    assert sample(metrics, f"{P}delivery_delay_seconds_bucket", le="0.5") == 0
    assert sample(metrics, f"{P}delivery_delay_seconds_bucket", le="1.0") == 1


@pytest.mark.parametrize(
    ("emit", "name", "labels"),
    [
        (lambda m: m.deferred("routes[2]"), "messages_deferred_total", {"route": "routes[2]"}),
        (
            lambda m: m.failed("routes[0]", "permanent"),
            "messages_failed_total",
            {"route": "routes[0]", "reason": "permanent"},
        ),
        (
            lambda m: m.failed("routes[0]", "expired"),
            "messages_failed_total",
            {"route": "routes[0]", "reason": "expired"},
        ),
        (lambda m: m.bounced("routes[1]"), "messages_bounced_total", {"route": "routes[1]"}),
        (lambda m: m.refused(550), "smtp_refused_total", {"code": "550"}),
        (
            lambda m: m.token_request("contoso", ok=True),
            "token_acquisitions_total",
            {"auth_object": "contoso", "outcome": "ok"},
        ),
        (
            lambda m: m.token_request("fabrikam", ok=False),
            "token_acquisitions_total",
            {"auth_object": "fabrikam", "outcome": "failed"},
        ),
    ],
)
def test_each_counting_event_increments_its_labelled_counter(
    emit: Callable[[RelayMetrics], None], name: str, labels: dict[str, str]
) -> None:
    """One event, one increment of the documented series with the documented labels."""
    metrics = RelayMetrics()
    emit(metrics)
    assert sample(metrics, P + name, **labels) == 1


def test_open_connections_is_a_gauge_that_follows_the_count() -> None:
    """connections(n) sets smtp_connections_open to n."""
    metrics = RelayMetrics()
    metrics.connections(3)
    metrics.connections(1)
    assert sample(metrics, f"{P}smtp_connections_open") == 1


def test_graph_202_counts_a_2xx_response_and_observes_the_latency() -> None:
    """graph_response(202) -> graph_responses_total{2xx,202}; latency lands in its bucket."""
    metrics = RelayMetrics()
    metrics.graph_response(202, None, 0.3)
    assert sample(metrics, f"{P}graph_responses_total", status_class="2xx", status="202") == 1
    assert sample(metrics, f"{P}graph_request_duration_seconds_count") == 1
    assert sample(metrics, f"{P}graph_request_duration_seconds_bucket", le="0.25") == 0
    assert sample(metrics, f"{P}graph_request_duration_seconds_bucket", le="0.5") == 1
    assert sample(metrics, f"{P}graph_throttled_total") == 0


def test_latency_buckets_span_50_ms_to_30_s() -> None:
    """The Graph latency histogram's finite buckets run from 0.05 s to 30 s."""
    metrics = RelayMetrics()
    text = metrics.render().decode()
    bounds = [
        s.labels["le"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == f"{P}graph_request_duration_seconds_bucket"
    ]
    assert bounds[0] == "0.05"
    assert bounds[-2:] == ["30.0", "+Inf"]


def test_a_429_is_counted_as_throttled_and_by_its_graph_error_code() -> None:
    """429 -> graph_throttled_total, graph_responses_total{4xx,429}, graph_errors_total{code}."""
    metrics = RelayMetrics()
    metrics.graph_response(429, "ApplicationThrottled", 0.1)
    assert sample(metrics, f"{P}graph_throttled_total") == 1
    assert sample(metrics, f"{P}graph_responses_total", status_class="4xx", status="429") == 1
    assert sample(metrics, f"{P}graph_errors_total", code="ApplicationThrottled") == 1


def test_no_http_answer_is_counted_as_no_response() -> None:
    """A timeout or dropped connection has no status: status_class no_response, status none."""
    metrics = RelayMetrics()
    metrics.graph_response(None, None, 30.0)
    name = f"{P}graph_responses_total"
    assert sample(metrics, name, status_class="no_response", status="none") == 1


def test_graph_error_codes_are_sanitised_and_bounded() -> None:
    """Server-supplied codes cannot inject label syntax or grow the series without limit."""
    metrics = RelayMetrics()
    metrics.graph_response(400, 'Bad"Code\n{x}', 0.1)
    for n in range(MAX_ERROR_CODES + 5):
        metrics.graph_response(400, f"Code{n}", 0.1)
    codes = [
        s.labels["code"]
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
        if s.name == f"{P}graph_errors_total"
    ]
    assert "BadCodex" in codes
    assert len(codes) == MAX_ERROR_CODES + 1  # the first MAX_ERROR_CODES, then "other"
    assert sample(metrics, f"{P}graph_errors_total", code="other") == 6


def test_queue_gauges_render_the_reading_they_are_given() -> None:
    """queue_depth, queue_oldest_age_seconds and dead_letters come from one StoreStats."""
    reading = QueueReading(
        StoreStats(
            queued=4, active=1, dead=2, quarantined=1, corrupt=3, oldest_created=910.0, held=5
        )
    )
    text = RelayMetrics(clock=lambda: 1000.0).render(reading)
    assert sample(text, f"{P}queue_depth", state="queued") == 4
    assert sample(text, f"{P}queue_depth", state="active") == 1
    assert sample(text, f"{P}queue_depth", state="held") == 5
    assert sample(text, f"{P}queue_oldest_age_seconds") == 90.0  # injected clock
    assert sample(text, f"{P}dead_letters", state="dead") == 2
    assert sample(text, f"{P}dead_letters", state="quarantine") == 1
    assert sample(text, f"{P}dead_letters", state="corrupt") == 3
    assert sample(text, f"{P}spool_readable") == 1


def test_the_age_is_measured_at_the_time_of_the_scrape() -> None:
    """`now` given to render() wins over the clock: the admin server reads both at once."""
    reading = QueueReading(StoreStats(1, 0, 0, 0, 0, oldest_created=100.0))
    text = RelayMetrics(clock=lambda: 1e9).render(reading, now=130.0).decode()
    assert f"{P}queue_oldest_age_seconds 30.0" in text


def test_an_empty_queue_has_age_zero() -> None:
    """No undelivered entry: oldest age 0, not absent."""
    assert sample(RelayMetrics().render(EMPTY), f"{P}queue_oldest_age_seconds") == 0


def test_an_unreadable_queue_fails_the_gauge_not_the_scrape() -> None:
    """A reading without counts -> spool_readable 0 and the other series still render."""
    metrics = RelayMetrics()
    broken = QueueReading(None, "cannot read the queue: EIO")
    metrics.accepted("contoso-senders", "queued")
    text = metrics.render(broken)
    assert sample(text, f"{P}spool_readable") == 0
    assert sample(text, f"{P}queue_depth", state="queued") is None
    assert sample(
        metrics.render(broken),
        f"{P}messages_accepted_total",
        route="contoso-senders",
        outcome="queued",
    )


def test_direct_mode_has_no_spool_series() -> None:
    """Without a queue reading (direct mode) nothing about the queue is exposed."""
    assert f"{P}queue_depth" not in families(RelayMetrics())


def test_two_relays_in_one_process_keep_separate_counters() -> None:
    """Each RelayMetrics owns its registry: no clash, no shared counts."""
    first, second = RelayMetrics(), RelayMetrics()
    first.refused(550)
    assert sample(first, f"{P}smtp_refused_total", code="550") == 1
    assert sample(second, f"{P}smtp_refused_total", code="550") is None


def test_render_is_the_prometheus_text_format() -> None:
    """render() returns bytes with HELP/TYPE lines; CONTENT_TYPE is Prometheus text."""
    text = RelayMetrics().render().decode()
    assert f"# TYPE {P}messages_accepted_total counter" in text
    assert f'{P}build_info{{version="' in text
    assert RelayMetrics.CONTENT_TYPE.startswith("text/plain; version=")


def test_recent_errors_are_bounded_and_newest_first() -> None:
    """The status page's error list keeps the last N failure events."""
    metrics = RelayMetrics(recent_errors=3)
    for n in range(5):
        metrics.delivery_error(report(queue_id=f"Q{n}"))
    assert [e.queue_id for e in metrics.recent_errors()] == ["Q4", "Q3", "Q2"]


def test_null_metrics_accepts_every_event_and_records_nothing() -> None:
    """The default sink: every MetricsSink method exists and does nothing."""
    sink: MetricsSink = NullMetrics()
    sink.accepted("routes[0]", "queued")
    sink.delivered("routes[0]", "contoso", 1.0)
    sink.deferred("routes[0]")
    sink.failed("routes[0]", "expired")
    sink.bounced("routes[0]")
    sink.refused(421)
    sink.connections(2)
    sink.graph_response(None, None, 1.0)
    sink.token_request("contoso", ok=False)
    sink.delivery_error(report())
    assert isinstance(NULL_METRICS, NullMetrics)


# --- GraphAttempts: what counts as a Graph answer ------------------------------------------


CONFIG = textwrap.dedent(
    """\
    clients:
      - {name: local, networks: [127.0.0.1/32], senders: ["*@contoso.com"]}
    auth_objects:
      contoso:
        tenant_id: 00000000-0000-0000-0000-00000000000a
        client_id: 00000000-0000-0000-0000-00000000000b
        client_secret_env: SECRET
        authority_host: https://login.example.test
        graph_endpoint: https://graph.example.test
    routes:
      - {senders: ["*@contoso.com"], auth_object: contoso}
    """
)


def ScriptedGraph(*outcomes: DeliveryError | None) -> FakeGraph:  # noqa: N802
    """An honest GraphSender answering each call with the next scripted outcome."""
    graph = FakeGraph()
    graph.answer(*outcomes)
    return graph


ROUTE = Route(name="*@contoso.com", auth_object="contoso", mailbox="scanner@contoso.com")


def attempts_with(graph: FakeGraph, metrics: RelayMetrics, tmp_path: Path) -> GraphAttempts:
    config: Config = parse_config(CONFIG, base_dir=tmp_path, environ={"SECRET": "s3cr3t-value"})
    ticks = iter(float(n) for n in range(1000))
    return GraphAttempts(
        config=lambda: config, graph=graph, monotonic=lambda: next(ticks), metrics=metrics
    )


META = EntryMeta(
    queue_id="Q1",
    created=0.0,
    mail_from="scanner@contoso.com",
    recipients=("bob@partner.example",),
    client="local",
    client_ip="127.0.0.1",
    auth_object="contoso",
    mailbox="scanner@contoso.com",
    route="routes[0]",
    message_id="<m@test>",
    size=10,
)


async def test_attempts_report_graph_answers_with_their_latency(tmp_path: Path) -> None:
    """A 202 and a 403 are Graph responses; each observes one latency sample."""
    metrics = RelayMetrics()
    denied = PermanentDeliveryError(
        "Graph answered HTTP 403 ErrorSendAsDenied",
        reply=SmtpReply(550, "5.7.1", "Mailbox may not send as this sender"),
        code="ErrorSendAsDenied",
        http_status=403,
    )
    attempts = attempts_with(ScriptedGraph(None, denied), metrics, tmp_path)
    await attempts.send(META, b"Subject: x\r\n\r\nbody\r\n", ROUTE)
    await attempts.send(META, b"Subject: x\r\n\r\nbody\r\n", ROUTE)
    assert sample(metrics, f"{P}graph_responses_total", status_class="2xx", status="202") == 1
    assert sample(metrics, f"{P}graph_responses_total", status_class="4xx", status="403") == 1
    assert sample(metrics, f"{P}graph_errors_total", code="ErrorSendAsDenied") == 1
    assert sample(metrics, f"{P}graph_request_duration_seconds_count") == 2


async def test_attempts_do_not_count_token_failures_as_graph_answers(tmp_path: Path) -> None:
    """Entra's 503 on the token request is 4.7.0 from the token step, not a Graph 5xx."""
    metrics = RelayMetrics()
    entra_down = TransientDeliveryError(
        "token request for auth object 'contoso' failed: Entra answered an error",
        reply=SmtpReply(451, "4.7.0", "Cannot get a Microsoft 365 token, try again later"),
        http_status=503,
    )
    refused_401 = TransientDeliveryError(
        "Graph answered HTTP 401",
        reply=SmtpReply(451, "4.7.0", "Microsoft 365 refused the relay's token"),
        http_status=401,
    )
    attempts = attempts_with(ScriptedGraph(entra_down, refused_401), metrics, tmp_path)
    await attempts.send(META, b"Subject: x\r\n\r\nbody\r\n", ROUTE)
    await attempts.send(META, b"Subject: x\r\n\r\nbody\r\n", ROUTE)
    assert sample(metrics, f"{P}graph_responses_total", status_class="5xx", status="503") is None
    assert sample(metrics, f"{P}graph_responses_total", status_class="4xx", status="401") == 1


def test_log_failure_feeds_counters_and_the_error_list(tmp_path: Path) -> None:
    """deferred/failed/expired events count by route and land in recent_errors with remedy."""
    metrics = RelayMetrics()
    attempts = attempts_with(ScriptedGraph(), metrics, tmp_path)
    busy = TransientDeliveryError(
        "Graph answered HTTP 503", http_status=503, request_id="rid-503", remedy="wait"
    )
    gone = PermanentDeliveryError(
        "Graph answered HTTP 404 MailboxNotEnabledForRESTAPI",
        reply=SmtpReply(550, "5.1.1", "Mailbox cannot send through Graph"),
        code="MailboxNotEnabledForRESTAPI",
        http_status=404,
        request_id="rid-404",
        remedy="assign an Exchange Online licence to the mailbox",
    )
    attempts.log_failure(META, busy, "deferred")
    attempts.log_failure(META, gone, "failed")
    attempts.log_failure(META, busy, "expired")
    assert sample(metrics, f"{P}messages_deferred_total", route="routes[0]") == 1
    name = f"{P}messages_failed_total"
    assert sample(metrics, name, route="routes[0]", reason="permanent") == 1
    assert sample(metrics, name, route="routes[0]", reason="expired") == 1
    latest = metrics.recent_errors()[1]
    assert (latest.event, latest.code, latest.request_id) == (
        "failed",
        "MailboxNotEnabledForRESTAPI",
        "rid-404",
    )
    assert latest.remedy == "assign an Exchange Online licence to the mailbox"
    assert latest.reply.startswith("550 5.1.1")


def test_mailbox_budgets_and_pauses_are_exposed_per_mailbox() -> None:
    """Issue #12: used / limit per mailbox and limit, the drain ETA, the paused seconds."""
    metrics = RelayMetrics()
    metrics.mailbox_paused("noreply@contoso.com", "ErrorExceededMessageLimit", 60.0)
    metrics.mailbox_paused("noreply@contoso.com", "ErrorExceededMessageLimit", 30.0)
    row = MailboxRow(
        auth_object="contoso",
        mailbox="noreply@contoso.com",
        used={"messages_per_minute": 12, "recipients_per_day": 40},
        limits={"messages_per_minute": 30, "recipients_per_day": 10_000},
        in_flight=1,
        waiting=7,
        drain_eta=42.5,
        paused_for=0.0,
    )
    text = metrics.render(mailboxes=[row]).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    box = ("mailbox", "noreply@contoso.com")
    assert samples[(f"{P}mailbox_budget_used", (("limit", "messages_per_minute"), box))] == 12
    assert samples[(f"{P}mailbox_budget_limit", (("limit", "recipients_per_day"), box))] == 10_000
    assert samples[(f"{P}queue_drain_eta_seconds", (box,))] == 42.5
    assert samples[(f"{P}mailbox_waiting", (box,))] == 7
    paused = (box, ("reason", "ErrorExceededMessageLimit"))
    assert samples[(f"{P}mailbox_paused_seconds_total", paused)] == 90.0
