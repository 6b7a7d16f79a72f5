"""The admin HTTP server over real HTTP on 127.0.0.1 (port 0): /healthz and /readyz verdicts and
reasons (degradations included), /metrics in the Prometheus format from one reading of the
store's counts, the status page (escaped, no secrets), its defences (header and idle timeouts,
the Host check) over raw TCP, and a real relay + sandbox whose counters show up on /metrics
after smtplib sends mail."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.config.load import parse_config
from relay.config.schema import AdminConfig, Config
from relay.graph.tokens import TokenStatus
from relay.ops.admin import AdminServer, BoundListenerView, HealthSources
from relay.ops.metrics import ErrorReport, RelayMetrics
from relay.sandbox import Sandbox
from relay.service import BoundListener, RelayService
from relay.store.files.spool import Spool
from relay.store.protocol import StoreStats, StoreUnavailableError
from tests.conftest import MAILBOX, SECRET, asmtp_send, build_config, message, relay_config_text

PAGE_SECRET = "Sb8Q~admin-page-secret-do-not-show"
PROXY_PASSWORD = "proxy-pass-do-not-show"
CONFIG = textwrap.dedent(
    f"""\
    smtp:
      hostname: relay.test
      listeners:
        - {{address: 127.0.0.1, port: 2525}}
        - {{address: 127.0.0.1, port: 4650, tls: none, auth: none}}
    clients:
      - {{name: local, networks: [127.0.0.1/32], senders: ["*@contoso.com"]}}
    auth_objects:
      contoso:
        tenant_id: 00000000-0000-0000-0000-00000000000a
        client_id: 00000000-0000-0000-0000-00000000000b
        client_secret_env: SECRET
        authority_host: https://login.example.test
        graph_endpoint: https://graph.example.test
        proxy: http://relay:{PROXY_PASSWORD}@proxy.example.test:3128
    routes:
      - {{senders: ["scanner@contoso.com"], name: scanners, auth_object: contoso,
          mailbox: relay@contoso.com}}
      - {{senders: ["*@contoso.com"], auth_object: contoso}}
    """
)
# AdminConfig insists on a real port (1-65535); tests bind port 0 and ask the server.
ANY_PORT = AdminConfig.model_construct(address="127.0.0.1", port=0)


class CountingStore:
    """A Store stand-in with incremental counts: `stats` is answered from two numbers and
    counted; `list` and `due`, the per-entry calls a scan would make, fail the test."""

    def __init__(self, stats: StoreStats) -> None:
        self.counts = stats
        self.stats_calls = 0
        self.failure: Exception | None = None
        self.hang: asyncio.Event | None = None

    async def stats(self, now: float) -> StoreStats:
        self.stats_calls += 1
        if self.hang is not None:
            await self.hang.wait()
        if self.failure is not None:
            raise self.failure
        return self.counts

    async def list(self, state: str) -> Sequence[object]:
        raise AssertionError("an admin request listed the queue")

    async def due(self, now: float, limit: int) -> Sequence[object]:
        raise AssertionError("an admin request listed the queue")


@dataclass
class RelayState:
    """What the admin server reads, as plain values a test can change."""

    config: Config
    spool: Spool | None
    bound: list[BoundListenerView]
    tokens: dict[str, TokenStatus]
    store: CountingStore | None = field(
        default_factory=lambda: CountingStore(StoreStats(0, 0, 0, 0, 0, None))
    )
    degraded: list[str] = field(default_factory=list)

    def sources(self) -> HealthSources:
        return HealthSources(
            config=lambda: self.config,
            listeners=tuple(self.config.smtp.listeners),
            bound=lambda: self.bound,
            tokens=lambda: self.tokens,
            spool=self.spool,
            queue=self.store.stats if self.store is not None else None,
            degraded=lambda: self.degraded,
        )


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    text: str


async def get(server: AdminServer, path: str) -> Answer:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}{path}") as response,
    ):
        return Answer(response.status, response.headers["Content-Type"], await response.text())


@pytest.fixture
def state(tmp_path: Path) -> RelayState:
    """All listeners bound, a writable spool, no token needed yet."""
    config = parse_config(CONFIG, base_dir=tmp_path, environ={"SECRET": PAGE_SECRET})
    spool = Spool(tmp_path / "spool", reserve_bytes=0)
    spool.root.mkdir()
    bound: list[BoundListenerView] = [
        BoundListener(li, li.address, li.port) for li in config.smtp.listeners
    ]
    return RelayState(config, spool, bound, {})


AdminFactory = Callable[..., Awaitable[AdminServer]]


@pytest.fixture
async def start_admin() -> AsyncIterator[AdminFactory]:
    """Start admin servers on 127.0.0.1:0; all are stopped at teardown."""
    started: list[AdminServer] = []

    async def start(
        sources: HealthSources, metrics: RelayMetrics | None = None, check_timeout: float = 2.0
    ) -> AdminServer:
        server = AdminServer(
            ANY_PORT, metrics=metrics or RelayMetrics(), health=sources, check_timeout=check_timeout
        )
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


# --- /healthz ----------------------------------------------------------------------------


async def test_healthz_is_ok_when_listeners_are_bound_and_the_spool_is_writable(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """200 `ok` as plain text when every check passes."""
    server = await start_admin(state.sources())
    answer = await get(server, "/healthz")
    assert (answer.status, answer.text) == (200, "ok\n")
    assert answer.content_type.startswith("text/plain")


async def test_healthz_is_503_when_the_spool_directory_became_a_file(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """A spool root that is not a writable directory cannot take mail: 503 with the reason."""
    assert state.spool is not None
    shutil.rmtree(state.spool.root)
    state.spool.root.write_text("not a directory")
    server = await start_admin(state.sources())
    answer = await get(server, "/healthz")
    assert answer.status == 503
    assert answer.text.splitlines() == [
        "unhealthy",
        f"- spool {state.spool.root} is not a directory",
    ]


async def test_healthz_is_503_when_the_spool_is_short_of_space(
    state: RelayState, tmp_path: Path, start_admin: AdminFactory
) -> None:
    """Free space below the reserve is the 451-for-everyone state: not healthy."""
    state.spool = Spool(state.spool.root if state.spool else tmp_path, reserve_bytes=1 << 62)
    server = await start_admin(state.sources())
    answer = await get(server, "/healthz")
    assert answer.status == 503
    assert "free space is below the reserve" in answer.text


async def test_healthz_names_each_listener_that_is_not_bound(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """Listeners reported down (not started yet, or stopped) make /healthz 503."""
    state.bound = state.bound[:1]
    server = await start_admin(state.sources())
    answer = await get(server, "/healthz")
    assert answer.status == 503
    assert answer.text.splitlines()[1:] == ["- SMTP listener 127.0.0.1:4650 is not bound"]


async def test_healthz_in_direct_mode_needs_no_spool(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """Without a spool (direct mode) the listeners alone decide."""
    state.spool = None
    server = await start_admin(state.sources())
    assert (await get(server, "/healthz")).status == 200


# --- /readyz -----------------------------------------------------------------------------

FAILED = TokenStatus(
    last_ok=False,
    last_at=1_700_000_000.0,
    code="AADSTS7000215",
    remedy="the client secret is wrong: create a new client secret",
)
OK = TokenStatus(last_ok=True, last_at=1_700_000_000.0, expires_at=1_700_003_599.0)


@pytest.mark.parametrize(
    ("tokens", "status"),
    [
        ({}, 200),  # never needed a token, never failed
        ({"contoso": TokenStatus()}, 200),
        ({"contoso": OK}, 200),
        ({"contoso": FAILED, "fabrikam": OK}, 200),  # one working auth object is enough
        ({"contoso": FAILED}, 503),
        ({"contoso": FAILED, "fabrikam": TokenStatus()}, 503),
    ],
)
async def test_readyz_follows_the_last_token_outcomes(
    state: RelayState, start_admin: AdminFactory, tokens: dict[str, TokenStatus], status: int
) -> None:
    """Ready when some auth object's last token request succeeded, or none has failed yet."""
    state.tokens = tokens
    server = await start_admin(state.sources())
    assert (await get(server, "/readyz")).status == status


async def test_readyz_reasons_name_the_auth_object_code_and_remedy(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """A failing token request is reported with its AADSTS code and the setup step."""
    state.tokens = {"contoso": FAILED}
    server = await start_admin(state.sources())
    answer = await get(server, "/readyz")
    assert answer.text.splitlines() == [
        "not ready",
        "- auth object contoso: the last token request failed (AADSTS7000215): "
        "the client secret is wrong: create a new client secret",
    ]


async def test_readyz_includes_the_health_checks(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """Not healthy is never ready, even with good tokens."""
    state.tokens = {"contoso": OK}
    state.bound = []
    server = await start_admin(state.sources())
    answer = await get(server, "/readyz")
    assert answer.status == 503
    assert "- SMTP listener 127.0.0.1:2525 is not bound" in answer.text.splitlines()


# --- degraded: healthy, but an operator should look ------------------------------------------


async def test_healthz_stays_200_and_names_each_degradation(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """Outcomes the store could not record: still healthy (a restart would not help), but
    /healthz says so, one `degraded:` line per reason."""
    state.degraded = ["outcomes not recorded: 3", "store unavailable: read-only file system"]
    server = await start_admin(state.sources())
    answer = await get(server, "/healthz")
    assert answer.status == 200
    assert answer.text.splitlines() == [
        "degraded: outcomes not recorded: 3",
        "degraded: store unavailable: read-only file system",
    ]
    assert await server.healthy()


async def test_readyz_is_503_while_degraded(state: RelayState, start_admin: AdminFactory) -> None:
    """A load balancer sends new mail elsewhere while outcomes wait to be recorded."""
    state.tokens = {"contoso": OK}
    state.degraded = ["outcomes not recorded: 3"]
    server = await start_admin(state.sources())
    answer = await get(server, "/readyz")
    assert answer.status == 503
    assert answer.text.splitlines() == ["not ready", "- degraded: outcomes not recorded: 3"]


async def test_health_follows_the_degradation_as_it_comes_and_goes(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """The reasons are read per request: when the store takes the outcomes, both answer ok."""
    server = await start_admin(state.sources())
    state.degraded = ["outcomes not recorded: 1"]
    assert (await get(server, "/readyz")).status == 503
    state.degraded = []
    assert (await get(server, "/healthz")).text == "ok\n"
    assert ((r := await get(server, "/readyz")).status, r.text) == (200, "ok\n")


async def test_unhealthy_and_degraded_are_reported_together(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """503 for the failed check, and the degradation is not hidden behind it."""
    state.bound = state.bound[:1]
    state.degraded = ["outcomes not recorded: 2"]
    server = await start_admin(state.sources())
    answer = await get(server, "/healthz")
    assert answer.status == 503
    assert answer.text.splitlines() == [
        "unhealthy",
        "- SMTP listener 127.0.0.1:4650 is not bound",
        "- degraded: outcomes not recorded: 2",
    ]


async def test_the_status_page_shows_each_degradation(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """People see it too, escaped like everything else."""
    state.degraded = ["outcomes not recorded: 3 <since 02:00>"]
    server = await start_admin(state.sources())
    page = (await get(server, "/")).text
    assert "<li>degraded: outcomes not recorded: 3 &lt;since 02:00&gt;</li>" in page
    assert "Ready." not in page


# --- no scans: one cheap reading of the store's counts per request -----------------------------


async def test_a_scrape_reads_the_counts_once_and_lists_nothing(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """/metrics takes one `Store.stats` reading per scrape and never calls a per-entry method
    (the stand-in's `list` and `due` raise); the gauges show that reading."""
    store = CountingStore(StoreStats(20_000, 4, 7, 1, 2, oldest_created=None))
    state.store = store
    server = await start_admin(state.sources())
    for scrape in range(1, 4):
        text = (await get(server, "/metrics")).text
        assert store.stats_calls == scrape
    assert value(text, "smtp_graph_relay_queue_depth", state="queued") == 20_000
    assert value(text, "smtp_graph_relay_dead_letters", state="dead") == 7


async def test_the_status_page_reads_the_counts_once_and_lists_nothing(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """The page shows the counts from one `Store.stats` reading per view."""
    store = CountingStore(StoreStats(20_000, 4, 7, 1, 2, oldest_created=None))
    state.store = store
    server = await start_admin(state.sources())
    page = (await get(server, "/")).text
    assert store.stats_calls == 1
    assert "<td>20000</td><td>4</td><td>0</td><td>-</td><td>7</td><td>1</td><td>2</td>" in page


async def test_health_checks_do_not_read_the_queue(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """/healthz and /readyz probe the spool directory for room; they take no counts."""
    assert state.store is not None
    server = await start_admin(state.sources())
    await get(server, "/healthz")
    await get(server, "/readyz")
    assert state.store.stats_calls == 0


async def test_an_unavailable_store_fails_the_gauge_and_the_page_shows_why(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """StoreUnavailableError: spool_readable 0, the other series still render, and the
    status page says what the store answered."""
    assert state.store is not None
    state.store.failure = StoreUnavailableError("database is down")
    server = await start_admin(state.sources())
    text = (await get(server, "/metrics")).text
    assert value(text, "smtp_graph_relay_spool_readable") == 0
    assert value(text, "smtp_graph_relay_build_info", version=__version__) == 1
    assert "cannot read the queue: database is down" in (await get(server, "/")).text


async def test_a_store_that_does_not_answer_cannot_hold_a_scrape(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """A hung store: the scrape answers after the check timeout with spool_readable 0."""
    assert state.store is not None
    state.store.hang = asyncio.Event()  # never set
    server = await start_admin(state.sources(), check_timeout=0.2)
    started = time.monotonic()
    text = (await get(server, "/metrics")).text
    assert time.monotonic() - started < 5.0
    assert value(text, "smtp_graph_relay_spool_readable") == 0


async def test_direct_mode_exposes_no_queue_series(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """No store (direct mode): no queue gauges, and the page says nothing is queued."""
    state.store = None
    server = await start_admin(state.sources())
    assert value((await get(server, "/metrics")).text, "smtp_graph_relay_spool_readable") is None
    assert "Direct mode: no spool" in (await get(server, "/")).text


# --- /metrics ----------------------------------------------------------------------------


async def test_metrics_serves_the_prometheus_text_format(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """Content type of the Prometheus text format; events and queue gauges are in the body."""
    metrics = RelayMetrics()
    metrics.accepted("routes[1]", "queued")
    server = await start_admin(state.sources(), metrics)
    answer = await get(server, "/metrics")
    assert answer.status == 200
    assert answer.content_type == RelayMetrics.CONTENT_TYPE  # text/plain; version=...
    text = answer.text
    assert value(
        text, "smtp_graph_relay_messages_accepted_total", route="routes[1]", outcome="queued"
    )
    assert value(text, "smtp_graph_relay_queue_depth", state="queued") == 0
    assert value(text, "smtp_graph_relay_spool_readable") == 1


# --- the status page ---------------------------------------------------------------------


def error(**changes: object) -> ErrorReport:
    fields: dict[str, object] = {
        "at": 1_700_000_000.0,
        "event": "failed",
        "queue_id": "4F2A9C0D1B3E5A77",
        "route": "routes[0]",
        "auth_object": "contoso",
        "mailbox": "relay@contoso.com",
        "http_status": 404,
        "code": "MailboxNotEnabledForRESTAPI",
        "request_id": "9f1c6a2e-request-id",
        "reply": "550 5.1.1 Mailbox cannot send through Graph",
        "remedy": "assign an Exchange Online licence to the mailbox",
        "message": "Graph answered HTTP 404 MailboxNotEnabledForRESTAPI",
    }
    fields.update(changes)
    return ErrorReport(**fields)  # type: ignore[arg-type]


async def test_status_page_shows_routes_queue_tokens_and_errors_with_remedy(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """The page for people: routes table, queue counts, token state and the last errors."""
    metrics = RelayMetrics()
    metrics.delivery_error(error())
    state.tokens = {"contoso": FAILED}
    server = await start_admin(state.sources(), metrics)
    answer = await get(server, "/")
    page = answer.text
    assert answer.status == 200
    assert answer.content_type == "text/html; charset=utf-8"
    assert (
        "<td>scanners</td><td>scanner@contoso.com</td><td>contoso</td><td>relay@contoso.com</td>"
    ) in page  # a route is shown by its name
    assert (  # a route without a name is named after its first sender pattern
        "<td>*@contoso.com</td><td>*@contoso.com</td><td>contoso</td>"
        "<td>the sender&#x27;s own mailbox</td>"
    ) in page
    assert "127.0.0.1:4650" in page
    assert "MailboxNotEnabledForRESTAPI" in page
    assert "9f1c6a2e-request-id" in page
    assert "assign an Exchange Online licence to the mailbox" in page
    assert "AADSTS7000215" in page
    assert "<td>0</td>" in page  # queue counts


async def test_status_page_escapes_what_it_shows(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """Server-supplied text (Graph messages, codes) is HTML-escaped."""
    metrics = RelayMetrics()
    metrics.delivery_error(error(message="<script>alert(1)</script>", code="A&B"))
    server = await start_admin(state.sources(), metrics)
    page = (await get(server, "/")).text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "A&amp;B" in page


async def test_status_page_never_shows_a_secret(
    state: RelayState, start_admin: AdminFactory
) -> None:
    """Neither the client secret nor the proxy's password appear anywhere on the page."""
    server = await start_admin(state.sources())
    page = (await get(server, "/")).text
    assert "contoso" in page
    assert PAGE_SECRET not in page
    assert PROXY_PASSWORD not in page


async def test_port_zero_binds_a_free_port_and_stop_is_idempotent(
    state: RelayState,
) -> None:
    """`port` reports the bound port; a stopped server refuses connections; stop twice is fine."""
    server = AdminServer(ANY_PORT, metrics=RelayMetrics(), health=state.sources())
    await server.start()
    port = server.port
    assert port > 0
    await server.stop()
    await server.stop()
    with pytest.raises(RuntimeError):
        _ = server.port
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")


# --- end to end: a real relay, the sandbox and smtplib -----------------------------------

HYBRID = "{mode: hybrid, inline_timeout: 5s, spool_dir: spool}"


@dataclass
class Metered:
    relay: RelayService
    admin: AdminServer
    metrics: RelayMetrics

    @property
    def smtp_port(self) -> int:
        return self.relay.listeners[0].port


@pytest.fixture
async def metered(
    sandbox: Sandbox, tmp_path: Path, start_admin: AdminFactory
) -> AsyncIterator[Metered]:
    """A relay built like conftest's start_relay, with metrics and its admin server."""
    config = build_config(relay_config_text(sandbox, delivery=HYBRID), tmp_path, SECRET)
    metrics = RelayMetrics()
    relay = RelayService(config, metrics=metrics)
    await relay.start()
    try:
        sources: HealthSources = relay.health_sources()
        admin = await start_admin(sources, metrics)
        yield Metered(relay, admin, metrics)
    finally:
        await relay.stop()


async def test_a_delivered_message_shows_up_in_the_metrics(metered: Metered) -> None:
    """smtplib -> relay -> sandbox Graph: accepted, delivered, one Graph call, one token."""
    ready = await get(metered.admin, "/readyz")
    assert (ready.status, ready.text) == (200, "ok\n")  # no token needed yet
    outcome = await asmtp_send(metered.smtp_port, message())
    assert outcome.code == 250
    text = (await get(metered.admin, "/metrics")).text
    p = "smtp_graph_relay_"
    route = {"route": "*@contoso.com"}  # the route's label: its first sender pattern
    assert value(text, f"{p}messages_accepted_total", **route, outcome="delivered") == 1
    assert value(text, f"{p}messages_delivered_total", **route, auth_object="contoso") == 1
    assert value(text, f"{p}graph_request_duration_seconds_count") == 1
    assert value(text, f"{p}graph_responses_total", status_class="2xx", status="202") == 1
    assert value(text, f"{p}token_acquisitions_total", auth_object="contoso", outcome="ok") == 1
    assert value(text, f"{p}queue_depth", state="queued") == 0
    assert value(text, f"{p}smtp_connections_open") is not None  # 0 or 1: QUIT races the GET
    health = await get(metered.admin, "/healthz")
    assert (health.status, health.text) == (200, "ok\n")


async def test_a_graph_refusal_is_counted_and_listed_with_its_remedy(
    metered: Metered, sandbox: Sandbox
) -> None:
    """Graph 404 MailboxNotEnabledForRESTAPI: 550 to the client, failed_total, on the page."""
    sandbox.faults.fail_graph(404, "MailboxNotEnabledForRESTAPI", "REST API is not yet supported")
    outcome = await asmtp_send(metered.smtp_port, message())
    assert outcome.code == 550
    text = (await get(metered.admin, "/metrics")).text
    p = "smtp_graph_relay_"
    route = "*@contoso.com"  # the route's label: its first sender pattern
    assert value(text, f"{p}messages_failed_total", route=route, reason="permanent") == 1
    assert value(text, f"{p}graph_errors_total", code="MailboxNotEnabledForRESTAPI") == 1
    assert value(text, f"{p}messages_accepted_total", route=route, outcome="delivered") is None
    [reported] = metered.metrics.recent_errors()
    assert reported.request_id
    page = (await get(metered.admin, "/")).text
    assert reported.request_id in page
    assert "assign an Exchange Online licence" in page
    assert MAILBOX in page
    assert SECRET not in page


async def test_a_refused_client_is_counted_by_reply_code(metered: Metered) -> None:
    """A sender the client may not use: 550 at MAIL FROM, smtp_refused_total{code=550}."""
    outcome = await asmtp_send(metered.smtp_port, message(), sender="someone@fabrikam.example")
    assert outcome.code == 550
    text = (await get(metered.admin, "/metrics")).text
    assert value(text, "smtp_graph_relay_smtp_refused_total", code="550") == 1
