"""The access policy as a table: who may send, as whom, to whom, through which route."""

from __future__ import annotations

import pytest

from relay.config.schema import ClientConfig, RouteConfig
from relay.core.errors import PolicyError
from relay.core.message.authors import Authors, UnreadableAuthorError, read_authors
from relay.core.message.headers import split_header_from_body
from relay.core.policy import (
    check_authors,
    check_envelope_sender,
    check_recipient,
    choose_route,
    effective_sender,
    identify_client,
    matches_any,
)

PRINTERS = ClientConfig.model_validate(
    {"name": "printers", "networks": ["10.0.5.0/24"], "senders": ["scanner@contoso.com"]}
)
ERP = ClientConfig.model_validate(
    {
        "name": "erp",
        "networks": ["10.0.0.0/8", "2001:db8::/64"],
        "senders": ["*@contoso.com"],
        "recipients": ["*@contoso.com", "*@partner.example"],
    }
)
CLIENTS = [PRINTERS, ERP]
ROUTES = [
    RouteConfig(senders=["alerts@contoso.com"], auth_object="ops", mailbox="noreply@contoso.com"),
    RouteConfig(senders=["*@contoso.com"], auth_object="contoso"),
]


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.0.5.7", "printers"),
        ("10.9.9.9", "erp"),
        ("::ffff:10.0.5.7", "printers"),
        ("2001:db8::1", "erp"),
    ],
)
def test_first_client_whose_network_contains_the_address_wins(ip: str, expected: str) -> None:
    """Clients are matched in file order; IPv4-mapped IPv6 addresses count as IPv4."""
    assert identify_client(CLIENTS, ip).name == expected


@pytest.mark.parametrize("ip", ["192.0.2.1", "2001:db8:1::1", "not-an-ip", ""])
def test_unknown_client_gets_relay_access_denied(ip: str) -> None:
    """No network match is 550 5.7.1: the relay is never open."""
    with pytest.raises(PolicyError) as caught:
        identify_client(CLIENTS, ip)
    assert (caught.value.reply.code, caught.value.reply.status) == (550, "5.7.1")
    assert "Relay access denied" in caught.value.reply.text


@pytest.mark.parametrize(
    ("client", "sender", "allowed"),
    [
        (PRINTERS, "scanner@contoso.com", True),
        (PRINTERS, "SCANNER@Contoso.COM", True),
        (PRINTERS, "ceo@contoso.com", False),
        (ERP, "anyone@contoso.com", True),
        (ERP, "anyone@contoso.com.evil.example", False),
        (ERP, "", True),
    ],
)
def test_envelope_sender_must_match_the_client_patterns(
    client: ClientConfig, sender: str, allowed: bool
) -> None:
    """MAIL FROM is checked case-insensitively against whole-address globs; <> waits for DATA."""
    if allowed:
        check_envelope_sender(client, sender)
    else:
        with pytest.raises(PolicyError) as caught:
            check_envelope_sender(client, sender)
        assert str(caught.value.reply).startswith("550 5.7.1 Sender <")


def test_recipient_patterns_restrict_recipients_when_present() -> None:
    """A client with recipient patterns may only send there; one without may send anywhere."""
    check_recipient(ERP, "bob@partner.example")
    check_recipient(PRINTERS, "anyone@anywhere.example")
    with pytest.raises(PolicyError) as caught:
        check_recipient(ERP, "victim@elsewhere.example")
    assert caught.value.reply.code == 550


def test_every_header_author_must_be_an_allowed_sender() -> None:
    """A forged From header is refused even when MAIL FROM is allowed."""
    check_authors(PRINTERS, ["scanner@contoso.com"])
    with pytest.raises(PolicyError) as caught:
        check_authors(PRINTERS, ["scanner@contoso.com", "ceo@contoso.com"])
    assert "ceo@contoso.com" in caught.value.reply.text


def test_null_sender_is_routed_by_the_header_from() -> None:
    """MAIL FROM:<> uses the first From address; without any From it is refused."""
    assert effective_sender("", ["scanner@contoso.com"]) == "scanner@contoso.com"
    assert effective_sender("a@contoso.com", ["b@contoso.com"]) == "a@contoso.com"
    with pytest.raises(PolicyError):
        effective_sender("", [])


def test_first_matching_route_wins_and_resolves_the_mailbox() -> None:
    """mailbox: sender means the sender's own mailbox; a fixed mailbox is used as is."""
    fixed = choose_route(ROUTES, "alerts@contoso.com")
    assert (fixed.auth_object, fixed.mailbox, fixed.name) == (
        "ops",
        "noreply@contoso.com",
        "alerts@contoso.com",
    )
    own = choose_route(ROUTES, "Jane@contoso.com")
    assert (own.auth_object, own.mailbox) == ("contoso", "Jane@contoso.com")


def test_sender_without_route_is_refused() -> None:
    """A sender no route covers gets 550 5.7.1 rather than an arbitrary mailbox."""
    with pytest.raises(PolicyError) as caught:
        choose_route(ROUTES, "x@fabrikam.example")
    assert str(caught.value.reply).startswith("550 5.7.1 No outbound route")


@pytest.mark.parametrize(
    ("address", "patterns", "expected"),
    [
        ("a@b.example", ["*"], True),
        ("a@b.example", ["*@B.EXAMPLE"], True),
        ("a@sub.b.example", ["*@b.example"], False),
        ("a@sub.b.example", ["*@*.b.example"], True),
        ("a@b.example", [], False),
    ],
)
def test_glob_matching_is_whole_address_and_case_insensitive(
    address: str, patterns: list[str], expected: bool
) -> None:
    """Patterns are anchored: a domain glob does not match subdomains unless it says so."""
    assert matches_any(address, patterns) is expected


def test_a_route_is_named_by_its_name_else_its_first_sender_pattern() -> None:
    """The name is a label for logs and metrics; a route's flags travel with it."""
    named = RouteConfig(
        senders=["*@contoso.com"], name="main", auth_object="contoso", save_to_sent_items=False
    )
    route = choose_route([named], "jane@contoso.com")
    assert (route.name, route.save_to_sent_items, route.needs_json) == ("main", False, True)
    assert choose_route(ROUTES, "jane@contoso.com").name == "*@contoso.com"


# --- spoofing through author fields we cannot read (issue #11 item 1) -----------------------------


def authors_of(*lines: str) -> tuple[str, ...]:
    raw = ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode("utf-8", "surrogateescape")
    return read_authors(split_header_from_body(raw).fields).addresses


@pytest.mark.parametrize(
    ("line", "header"),
    [
        ("From: ceo@contoso.com\r\n\tscanner@contoso.com", "From"),  # folded word sequence
        ('From: "x" ceo@contoso.com', "From"),
        ("From: ceo@contoso.com scanner@contoso.com", "From"),
        ("From: <scanner@contoso.com> ceo@contoso.com", "From"),
        ("From: Scanner <ceo@contoso.com scanner@contoso.com>", "From"),
        ("From: scanner@contoso.com@ceo.example", "From"),
        ("From: scanner@contoso.com; ceo@contoso.com", "From"),
        ("From: Staff: ceo@contoso.com;", "From"),
        ('From: "unterminated <ceo@contoso.com>', "From"),
        ("From: ", "From"),
        ("From: (only a comment)", "From"),
        ("From: <>", "From"),
        ("Sender: ceo@contoso.com scanner@contoso.com", "Sender"),
        ("Sender: scanner@contoso.com, ceo@contoso.com", "Sender"),
        ("Resent-From: ceo@contoso.com\r\n scanner@contoso.com", "Resent-From"),
        ("RESENT-FROM: x ceo@contoso.com", "Resent-From"),
    ],
)
def test_an_author_field_without_one_reading_is_refused_naming_it(line: str, header: str) -> None:
    """A present From/Sender/Resent-From that yields no address, or one a strict RFC 5322
    reading does not find, is 550 5.7.1 with the header's name in the reply."""
    with pytest.raises(UnreadableAuthorError) as refused:
        authors_of("From: scanner@contoso.com" if header != "From" else "X-Dummy: 1", line)
    reply = refused.value.reply
    assert (reply.code, reply.status) == (550, "5.7.1")
    assert f"The {header} header" in reply.text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("From: scanner@contoso.com", ("scanner@contoso.com",)),
        ("From: Scanner <Scanner@Contoso.COM>", ("scanner@contoso.com",)),
        ("From: scanner@contoso.com (Floor 2 scanner)", ("scanner@contoso.com",)),
        ("From: Scanner\r\n <scanner@contoso.com>", ("scanner@contoso.com",)),
        ('From: "scanner@floor2.local" <scanner@contoso.com>', ("scanner@contoso.com",)),
        ("From: scanner@floor2.local <scanner@contoso.com>", ("scanner@contoso.com",)),
        ("From: John Q. Public <scanner@contoso.com>", ("scanner@contoso.com",)),
        ("From: =?utf-8?Q?J=C3=B6rg?= <scanner@contoso.com>", ("scanner@contoso.com",)),
        ("From: root (Cron Daemon)", ("root",)),
        ("From: a@contoso.com, b@contoso.com", ("a@contoso.com", "b@contoso.com")),
    ],
)
def test_an_author_field_with_one_reading_yields_its_addresses(
    line: str, expected: tuple[str, ...]
) -> None:
    """Display names, comments, folding, encoded words and legacy `@` in a display name leave
    one reading: those addresses (ASCII-lowercased) are what the policy checks."""
    assert authors_of(line) == expected


def test_reply_to_is_reported_but_never_checked() -> None:
    """Reply-To is not an author: an unreadable one is no refusal, a readable one is logged."""
    raw = b"From: scanner@contoso.com\r\nReply-To: CEO@contoso.com\r\n\r\nbody\r\n"
    authors = read_authors(split_header_from_body(raw).fields)
    assert authors == Authors(("scanner@contoso.com",), ("ceo@contoso.com",))
    check_authors(PRINTERS, authors.addresses)
    assert authors_of("From: scanner@contoso.com", "Reply-To: x ceo@contoso.com") == (
        "scanner@contoso.com",
    )


@pytest.mark.parametrize(
    ("address", "pattern"),
    [
        ("x@straße.de", "x@strasse.de"),
        ("x@strasse.de", "x@straße.de"),
        ("\u017fcanner@contoso.com", "scanner@contoso.com"),  # LATIN SMALL LETTER LONG S
        ("scanner@contoso.com", "\u017fcanner@contoso.com"),
        ("\u212aim@contoso.com", "kim@contoso.com"),  # KELVIN SIGN
        ("kim@contoso.com", "\u212aim@contoso.com"),
        ("\u212aim@contoso.com", "*k*@contoso.com"),
        ("jörg@contoso.com", "JÖRG@contoso.com"),
    ],
)
def test_only_ascii_letters_match_without_case(address: str, pattern: str) -> None:
    """Exchange compares addresses ASCII case-insensitively; Unicode folding would let ß, the
    long s and the Kelvin sign pass a pattern written for ss, s and k."""
    assert not matches_any(address, [pattern])


def test_a_unicode_variant_of_an_allowed_sender_is_refused_as_author() -> None:
    """scanner@ with a long s in From is another mailbox, not the allowed scanner@."""
    with pytest.raises(PolicyError):
        check_authors(PRINTERS, authors_of("From: \u017fcanner@contoso.com"))
