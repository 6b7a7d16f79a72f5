"""SMTP AUTH without sockets: hashes, the failed-AUTH limiter (fake clock), the PLAIN and LOGIN
mechanisms against a fake aiosmtpd server, the policy table for authenticated sessions, the
configuration rules for credentials, `hash-password`, and the fail2ban filter in the docs."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
import trustme
from aiosmtpd.smtp import MISSING, AuthResult, Session
from argon2 import PasswordHasher

from relay.cli.main import main
from relay.config.load import parse_config
from relay.config.schema import ClientConfig, Config
from relay.core.errors import ConfigError, PolicyError
from relay.core.policy import identify_client
from relay.smtp.auth import (
    HASH_PARAMETERS,
    AuthenticatedUser,
    AuthLimits,
    FailedAuthLimiter,
    SmtpAuthenticator,
    authenticated_user,
    hash_password,
    hash_password_command,
    log_safe_username,
    verify_password,
    without_empty_auth,
)
from relay.smtp.state import RelaySession

REPO = Path(__file__).resolve().parents[2]
# Cheap argon2id for tests; verification reads the cost from each hash, so these verify as fast.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "Tr0ub4dor&3 sp"
ERP_HASH = hash_password(PASSWORD, FAST)
# argon2id of "fixed" with the salt "relay-test-salt!": a fixed string, so that cutting it off
# is known to leave non-canonical base64 (random ones would make the test flaky).
FIXED_HASH = (
    "$argon2id$v=19$m=8,t=1,p=1$cmVsYXktdGVzdC1zYWx0IQ$D//FtxEBTtXBpGFLAb3iraiiphvxGAbpi9RJIoKeFXs"
)

PRINTERS = ClientConfig.model_validate(
    {"name": "printers", "networks": ["10.0.5.0/24"], "senders": ["scanner@contoso.com"]}
)
ERP = ClientConfig.model_validate(
    {"name": "erp", "username": "erp", "password_hash": ERP_HASH, "senders": ["*@contoso.com"]}
)
BRANCH = ClientConfig.model_validate(
    {
        "name": "branch",
        "username": "branch",
        "password_hash": ERP_HASH,
        "networks": ["192.0.2.0/24"],
        "senders": ["*@branch.contoso.com"],
    }
)
CLIENTS = [PRINTERS, ERP, BRANCH]


# --- hashing ------------------------------------------------------------------------------


def test_hash_password_makes_argon2id_with_the_documented_parameters() -> None:
    """The default hash is argon2id v19 with RFC 9106's low-memory option: m=64 MiB, t=3, p=4."""
    assert (HASH_PARAMETERS.memory_cost, HASH_PARAMETERS.time_cost) == (65536, 3)
    hashed = hash_password(PASSWORD)
    assert hashed.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert verify_password(hashed, PASSWORD)


@pytest.mark.parametrize(
    ("stored", "password", "expected"),
    [
        (ERP_HASH, PASSWORD, True),
        (ERP_HASH, PASSWORD.encode(), True),
        (ERP_HASH, "wrong", False),
        (ERP_HASH, b"", False),
        (ERP_HASH[:-4], PASSWORD, False),
        ("not a hash at all", PASSWORD, False),
    ],
)
def test_verify_password_is_true_only_for_the_right_password(
    stored: str, password: str | bytes, expected: bool
) -> None:
    """A mismatch or an unusable hash is False, never an exception."""
    assert verify_password(stored, password) is expected


def test_unicode_passwords_verify_from_the_bytes_a_client_sends() -> None:
    """SMTP carries the password as UTF-8 bytes; a hash of the text form must match them."""
    hashed = hash_password("pässwörd-€", FAST)
    assert verify_password(hashed, "pässwörd-€".encode())


# --- the failed-AUTH limiter --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_are_counted_within_the_window_and_then_forgotten() -> None:
    """Five failures in ten minutes block the address; each leaves the window after 10 min."""
    clock = FakeClock()
    limiter = FailedAuthLimiter(clock=clock)
    for expected in range(1, 6):  # at 1000, 1060, ... 1240
        assert not limiter.blocked("192.0.2.7")
        assert limiter.record_failure("192.0.2.7") == expected
        clock.now += 60
    assert limiter.blocked("192.0.2.7")
    assert not limiter.blocked("192.0.2.8")
    clock.now = 1600.0  # the failure at 1000 is 600 s old
    assert limiter.failures("192.0.2.7") == 4
    assert not limiter.blocked("192.0.2.7")
    clock.now = 1840.0  # and the one at 1240 too
    assert limiter.failures("192.0.2.7") == 0
    assert len(limiter) == 0


def test_attempts_while_blocked_count_so_fast_guessing_stays_blocked() -> None:
    """Refused attempts are failures too: more than max_failures per window is never let in;
    the address is free again once it slows below that rate."""
    clock = FakeClock()
    limiter = FailedAuthLimiter(AuthLimits(max_failures=2, window=100), clock=clock)
    limiter.record_failure("192.0.2.7")
    limiter.record_failure("192.0.2.7")
    for _ in range(10):
        clock.now += 40
        assert limiter.blocked("192.0.2.7")
        limiter.record_failure("192.0.2.7")
    clock.now += 60
    assert not limiter.blocked("192.0.2.7")


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (9, 16.0)]
)
def test_the_delay_before_535_doubles_up_to_a_cap(failures: int, delay: float) -> None:
    assert FailedAuthLimiter().delay(failures) == delay


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),  # one /64: one host can own it
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("::ffff:192.0.2.7", "192.0.2.7", True),
        ("192.0.2.7", "192.0.2.8", False),
    ],
)
def test_ipv6_clients_are_counted_per_64(first: str, second: str, shared: bool) -> None:
    limiter = FailedAuthLimiter(clock=FakeClock())
    limiter.record_failure(first)
    assert limiter.failures(second) == (1 if shared else 0)


def test_memory_is_bounded_by_forgetting_the_least_recent_address() -> None:
    limiter = FailedAuthLimiter(AuthLimits(max_tracked=3), clock=FakeClock())
    for last_octet in range(1, 6):
        limiter.record_failure(f"192.0.2.{last_octet}")
    assert len(limiter) == 3
    assert limiter.failures("192.0.2.1") == 0
    assert limiter.failures("192.0.2.5") == 1


# --- the mechanisms, against a fake aiosmtpd server ---------------------------------------


class FakeTransport(asyncio.BaseTransport):
    def __init__(self, *, tls: bool) -> None:
        super().__init__()
        self.tls = tls
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return object() if name == "ssl_object" and self.tls else default

    def close(self) -> None:
        self.closed = True


class FakeServer:
    """The part of aiosmtpd's SMTP the mechanisms use; the client's answers are scripted."""

    def __init__(self, *answers: object, tls: bool = True, ip: str = "198.51.100.4") -> None:
        self.transport = FakeTransport(tls=tls)
        self.session: Session | None = RelaySession(asyncio.get_running_loop())
        self.session.peer = (ip, 40000)  # type: ignore[assignment] # aiosmtpd types it as str
        self.pushed: list[str] = []
        self.challenges: list[str] = []
        self._answers = list(answers)

    async def push(self, status: str) -> None:
        self.pushed.append(status)

    async def challenge_auth(self, challenge: str) -> object:
        self.challenges.append(challenge)
        return self._answers.pop(0)


class CountingHasher(PasswordHasher):
    """FAST, remembering which stored hashes were verified."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified.append(str(hash))
        return super().verify(hash, password)


class Delays:
    def __init__(self) -> None:
        self.seen: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}".encode())


INVALID = "535 5.7.8 Authentication credentials invalid"


def authenticator(
    *, hasher: PasswordHasher = FAST, limits: AuthLimits | None = None
) -> tuple[SmtpAuthenticator, Delays]:
    delays = Delays()
    auth = SmtpAuthenticator(
        clients=lambda: CLIENTS,
        limiter=FailedAuthLimiter(limits, clock=FakeClock()),
        hasher=hasher,
        sleep=delays,
    )
    return auth, delays


def refused(result: AuthResult) -> bool:
    return not result.success and not result.handled and result.message == INVALID


async def test_plain_with_an_initial_response_authenticates_the_client() -> None:
    """Success names the user and its client; aiosmtpd answers 235 and stores `auth_data`."""
    auth, delays = authenticator()
    server = FakeServer()
    result = await auth.plain(server, ["PLAIN", plain("erp", PASSWORD)])
    assert result.success
    assert result.auth_data == AuthenticatedUser(username="erp", client="erp")
    assert server.pushed == []
    assert delays.seen == []


async def test_plain_without_an_initial_response_asks_with_an_empty_challenge() -> None:
    auth, _ = authenticator()
    server = FakeServer(f"\0erp\0{PASSWORD}".encode())
    result = await auth.plain(server, ["PLAIN"])
    assert result.success
    assert server.challenges == [""]


async def test_login_asks_for_username_then_password() -> None:
    auth, _ = authenticator()
    server = FakeServer(b"erp", PASSWORD.encode())
    result = await auth.login(server, ["LOGIN"])
    assert result.success
    assert server.challenges == ["Username:", "Password:"]


async def test_login_takes_the_username_as_initial_response() -> None:
    auth, _ = authenticator()
    server = FakeServer(PASSWORD.encode())
    result = await auth.login(server, ["LOGIN", b64(b"erp")])
    assert result.success
    assert server.challenges == ["Password:"]


async def test_wrong_password_is_535_after_a_delay_and_counted() -> None:
    auth, delays = authenticator()
    result = await auth.plain(FakeServer(), ["PLAIN", plain("erp", "guess")])
    assert refused(result)
    assert delays.seen == [1.0]
    assert auth.limiter.failures("198.51.100.4") == 1


async def test_unknown_user_takes_the_same_path_against_a_dummy_hash() -> None:
    """Same reply, same delay, and one argon2 verification like a known user's, so neither
    the answer nor its timing tells which usernames exist."""
    hasher = CountingHasher()
    auth, delays = authenticator(hasher=hasher)
    known = await auth.plain(FakeServer(), ["PLAIN", plain("erp", "guess")])
    unknown = await auth.plain(FakeServer(), ["PLAIN", plain("nobody", "guess")])
    assert refused(known)
    assert refused(unknown)
    assert delays.seen == [1.0, 2.0]
    [for_known, for_unknown] = hasher.verified
    assert for_known == ERP_HASH
    assert for_unknown.startswith("$argon2id$")
    assert for_unknown != ERP_HASH


async def test_a_right_password_from_outside_the_clients_networks_is_refused() -> None:
    """A client with networks and credentials needs both; AUTH does not confirm the password
    to someone connecting from elsewhere."""
    auth, _ = authenticator()
    outside = await auth.plain(FakeServer(ip="198.51.100.4"), ["PLAIN", plain("branch", PASSWORD)])
    inside = await auth.plain(FakeServer(ip="192.0.2.10"), ["PLAIN", plain("branch", PASSWORD)])
    assert refused(outside)
    assert inside.success


async def test_authorization_identity_of_another_user_is_refused() -> None:
    """RFC 4616 authzid: acting as someone else is not granted, even with a right password."""
    auth, _ = authenticator()
    other = await auth.plain(FakeServer(), ["PLAIN", plain("erp", PASSWORD, authzid="branch")])
    same = await auth.plain(FakeServer(), ["PLAIN", plain("erp", PASSWORD, authzid="erp")])
    assert refused(other)
    assert same.success


@pytest.mark.parametrize("mechanism", ["plain", "login"])
async def test_without_tls_the_mechanisms_refuse_with_538(mechanism: str) -> None:
    """Even if aiosmtpd's own check were bypassed, no password is read in the clear."""
    auth, delays = authenticator()
    server = FakeServer(tls=False)
    result = await getattr(auth, mechanism)(server, [mechanism.upper()])
    assert (result.success, result.handled) == (False, True)
    assert server.pushed == [
        "538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    assert server.challenges == []
    assert delays.seen == []


async def test_a_blocked_address_gets_421_and_is_disconnected_before_any_check() -> None:
    hasher = CountingHasher()
    auth, delays = authenticator(hasher=hasher, limits=AuthLimits(max_failures=2))
    for _ in range(2):
        assert refused(await auth.plain(FakeServer(), ["PLAIN", plain("erp", "guess")]))
    server = FakeServer(PASSWORD.encode())
    result = await auth.login(server, ["LOGIN", b64(b"erp")])
    assert (result.success, result.handled) == (False, True)
    assert server.pushed == ["421 4.7.0 Too many failed authentications"]
    assert server.transport.closed
    assert server.challenges == []  # the password is not even asked for
    assert len(hasher.verified) == 2
    assert delays.seen == [1.0, 2.0]
    assert auth.limiter.failures("198.51.100.4") == 2  # the window holds the last two


@pytest.mark.parametrize(
    ("mechanism", "args", "answers", "reply"),
    [
        ("plain", ["PLAIN", "not base64!"], [], "501 5.5.2 Can't decode base64"),
        ("plain", ["PLAIN", b64(b"erp\0only-two-parts")], [], "501 5.5.2 Can't split auth value"),
        ("plain", ["PLAIN", "="], [], "501 5.5.2 Can't split auth value"),
        ("login", ["LOGIN", "%%%"], [], "501 5.5.2 Can't decode base64"),
        ("plain", ["PLAIN"], [MISSING], None),  # client sent "*": aiosmtpd answered 501
        ("login", ["LOGIN"], [b"erp", MISSING], None),
    ],
)
async def test_malformed_or_cancelled_exchanges_are_not_counted_as_guesses(
    mechanism: str, args: list[str], answers: list[object], reply: str | None
) -> None:
    auth, delays = authenticator()
    server = FakeServer(*answers)
    result = await getattr(auth, mechanism)(server, args)
    assert (result.success, result.handled) == (False, True)
    assert server.pushed == ([reply] if reply else [])
    assert auth.limiter.failures("198.51.100.4") == 0
    assert delays.seen == []


async def test_a_reload_applies_to_the_next_auth() -> None:
    """Clients are read through a callable: a changed password takes effect at once."""
    clients = [ERP]
    auth = SmtpAuthenticator(clients=lambda: clients, hasher=FAST, sleep=Delays())
    assert (await auth.plain(FakeServer(), ["PLAIN", plain("erp", PASSWORD)])).success
    clients = [
        ClientConfig.model_validate(
            {
                "name": "erp",
                "username": "erp",
                "password_hash": hash_password("new one", FAST),
                "senders": ["*@contoso.com"],
            }
        )
    ]
    assert refused(await auth.plain(FakeServer(), ["PLAIN", plain("erp", PASSWORD)]))
    assert (await auth.plain(FakeServer(), ["PLAIN", plain("erp", "new one")])).success


# --- logs ---------------------------------------------------------------------------------


async def test_each_failure_logs_one_line_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    auth, _ = authenticator()
    await auth.plain(FakeServer(), ["PLAIN", plain("erp", PASSWORD + "x")])
    await auth.login(FakeServer(b"ghost", PASSWORD.encode()), ["LOGIN"])
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.auth"]
    assert lines == [
        "AUTH failed for user=erp from ip=198.51.100.4 (wrong password)",
        "AUTH failed for user=ghost from ip=198.51.100.4 (unknown user)",
    ]
    everything = caplog.text + "".join(str(vars(r)) for r in caplog.records)
    assert PASSWORD not in everything
    assert plain("erp", PASSWORD + "x") not in everything


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("erp", "erp"),
        ("scanner-3@contoso.com", "scanner-3@contoso.com"),
        ("evil from ip=10.9.9.9", "evil?from?ip?10.9.9.9"),
        ("a\nAUTH failed for user=x from ip=10.9.9.9", "a?AUTH?failed?for?user?x?from?ip?10.9.9.9"),
        (b"\xff\xfe", "??"),
        ("", "-"),
        ("x" * 100, "x" * 64),
    ],
)
def test_usernames_are_logged_without_spaces_or_control_characters(
    raw: str | bytes, logged: str
) -> None:
    assert log_safe_username(raw) == logged


def fail2ban_failregex() -> re.Pattern[str]:
    """docs/fail2ban.md's failregex, with fail2ban's <HOST> as a named group."""
    doc = (REPO / "docs" / "fail2ban.md").read_text()
    match = re.search(r"^failregex\s*=\s*(.+)$", doc, re.MULTILINE)
    assert match is not None, "docs/fail2ban.md has no failregex line"
    return re.compile(match.group(1).strip().replace("<HOST>", r"(?P<host>[0-9A-Fa-f:.]+)"))


async def test_the_documented_fail2ban_filter_matches_our_line_and_the_real_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The filter bans the address that failed, and a username cannot name another one."""
    caplog.set_level(logging.INFO)
    auth, _ = authenticator()
    forged = "x from ip=10.9.9.9"
    await auth.plain(FakeServer(ip="203.0.113.9"), ["PLAIN", plain(forged, "guess")])
    await auth.plain(FakeServer(ip="2001:db8::7"), ["PLAIN", plain("erp", "guess")])
    await auth.plain(FakeServer(ip="198.51.100.4"), ["PLAIN", plain("erp", PASSWORD)])
    failregex = fail2ban_failregex()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    hosts = [
        m.group("host")
        for r in caplog.records
        if (m := failregex.search(formatter.format(r))) is not None
    ]
    assert hosts == ["203.0.113.9", "2001:db8::7"]


# --- aiosmtpd glue ------------------------------------------------------------------------


def test_ehlo_drops_an_auth_line_with_no_mechanism() -> None:
    lines = ["250-relay.test", "250-SIZE 100", "250-AUTH ", "250 HELP"]
    assert without_empty_auth(lines) == ["250-relay.test", "250-SIZE 100", "250 HELP"]
    kept = ["250-relay.test", "250-AUTH LOGIN PLAIN", "250 HELP"]
    assert without_empty_auth(kept) == kept


async def test_the_session_names_its_user_only_after_a_successful_auth() -> None:
    session = RelaySession(asyncio.get_running_loop())
    assert authenticated_user(session) is None
    session.auth_data = AuthenticatedUser("erp", "erp")  # type: ignore[assignment]
    assert authenticated_user(session) is None
    session.authenticated = True
    assert authenticated_user(session) == "erp"


async def test_the_session_stores_login_data_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiosmtpd sets the deprecated login_data on every login; that must not log a WARNING."""
    session = RelaySession(asyncio.get_running_loop())
    session.login_data = b"erp"
    assert session.login_data == b"erp"
    assert caplog.records == []


# --- policy: who an authenticated session is ----------------------------------------------


@pytest.mark.parametrize(
    ("ip", "user", "expected"),
    [
        ("10.0.5.7", None, "printers"),
        ("10.0.5.7", "erp", "erp"),  # AUTH names the client, whatever network matches first
        ("198.51.100.4", "erp", "erp"),  # no networks: from anywhere
        ("192.0.2.10", "branch", "branch"),
        ("::ffff:192.0.2.10", "branch", "branch"),
    ],
)
def test_an_authenticated_session_is_the_client_with_that_username(
    ip: str, user: str | None, expected: str
) -> None:
    assert identify_client(CLIENTS, ip, user).name == expected


@pytest.mark.parametrize(
    ("ip", "user", "words"),
    [
        ("192.0.2.10", None, "192.0.2.10 is not an allowed client"),  # branch must log in
        ("198.51.100.4", None, "is not an allowed client"),  # erp must log in
        ("198.51.100.4", "branch", "user branch may not send from 198.51.100.4"),
        ("10.0.5.7", "ghost", "user ghost is not an allowed client"),
    ],
)
def test_credentials_are_never_skipped_and_networks_still_bind(
    ip: str, user: str | None, words: str
) -> None:
    """Unauthenticated sessions only match clients without credentials; a client with both
    needs both. Every refusal is 550 5.7.1."""
    with pytest.raises(PolicyError) as caught:
        identify_client(CLIENTS, ip, user)
    reply = caught.value.reply
    assert (reply.code, reply.status) == (550, "5.7.1")
    assert words in reply.text


# --- configuration ------------------------------------------------------------------------

BASE = """
smtp:
  hostname: relay.test
  listeners:
    - {{address: 127.0.0.1, port: 2525, tls: starttls, auth: {auth}}}
  tls: {{cert_file: {cert}, key_file: {key}}}
clients:
{clients}
auth_objects:
  contoso:
    tenant_id: 11111111-2222-3333-4444-555555555555
    client_id: 66666666-7777-8888-9999-000000000000
    client_secret_env: RELAY_SECRET
routes:
  - senders: ["*@contoso.com"]
    auth_object: contoso
"""
ERP_YAML = f"""\
- name: erp
  username: erp
  password_hash: "{ERP_HASH}"
  senders: ["*@contoso.com"]
"""


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cert = trustme.CA().issue_cert("relay.test")
    folder = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    return folder / "cert.pem", folder / "key.pem"


def config_text(
    tls_files: tuple[Path, Path], clients: str = ERP_YAML, auth: str = "optional"
) -> str:
    return BASE.format(
        auth=auth, cert=tls_files[0], key=tls_files[1], clients=textwrap.indent(clients, "  ")
    )


def load(text: str) -> Config:
    return parse_config(text, environ={"RELAY_SECRET": "s3cret-value"})


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return str(caught.value)


def test_a_client_may_be_known_by_credentials_alone(tls_files: tuple[Path, Path]) -> None:
    config = load(config_text(tls_files))
    [erp] = config.clients
    assert (erp.username, erp.networks, erp.has_credentials) == ("erp", [], True)
    assert ERP_HASH not in repr(config)


def test_a_client_may_need_both_networks_and_credentials(tls_files: tuple[Path, Path]) -> None:
    clients = ERP_YAML + "  networks: [192.0.2.0/24]\n"
    [erp] = load(config_text(tls_files, clients)).clients
    assert [str(n) for n in erp.networks] == ["192.0.2.0/24"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("hunter2-is-my-password", "run `smtp-graph-relay hash-password`"),
        (ERP_HASH.replace("$argon2id$", "$argon2i$"), "the relay needs argon2id"),
        (FIXED_HASH[:-1], "damaged or truncated"),
        (FIXED_HASH[:-2], "damaged or truncated"),
        (FIXED_HASH.replace("D//F", "D/-F"), "damaged or truncated"),
        ("$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA", "damaged or truncated"),
    ],
)
def test_a_password_hash_must_be_a_whole_argon2id_string_and_is_never_echoed(
    tls_files: tuple[Path, Path], value: str, words: str
) -> None:
    """A plaintext password pasted into password_hash is an error that says what to run and
    does not repeat what was pasted."""
    message = problems(config_text(tls_files, ERP_YAML.replace(ERP_HASH, value)))
    assert "clients[0].password_hash:" in message
    assert words in message
    assert value not in message


@pytest.mark.parametrize(
    ("clients", "path", "words"),
    [
        (
            '- {name: erp, username: erp, senders: ["*@contoso.com"]}\n',
            "clients[0]",
            "username needs a password_hash",
        ),
        (
            f'- {{name: erp, password_hash: "{ERP_HASH}", networks: [10.0.0.0/8], '
            'senders: ["*@contoso.com"]}\n',
            "clients[0]",
            "password_hash needs the username",
        ),
        (
            ERP_YAML.replace("username: erp", 'username: "erp user"'),
            "clients[0].username",
            "without spaces",
        ),
    ],
)
def test_credentials_come_as_a_pair_of_sane_values(
    tls_files: tuple[Path, Path], clients: str, path: str, words: str
) -> None:
    message = problems(config_text(tls_files, clients))
    assert f"{path}:" in message
    assert words in message


@pytest.mark.parametrize("auth", ["optional", "required"])
def test_a_listener_offering_auth_needs_tls(tls_files: tuple[Path, Path], auth: str) -> None:
    """PLAIN and LOGIN send the password itself: no AUTH on a listener without TLS."""
    text = config_text(tls_files, auth=auth).replace("tls: starttls", "tls: none")
    message = problems(text)
    assert "smtp.listeners[0]:" in message
    assert f"auth: {auth} on 127.0.0.1:2525 needs TLS" in message


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_auth_on_a_tls_listener_is_accepted(tls_files: tuple[Path, Path], tls: str) -> None:
    text = config_text(tls_files, auth="required").replace("tls: starttls", f"tls: {tls}")
    assert load(text).smtp.listeners[0].auth == "required"


def test_usernames_are_unique(tls_files: tuple[Path, Path]) -> None:
    clients = ERP_YAML + ERP_YAML.replace("- name: erp", "- name: erp2")
    message = problems(config_text(tls_files, clients))
    assert "clients[1].username:" in message
    assert "'erp' is used twice" in message


def test_a_client_with_credentials_needs_a_listener_that_offers_auth(
    tls_files: tuple[Path, Path],
) -> None:
    message = problems(config_text(tls_files, auth="none"))
    assert "clients[0].username:" in message
    assert "no listener offers AUTH" in message


def test_auth_required_needs_a_client_with_credentials(tls_files: tuple[Path, Path]) -> None:
    clients = '- {name: printers, networks: [10.0.5.0/24], senders: ["scanner@contoso.com"]}\n'
    message = problems(config_text(tls_files, clients, auth="required"))
    assert "smtp.listeners[0].auth:" in message
    assert "no client has a username" in message


# --- hash-password --------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def prompts(*answers: str) -> tuple[list[str], Callable[[str], str]]:
    asked: list[str] = []
    replies = list(answers)

    def prompt(text: str) -> str:
        asked.append(text)
        return replies.pop(0)

    return asked, prompt


def test_hash_password_asks_twice_on_a_terminal_and_prints_only_the_hash() -> None:
    out, err = io.StringIO(), io.StringIO()
    asked, prompt = prompts(PASSWORD, PASSWORD)
    code = hash_password_command(
        use_stdin=False, out=out, err=err, stdin=Terminal(), prompt=prompt, hasher=FAST
    )
    assert code == 0
    assert asked == ["Password: ", "Repeat password: "]
    [line] = out.getvalue().splitlines()
    assert verify_password(line, PASSWORD)
    assert PASSWORD not in out.getvalue() + err.getvalue()


@pytest.mark.parametrize(("first", "second"), [(PASSWORD, PASSWORD + "!"), ("", "")])
def test_hash_password_refuses_a_mismatch_or_an_empty_password(first: str, second: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    _, prompt = prompts(first, second)
    code = hash_password_command(
        use_stdin=False, out=out, err=err, stdin=Terminal(), prompt=prompt, hasher=FAST
    )
    assert code == 1
    assert out.getvalue() == ""
    assert err.getvalue()


@pytest.mark.parametrize(
    ("text", "code"),
    [(PASSWORD + "\n", 0), (PASSWORD, 0), (PASSWORD + "\r\n", 0), ("a\nb\n", 1), ("\n", 1)],
)
def test_hash_password_reads_one_line_from_a_pipe(text: str, code: int) -> None:
    """Not a terminal (or --stdin): the one line on stdin, without its line ending."""
    out, err = io.StringIO(), io.StringIO()
    result = hash_password_command(
        use_stdin=False, out=out, err=err, stdin=io.StringIO(text), hasher=FAST
    )
    assert result == code
    if code == 0:
        assert verify_password(out.getvalue().strip(), PASSWORD)
    else:
        assert out.getvalue() == ""


def test_the_cli_subcommand_needs_no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret pass\n"))
    out = io.StringIO()
    assert main(["hash-password", "--stdin"], out=out) == 0
    [line] = out.getvalue().splitlines()
    assert line.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert verify_password(line, "s3cret pass")
