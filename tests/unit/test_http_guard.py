"""HostPolicy: which Host header values name the admin server (the defence against DNS
rebinding), for a loopback bind, a specific address and a wildcard bind."""

from __future__ import annotations

import pytest

from relay.ops.http_guard import HostPolicy


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:9025", "LOCALHOST.", "127.0.0.1", "127.0.0.1:9025", "[::1]:9025"],
)
def test_loopback_names_are_always_this_server(host: str) -> None:
    """localhost and the loopback literals, with or without a port, in any case."""
    assert HostPolicy("192.0.2.10").allows(host)


def test_the_bind_address_is_this_server() -> None:
    """A server bound to one address answers for that address, and for IPv6 in brackets."""
    assert HostPolicy("192.0.2.10").allows("192.0.2.10:9025")
    assert HostPolicy("2001:db8::5").allows("[2001:DB8::5]:9025")


def test_configured_hostnames_are_this_server() -> None:
    """admin.hostnames, compared without case and without a trailing dot."""
    policy = HostPolicy("127.0.0.1", ["relay-admin.corp.example"])
    assert policy.allows("Relay-Admin.corp.example.:9025")
    assert not policy.allows("corp.example")


@pytest.mark.parametrize(
    "host", ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "", "[::1"]
)
def test_other_names_are_not_this_server(host: str) -> None:
    """A DNS name that is not configured, and anything that is not a host, are refused."""
    assert not HostPolicy("127.0.0.1", ["relay-admin.corp.example"]).allows(host)


def test_a_specific_bind_does_not_answer_for_other_ip_literals() -> None:
    """Bound to 192.0.2.10, the server is not 198.51.100.7."""
    assert not HostPolicy("192.0.2.10").allows("198.51.100.7")


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "[::]"])
def test_a_wildcard_bind_answers_for_any_ip_literal_but_no_foreign_name(bind: str) -> None:
    """Containers: probes and scrapers address the pod by IP. Rebinding needs a name, so IP
    literals stay safe to accept; names still have to be configured."""
    policy = HostPolicy(bind)
    assert policy.allows("10.244.1.17:9025")
    assert policy.allows("[fd00::17]:9025")
    assert not policy.allows("evil.example:9025")
