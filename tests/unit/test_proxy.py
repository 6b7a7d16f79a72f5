"""relay.proxy and the smtp.proxy_* settings: whose PROXY header counts, and what it says."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from relay.config.load import parse_config
from relay.config.schema import Config
from relay.core.errors import ConfigError
from relay.smtp.proxy import ProxyHeader, ProxyHeaderError, client_endpoint, is_trusted_proxy

BALANCERS = [ipaddress.ip_network("10.0.0.0/29"), ipaddress.ip_network("2001:db8::/64")]
PEER = ("10.0.0.1", 51000)


def header(**changes: object) -> ProxyHeader:
    fields: dict[str, object] = {
        "version": 2,
        "relayed": True,
        "family": "inet",
        "stream": True,
        "source": "192.0.2.10",
        "source_port": 40000,
    }
    fields.update(changes)
    return ProxyHeader(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("10.0.0.1", True),
        ("10.0.0.7", True),
        ("10.0.0.8", False),
        ("::ffff:10.0.0.2", True),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("", False),
        ("not an address", False),
    ],
)
def test_only_the_listed_balancers_are_trusted(ip: str, trusted: bool) -> None:
    """IPv4-mapped IPv6 peers count as their IPv4 address; junk is never trusted."""
    assert is_trusted_proxy(ip, BALANCERS) is trusted


def test_a_relayed_tcp_connection_gives_the_header_source() -> None:
    """PROXY TCP4/TCP6: the client is the header's source address and port."""
    assert client_endpoint(header(), PEER) == ("192.0.2.10", 40000)
    six = header(family="inet6", source="2001:db8:1::7")
    assert client_endpoint(six, PEER) == ("2001:db8:1::7", 40000)


def test_a_mapped_ipv6_source_is_reported_as_ipv4() -> None:
    """So that client networks written as IPv4 match a dual-stack balancer's header."""
    assert client_endpoint(header(family="inet6", source="::ffff:192.0.2.9"), PEER)[0] == (
        "192.0.2.9"
    )


@pytest.mark.parametrize(
    "changes",
    [{"relayed": False}, {"family": "unspec", "source": None, "source_port": None}],
    ids=["LOCAL-or-UNKNOWN", "UNSPEC"],
)
def test_a_balancer_speaking_for_itself_is_the_peer(changes: dict[str, object]) -> None:
    """v2 LOCAL, v1 UNKNOWN and the UNSPEC family: use the real connection endpoints."""
    assert client_endpoint(header(**changes), PEER) == PEER


@pytest.mark.parametrize(
    "changes",
    [
        {"family": "unix", "source": None},
        {"stream": False},
        {"source": None},
        {"source": "not-an-ip"},
        {"source_port": None},
        {"family": "inet6"},  # an IPv4 source under the IPv6 family
        {"source": "2001:db8::1"},  # an IPv6 source under the IPv4 family
    ],
)
def test_unusable_headers_are_refused(changes: dict[str, object]) -> None:
    """Datagram, UNIX-socket or inconsistent headers close the connection."""
    with pytest.raises(ProxyHeaderError):
        client_endpoint(header(**changes), PEER)


# --- configuration ---------------------------------------------------------------------------

BASE = """\
clients: [{name: c, networks: [10.1.0.0/16], senders: ["*@contoso.com"]}]
auth_objects:
  contoso:
    tenant_id: 3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f
    client_id: 9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d
    client_secret_env: SECRET
routes: [{senders: ["*@contoso.com"], auth_object: contoso}]
"""


def parse(smtp: str, tmp_path: Path) -> Config:
    return parse_config(BASE + smtp, base_dir=tmp_path, environ={"SECRET": "s3cret-value"})


def test_proxy_protocol_with_networks_is_accepted(tmp_path: Path) -> None:
    """The PROXY protocol is available: on with the balancers' networks."""
    config = parse("smtp: {proxy_protocol: true, proxy_networks: [10.0.0.10/32]}", tmp_path)
    assert config.smtp.proxy_networks == [ipaddress.ip_network("10.0.0.10/32")]


@pytest.mark.parametrize(
    ("smtp", "words"),
    [
        ("smtp: {proxy_protocol: true}", "proxy_networks is empty"),
        ("smtp: {proxy_networks: [10.0.0.10/32]}", "no effect while proxy_protocol is false"),
        ("smtp: {proxy_protocol: true, proxy_networks: [10.0.0.10/24]}", "host bits set"),
    ],
)
def test_proxy_settings_that_cannot_work_are_config_errors(
    tmp_path: Path, smtp: str, words: str
) -> None:
    """A PROXY listener nobody may use, or balancers listed for nothing, are mistakes."""
    with pytest.raises(ConfigError) as error:
        parse(smtp, tmp_path)
    assert words in str(error.value)


def test_limit_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    """1 MiB header blocks, 50 MIME levels, 1000 commands, 5 min idle, 10 min DATA, reject."""
    smtp = parse("", tmp_path).smtp
    assert (smtp.max_header_size, smtp.max_mime_depth, smtp.max_commands) == (1048576, 50, 1000)
    assert (smtp.idle_timeout, smtp.data_timeout) == (300.0, 600.0)
    assert smtp.bare_line_endings == "reject"


def test_limits_take_sizes_and_durations(tmp_path: Path) -> None:
    """The usual size and duration syntax applies to the new keys."""
    smtp = parse(
        "smtp: {max_header_size: 64KiB, data_timeout: 2m, idle_timeout: 90s, "
        "bare_line_endings: normalize}",
        tmp_path,
    ).smtp
    assert (smtp.max_header_size, smtp.data_timeout, smtp.idle_timeout) == (65536, 120.0, 90.0)
    assert smtp.bare_line_endings == "normalize"
