"""The `delivery.mailbox_limits` section and mailbox pools on routes (DESIGN §3, issue 12):
defaults are Microsoft's figures, and every mistake names its key path."""

from __future__ import annotations

import pytest

from relay.config.limits import MailboxLimitsConfig
from relay.config.schema import Config
from relay.core.policy import choose_route
from relay.core.values import pool_key, pool_members
from tests.unit.test_config import MINIMAL, parse, problems_of

POOL = ("noreply1@contoso.com", "noreply2@contoso.com", "noreply3@contoso.com")


def with_limits(yaml: str) -> str:
    """MINIMAL with a `delivery.mailbox_limits` section (`yaml` indented under it)."""
    body = "".join(f"    {line}\n" for line in yaml.strip().splitlines())
    return MINIMAL + "delivery:\n  mailbox_limits:\n" + body


def with_mailbox(mailbox: str) -> str:
    """MINIMAL with the route's `mailbox` set to `mailbox` (YAML flow syntax)."""
    return MINIMAL.replace("auth_object: contoso", f"auth_object: contoso\n    mailbox: {mailbox}")


def limits_of(text: str) -> MailboxLimitsConfig:
    config = parse(text)
    assert isinstance(config, Config)
    return config.delivery.mailbox_limits


def test_mailbox_limits_default_to_exchange_onlines_figures() -> None:
    """30 messages a minute, 10,000 recipients a day, 4 requests at once, 10,000 requests per
    10 minutes, 150 MiB uploaded per 5 minutes; no overrides."""
    limits = limits_of(MINIMAL)
    assert limits == MailboxLimitsConfig()
    assert (
        limits.messages_per_minute,
        limits.recipients_per_day,
        limits.concurrent_requests,
        limits.requests_per_10_minutes,
        limits.upload_per_5_minutes,
        limits.overrides,
    ) == (30, 10_000, 4, 10_000, 150 * 1024 * 1024, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("50MB", 50_000_000), ("50MiB", 50 * 1024 * 1024), ("1048576", 1_048_576)],
)
def test_the_upload_budget_takes_sizes(text: str, expected: int) -> None:
    """upload_per_5_minutes accepts the same sizes as every other size key."""
    assert limits_of(with_limits(f"upload_per_5_minutes: {text}")).upload_per_5_minutes == expected


def test_an_override_keeps_the_keys_it_does_not_set_unset() -> None:
    """An override holds only what it sets; limits_for fills in the rest from the section."""
    limits = limits_of(
        with_limits('overrides: [{mailboxes: ["alerts@contoso.com"], messages_per_minute: 10}]')
    )
    (override,) = limits.overrides
    assert (override.messages_per_minute, override.recipients_per_day) == (10, None)


@pytest.mark.parametrize(
    ("yaml", "path", "words"),
    [
        pytest.param(
            "concurrent_requests: 5",
            "delivery.mailbox_limits.concurrent_requests",
            "less than or equal to 4",
            id="more-than-graphs-4",
        ),
        pytest.param(
            'overrides: [{mailboxes: ["a@contoso.com"], concurrent_requests: 8}]',
            "delivery.mailbox_limits.overrides[0].concurrent_requests",
            "less than or equal to 4",
            id="override-more-than-4",
        ),
        pytest.param(
            "messages_per_minute: 0",
            "delivery.mailbox_limits.messages_per_minute",
            "greater than or equal to 1",
            id="zero-budget",
        ),
        pytest.param(
            'overrides: [{mailboxes: ["a@contoso.com"]}]',
            "delivery.mailbox_limits.overrides",
            "override 0 sets no limit",
            id="override-without-a-limit",
        ),
        pytest.param(
            "overrides: [{mailboxes: [], messages_per_minute: 3}]",
            "delivery.mailbox_limits.overrides[0].mailboxes",
            "at least 1",
            id="override-for-nobody",
        ),
        pytest.param(
            "messages_per_hour: 100",
            "delivery.mailbox_limits.messages_per_hour",
            "unknown key",
            id="unknown-key",
        ),
        pytest.param(
            'overrides: [{mailboxes: ["a@contoso.com"], messages_per_minute: 3, burst: 2}]',
            "delivery.mailbox_limits.overrides[0].burst",
            "unknown key",
            id="unknown-key-in-override",
        ),
    ],
)
def test_mailbox_limit_mistakes_name_the_key_path(yaml: str, path: str, words: str) -> None:
    """Each refusal names where it is and what would be valid."""
    problems = problems_of(with_limits(yaml))
    assert f"{path}:" in problems
    assert words in problems


# --- pools ----------------------------------------------------------------------------------


def test_a_list_of_two_or_more_mailboxes_is_a_pool() -> None:
    """The route keeps the members in order; `pool` gives them."""
    config = parse(with_mailbox(f"[{', '.join(POOL)}]"))
    assert isinstance(config, Config)
    (route,) = config.routes
    assert route.pool == POOL
    assert route.mailbox_shown == f"pool of 3: {', '.join(POOL)}"


def test_a_one_element_list_is_a_plain_mailbox() -> None:
    """A pool of one is just that mailbox."""
    config = parse(with_mailbox("[relay@contoso.com]"))
    assert isinstance(config, Config)
    (route,) = config.routes
    assert (route.mailbox, route.pool) == ("relay@contoso.com", ())


@pytest.mark.parametrize(
    ("mailbox", "words"),
    [
        pytest.param(
            "[noreply1@contoso.com, sender]", "'sender' cannot be part of a pool", id="sender"
        ),
        pytest.param(
            "[a@contoso.com, A@CONTOSO.com]", "is listed twice", id="ascii-case-duplicate"
        ),
        pytest.param("[a@contoso.com, a@contoso.com]", "is listed twice", id="exact-duplicate"),
        pytest.param("[]", "at least one mailbox address", id="empty"),
        pytest.param("[a@contoso.com, not-an-address]", "must be a mailbox address", id="no-at"),
    ],
)
def test_pool_mistakes_name_the_route_mailbox(mailbox: str, words: str) -> None:
    """Every pool refusal is reported at routes[0].mailbox with what is wrong."""
    problems = problems_of(with_mailbox(mailbox))
    assert "routes[0].mailbox:" in problems
    assert words in problems


def test_members_that_differ_outside_ascii_case_are_not_duplicates() -> None:
    """Duplicates are found ASCII case-insensitively: the Kelvin sign is not a "k"."""
    config = parse(with_mailbox("[kelvin@contoso.com, \u212aelvin@contoso.com]"))
    assert isinstance(config, Config)
    assert config.routes[0].pool == ("kelvin@contoso.com", "\u212aelvin@contoso.com")


def test_choose_route_keeps_a_pool_as_a_pool() -> None:
    """Which member sends is decided at each attempt: the route's mailbox is the pool's key
    and `pool` its members."""
    config = parse(with_mailbox(f"[{', '.join(POOL)}]"))
    assert isinstance(config, Config)
    route = choose_route(config.routes, "erp@contoso.com")
    assert route.mailbox == pool_key(POOL)
    assert route.pool == POOL
    assert pool_members(route.mailbox) == POOL


def test_route_member_sends_as_one_member() -> None:
    """member() is the same route sending as one mailbox of its pool, no longer a pool."""
    config = parse(with_mailbox(f"[{', '.join(POOL)}]"))
    assert isinstance(config, Config)
    route = choose_route(config.routes, "erp@contoso.com")
    member = route.member(POOL[1])
    assert (member.mailbox, member.pool) == (POOL[1], ())
    assert (member.name, member.auth_object) == (route.name, route.auth_object)


def test_pool_members_of_a_plain_mailbox_is_empty() -> None:
    """A plain address is never mistaken for a pool key."""
    assert pool_members("relay@contoso.com") == ()
    assert pool_key(("a@contoso.com",)) != "a@contoso.com"
