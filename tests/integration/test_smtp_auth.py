"""SMTP AUTH end to end: smtplib (and swaks) over real STARTTLS and implicit TLS to a real relay
delivering to the sandbox. Replies are checked verbatim; the delay before each 535 is recorded
instead of slept."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import smtplib
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from argon2 import PasswordHasher

from relay.config.schema import ClientConfig, Config
from relay.core.policy import identify_client
from relay.core.values import Accepted, Submission
from relay.ops.logs import setup_logging
from relay.sandbox import Sandbox
from relay.service import RelayService
from relay.smtp.auth import hash_password, verify_password
from relay.smtp.connections import ConnectionLimiter
from relay.smtp.handler import RelayHandler
from relay.smtp.session import RelaySMTP, server_tls_context
from tests.conftest import MAILBOX, TlsFiles, build_config, message, relay_config_text
from tests.e2e.test_real_clients import run, swaks

T = TypeVar("T")

PASSWORD = "Correct-Horse-Battery-7"
WRONG = "correct-horse-battery-8"
# Cheap parameters keep the suite fast; the relay reads the cost from each stored hash.
HASH = hash_password(PASSWORD, PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))

LISTENERS = (
    "[{address: 127.0.0.1, port: 0, tls: starttls, auth: optional},"
    " {address: 127.0.0.1, port: 0, tls: starttls, auth: required},"
    " {address: 127.0.0.1, port: 0, tls: implicit, auth: required},"
    " {address: 127.0.0.1, port: 0, tls: starttls, auth: none}]"
)
OPTIONAL, REQUIRED, IMPLICIT, NO_AUTH = range(4)
CLIENTS = textwrap.dedent(
    f"""\
    - name: printers
      networks: [10.0.5.0/24]
      senders: ["scanner@contoso.com"]
    - name: monitor
      networks: [127.0.0.9/32]
      senders: ["monitor@contoso.com"]
    - name: erp
      username: erp
      password_hash: "{HASH}"
      senders: ["*@contoso.com"]
    - name: branch
      username: branch
      password_hash: "{HASH}"
      networks: [192.0.2.0/24]
      senders: ["*@contoso.com"]
    """
)
INVALID = (535, "5.7.8 Authentication credentials invalid")


@dataclass
class AuthRelay:
    service: RelayService
    tls: ssl.SSLContext
    delays: list[float] = field(default_factory=list)

    def port(self, listener: int) -> int:
        return self.service.listeners[listener].port


@pytest.fixture
async def auth_relay(
    sandbox: Sandbox, tmp_path: Path, relay_tls: TlsFiles
) -> AsyncIterator[AuthRelay]:
    """A relay with four listeners (see LISTENERS) whose 535 delays are recorded, not slept."""
    text = relay_config_text(
        sandbox,
        listeners=LISTENERS,
        smtp_extra=f"tls: {{cert_file: {relay_tls.cert_file}, key_file: {relay_tls.key_file}}}",
        clients=CLIENTS,
    )
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    service = RelayService(build_config(text, tmp_path), auth_sleep=record)
    await service.start()
    try:
        yield AuthRelay(service, relay_tls.client_context(), delays)
    finally:
        await service.stop()


def connect(
    relay: AuthRelay, listener: int, *, starttls: bool = True, source: str = "127.0.0.1"
) -> smtplib.SMTP:
    """An smtplib client after EHLO (and STARTTLS + EHLO again, unless told not to)."""
    client: smtplib.SMTP
    where = ("127.0.0.1", relay.port(listener))
    if listener == IMPLICIT:
        client = smtplib.SMTP_SSL(*where, context=relay.tls, timeout=30, source_address=(source, 0))
    else:
        client = smtplib.SMTP(*where, timeout=30, source_address=(source, 0))
    client.ehlo("device.test")
    if starttls and listener != IMPLICIT:
        client.starttls(context=relay.tls)
        client.ehlo("device.test")
    return client


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, str]:
    payload = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, text = client.docmd("AUTH", f"PLAIN {payload}")
    return code, text.decode()


async def off_loop(scenario: Callable[[], T]) -> T:
    """smtplib blocks; the relay and the sandbox run on this test's loop."""
    return await asyncio.to_thread(scenario)


async def test_good_credentials_deliver_through_graph(
    auth_relay: AuthRelay, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """After STARTTLS the relay offers PLAIN and LOGIN; a right password is 235 and the mail
    goes out; the Received header says ESMTPSA (RFC 3848)."""
    caplog.set_level(logging.INFO)

    def scenario() -> tuple[str, tuple[int, bytes], dict[str, tuple[int, bytes]]]:
        with connect(auth_relay, OPTIONAL) as client:
            offered = client.esmtp_features["auth"].strip()
            login = client.login("erp", PASSWORD)
            refused = client.sendmail(MAILBOX, ["bob@partner.example"], message(subject="ERP"))
            return offered, login, refused

    offered, login, refused = await off_loop(scenario)
    assert offered == "LOGIN PLAIN"
    assert login == (235, b"2.7.0 Authentication successful")
    assert refused == {}
    [mail] = await sandbox.wait_for_mail(1)
    assert mail.mime is not None
    assert b"with ESMTPSA id" in mail.mime
    assert "AUTH ok for user=erp (client erp) from ip=127.0.0.1" in caplog.text
    assert "deprecated" not in caplog.text  # aiosmtpd's login_data warning stays quiet


@pytest.mark.parametrize("initial_response", [True, False])
async def test_login_mechanism_authenticates(
    auth_relay: AuthRelay, sandbox: Sandbox, initial_response: bool
) -> None:
    def scenario() -> tuple[int, bytes]:
        with connect(auth_relay, REQUIRED) as client:
            client.user, client.password = "erp", PASSWORD
            login = client.auth("LOGIN", client.auth_login, initial_response_ok=initial_response)
            client.sendmail(MAILBOX, ["bob@partner.example"], message())
            return login

    assert await off_loop(scenario) == (235, b"2.7.0 Authentication successful")
    assert len(await sandbox.wait_for_mail(1)) == 1


async def test_implicit_tls_listener_offers_and_accepts_auth(
    auth_relay: AuthRelay, sandbox: Sandbox
) -> None:
    """aiosmtpd 1.4 alone refuses AUTH on implicit TLS (538, aio-libs/aiosmtpd#281)."""

    def scenario() -> tuple[str, tuple[int, bytes]]:
        with connect(auth_relay, IMPLICIT) as client:
            offered = client.esmtp_features["auth"].strip()
            login = client.login("erp", PASSWORD)
            client.sendmail(MAILBOX, ["bob@partner.example"], message())
            return offered, login

    offered, login = await off_loop(scenario)
    assert offered == "LOGIN PLAIN"
    assert login[0] == 235
    assert len(await sandbox.wait_for_mail(1)) == 1


async def test_wrong_password_is_535_after_a_delay(auth_relay: AuthRelay) -> None:
    def scenario() -> tuple[int, str]:
        with connect(auth_relay, OPTIONAL) as client:
            return auth_plain(client, "erp", WRONG)

    assert await off_loop(scenario) == INVALID
    assert auth_relay.delays == [1.0]


async def test_unknown_user_gets_the_same_reply_and_delay(
    auth_relay: AuthRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """Known and unknown users cannot be told apart by the reply or the delay."""
    caplog.set_level(logging.INFO)

    def scenario() -> list[tuple[int, str]]:
        with connect(auth_relay, OPTIONAL) as client:
            return [auth_plain(client, "erp", WRONG), auth_plain(client, "nobody", WRONG)]

    assert await off_loop(scenario) == [INVALID, INVALID]
    assert auth_relay.delays == [1.0, 2.0]
    assert "AUTH failed for user=erp from ip=127.0.0.1 (wrong password)" in caplog.text
    assert "AUTH failed for user=nobody from ip=127.0.0.1 (unknown user)" in caplog.text


async def test_auth_before_starttls_is_538_and_not_offered(auth_relay: AuthRelay) -> None:
    def scenario() -> tuple[bool, tuple[int, str]]:
        with connect(auth_relay, OPTIONAL, starttls=False) as client:
            return client.has_extn("auth"), auth_plain(client, "erp", PASSWORD)

    offered, reply = await off_loop(scenario)
    assert not offered
    assert reply == (538, "5.7.11 Encryption required for requested authentication mechanism")
    assert auth_relay.delays == []


@pytest.mark.parametrize("starttls", [True, False])
async def test_required_listener_refuses_mail_before_auth(
    auth_relay: AuthRelay, sandbox: Sandbox, starttls: bool
) -> None:
    def scenario() -> tuple[int, bytes]:
        with connect(auth_relay, REQUIRED, starttls=starttls) as client:
            return client.mail(MAILBOX)

    assert await off_loop(scenario) == (530, b"5.7.0 Authentication required")
    assert sandbox.graph_requests == 0


async def test_optional_listener_without_auth_is_identified_by_network_only(
    auth_relay: AuthRelay, sandbox: Sandbox
) -> None:
    """127.0.0.1 is in no network-only client: without AUTH it is not a client at all."""

    def scenario() -> tuple[int, bytes]:
        with connect(auth_relay, OPTIONAL) as client:
            return client.mail(MAILBOX)

    code, text = await off_loop(scenario)
    assert (code, text) == (550, b"5.7.1 Relay access denied: 127.0.0.1 is not an allowed client")


async def test_an_authenticated_client_is_still_held_to_its_senders(auth_relay: AuthRelay) -> None:
    def scenario() -> tuple[int, bytes]:
        with connect(auth_relay, OPTIONAL) as client:
            client.login("erp", PASSWORD)
            return client.mail("ceo@fabrikam.example")

    code, text = await off_loop(scenario)
    assert (code, text[:5]) == (550, b"5.7.1")


async def test_credentials_and_networks_must_both_match(
    auth_relay: AuthRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """`branch` may only log in from 192.0.2.0/24: from 127.0.0.1 even its password is 535."""
    caplog.set_level(logging.INFO)

    def scenario() -> tuple[int, str]:
        with connect(auth_relay, OPTIONAL) as client:
            return auth_plain(client, "branch", PASSWORD)

    assert await off_loop(scenario) == INVALID
    assert "user=branch from ip=127.0.0.1 (not from the client's networks)" in caplog.text


async def test_no_auth_listener_offers_no_auth_even_after_starttls(auth_relay: AuthRelay) -> None:
    """A network client (127.0.0.9) on an `auth: none` listener sees no AUTH line, before or
    after STARTTLS, and AUTH is an unknown mechanism there."""

    def scenario() -> tuple[bool, bytes, tuple[int, str]]:
        with connect(auth_relay, NO_AUTH, source="127.0.0.9") as client:
            _, ehlo = client.ehlo("device.test")
            return client.has_extn("auth"), ehlo, auth_plain(client, "erp", PASSWORD)

    offered, ehlo, reply = await off_loop(scenario)
    assert not offered
    assert b"AUTH" not in ehlo
    assert reply == (504, "5.5.4 Unrecognized authentication type")


async def test_brute_force_is_slowed_then_refused_and_disconnected(
    auth_relay: AuthRelay,
) -> None:
    """Five failures get 535 after 1, 2, 4, 8, 16 s; the sixth attempt gets 421 and the
    connection is closed; a new connection from the same address is refused the same way."""

    def scenario() -> tuple[list[tuple[int, str]], bool, tuple[int, str]]:
        with connect(auth_relay, OPTIONAL) as client:
            replies = [auth_plain(client, "erp", f"guess-{n}") for n in range(6)]
            try:
                client.noop()
            except smtplib.SMTPServerDisconnected:
                closed = True
            else:
                closed = False
        with connect(auth_relay, REQUIRED) as again:
            # The right password is not even checked while the address is locked out.
            later = auth_plain(again, "erp", PASSWORD)
        return replies, closed, later

    replies, closed, later = await off_loop(scenario)
    assert replies == [INVALID] * 5 + [(421, "4.7.0 Too many failed authentications")]
    assert closed
    assert later == (421, "4.7.0 Too many failed authentications")
    assert auth_relay.delays == [1.0, 2.0, 4.0, 8.0, 16.0]


async def test_the_password_never_reaches_the_logs_or_exceptions(
    auth_relay: AuthRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG (aiosmtpd's included), PLAIN and LOGIN, right and wrong."""
    caplog.set_level(logging.DEBUG)
    secrets = [PASSWORD, WRONG]
    encoded = [base64.b64encode(s.encode()).decode() for s in secrets] + [
        base64.b64encode(f"\0erp\0{s}".encode()).decode() for s in secrets
    ]

    def scenario() -> list[str]:
        errors: list[str] = []
        with connect(auth_relay, OPTIONAL) as client:
            try:
                client.login("erp", WRONG)
            except smtplib.SMTPAuthenticationError as error:
                errors.append(f"{error!s} {error!r}")
            client.user, client.password = "erp", WRONG
            try:
                client.auth("LOGIN", client.auth_login, initial_response_ok=False)
            except smtplib.SMTPAuthenticationError as error:
                errors.append(f"{error!s} {error!r}")
            client.login("erp", PASSWORD)
        return errors

    errors = await off_loop(scenario)
    assert len(errors) == 2
    logged = caplog.text + "".join(str(vars(record)) for record in caplog.records)
    for text in secrets + encoded:
        assert text not in logged
        assert not any(text in error for error in errors)
    assert "AUTH failed for user=erp" in caplog.text


async def test_hash_password_prints_a_hash_that_verifies() -> None:
    """`smtp-graph-relay hash-password --stdin` (as `python -m relay`) prints only the hash."""
    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "relay", "hash-password", "--stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    [line] = completed.stdout.splitlines()
    assert line.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert verify_password(line, PASSWORD)
    assert PASSWORD not in completed.stdout + completed.stderr
    client = ClientConfig.model_validate(  # the printed line is what the configuration takes
        {"name": "erp", "username": "erp", "password_hash": line, "senders": ["*@contoso.com"]}
    )
    assert client.has_credentials


# --- real clients -------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_authenticates_over_starttls(
    auth_relay: AuthRelay, sandbox: Sandbox, mechanism: str
) -> None:
    """swaks (OpenSSL via Net::SSLeay) with --tls --auth: 235, then the mail is delivered."""
    argv = swaks(
        auth_relay.port(REQUIRED),
        "--tls",
        "--auth",
        mechanism,
        "--auth-user",
        "erp",
        "--auth-password",
        PASSWORD,
    )
    code, output = await run(*argv)
    assert code == 0, output
    assert "235 2.7.0 Authentication successful" in output
    assert "250 2.0.0 Ok: delivered" in output
    assert len(await sandbox.wait_for_mail(1)) == 1


# --- the client is decided once per session ------------------------------------------------


class AcceptingSubmitter:
    """The delivery engine's part as an honest fake: every prepared message is taken."""

    def __init__(self) -> None:
        self.submitted: list[Submission] = []

    async def submit(self, submission: Submission) -> Accepted:
        self.submitted.append(submission)
        return Accepted(submission.queue_id, "queued")


@dataclass
class CountedRelay:
    """A real listener (STARTTLS, auth: optional) whose handler counts identify_client calls."""

    port: int
    tls: ssl.SSLContext
    calls: list[tuple[str, str | None]]
    config: list[Config]  # [current]; replace the element to "reload"


@pytest.fixture
async def counted_relay(
    sandbox: Sandbox, tmp_path: Path, relay_tls: TlsFiles
) -> AsyncIterator[CountedRelay]:
    clients = CLIENTS + "- {name: local, networks: [127.0.0.1/32], senders: ['*@contoso.com']}\n"
    text = relay_config_text(
        sandbox,
        listeners=LISTENERS,
        smtp_extra=f"tls: {{cert_file: {relay_tls.cert_file}, key_file: {relay_tls.key_file}}}",
        clients=clients,
    )
    current = [build_config(text, tmp_path)]
    calls: list[tuple[str, str | None]] = []

    def counting(
        clients: Sequence[ClientConfig], client_ip: str, user: str | None = None
    ) -> ClientConfig:
        calls.append((client_ip, user))
        return identify_client(clients, client_ip, user)

    handler = RelayHandler(
        config=lambda: current[0], submitter=AcceptingSubmitter(), identify=counting
    )
    tls = server_tls_context(str(relay_tls.cert_file), str(relay_tls.key_file))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RelaySMTP(
            handler,
            limiter=ConnectionLimiter(total=10, per_client=10),
            outsiders_may_connect=True,
            tls_context=tls,
            hostname="relay.test",
            decode_data=False,
            auth_require_tls=True,
            loop=loop,
        ),
        "127.0.0.1",
        0,
    )
    try:
        port = int(server.sockets[0].getsockname()[1])
        yield CountedRelay(port, relay_tls.client_context(), calls, current)
    finally:
        server.close()
        await server.wait_closed()


def transaction(client: smtplib.SMTP, recipients: int = 3) -> int:
    assert client.mail(MAILBOX)[0] == 250
    for n in range(recipients):
        assert client.rcpt(f"r{n}@partner.example")[0] == 250
    return client.data(message())[0]


async def test_a_network_client_is_identified_once_for_the_whole_session(
    counted_relay: CountedRelay,
) -> None:
    """Two transactions (MAIL, 3 x RCPT, DATA each) cost one identification, at connect."""

    def scenario() -> list[int]:
        with smtplib.SMTP("127.0.0.1", counted_relay.port, timeout=30) as client:
            client.ehlo("device.test")
            return [transaction(client), transaction(client)]

    assert await off_loop(scenario) == [250, 250]
    assert counted_relay.calls == [("127.0.0.1", None)]


async def test_a_successful_auth_identifies_the_session_again_once(
    counted_relay: CountedRelay,
) -> None:
    """Connect (as 127.0.0.1), STARTTLS, AUTH as erp: the next MAIL re-identifies as the
    user, and nothing else does."""

    def scenario() -> int:
        with smtplib.SMTP("127.0.0.1", counted_relay.port, timeout=30) as client:
            client.ehlo("device.test")
            client.starttls(context=counted_relay.tls)
            client.ehlo("device.test")
            assert auth_plain(client, "erp", PASSWORD)[0] == 235
            return transaction(client)

    assert await off_loop(scenario) == 250
    assert counted_relay.calls == [("127.0.0.1", None), ("127.0.0.1", "erp")]


async def test_a_reload_that_replaces_the_client_list_identifies_again(
    counted_relay: CountedRelay, tmp_path: Path, sandbox: Sandbox, relay_tls: TlsFiles
) -> None:
    """After a reload (a new Config, so a new client list) the open session's next command
    is judged against the new list: here the client was removed, so MAIL gets 550."""
    first_done, swapped = threading.Event(), threading.Event()

    def scenario() -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", counted_relay.port, timeout=30) as client:
            client.ehlo("device.test")
            first = transaction(client, recipients=1)
            first_done.set()
            swapped.wait(30)
            return first, client.mail(MAILBOX)[0]

    sending = asyncio.ensure_future(off_loop(scenario))
    assert await asyncio.to_thread(first_done.wait, 30)
    # the reloaded configuration no longer lists 127.0.0.1
    counted_relay.config[0] = build_config(
        relay_config_text(
            sandbox,
            listeners=LISTENERS,
            smtp_extra=f"tls: {{cert_file: {relay_tls.cert_file}, key_file: {relay_tls.key_file}}}",
            clients=CLIENTS,
        ),
        tmp_path,
    )
    swapped.set()
    assert await sending == (250, 550)
    assert counted_relay.calls == [("127.0.0.1", None), ("127.0.0.1", None)]


# --- what AUTH leaves in the log -----------------------------------------------------------

# What a client might type at "334 Username:" by mistake: its password, not base64.
NOT_BASE64 = "Hunter2-Pa$$word!"


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_an_auth_login_reply_that_is_not_base64_is_not_logged_at_debug(
    auth_relay: AuthRelay, caplog: pytest.LogCaptureFixture, fmt: str
) -> None:
    """With `logging.level: debug` the relay's own debug logging is on, but aiosmtpd's
    ("mail.log", which logs an undecodable AUTH reply as it came) stays at WARNING: the
    reply, which may be a password, appears in no log output."""
    output = io.StringIO()
    setup_logging("debug", fmt, stream=output)
    caplog.set_level(logging.DEBUG)
    assert logging.getLogger("relay.smtp").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("mail.log").isEnabledFor(logging.DEBUG)

    def scenario() -> tuple[int, int]:
        with connect(auth_relay, OPTIONAL) as client:
            code, _ = client.docmd("AUTH", "LOGIN")
            reply, _ = client.docmd(NOT_BASE64)
            return code, reply

    assert await off_loop(scenario) == (334, 501)
    assert NOT_BASE64 not in output.getvalue()
    assert NOT_BASE64 not in caplog.text
    assert base64.b64encode(NOT_BASE64.encode()).decode() not in output.getvalue()
