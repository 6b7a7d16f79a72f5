"""Attacks on the SMTP listener over raw sockets: "not an open relay, not a way in" (DESIGN §8).

Every test drives a real relay (aiosmtpd listener -> policy -> message -> the sandbox's Graph)
with asyncio streams, byte for byte, so nothing a client library would correct (line endings,
pipelining, PROXY headers) is hidden. Each asserts the exact reply line and how many messages
reached the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import textwrap
from collections.abc import AsyncIterator

import pytest

from relay.sandbox import Sandbox
from relay.service import RelayService
from tests.conftest import MAILBOX, RelayFactory, TlsFiles

TIMEOUT = 30.0
RECIPIENT = "bob@partner.example"
MESSAGE = (
    f"From: Scanner <{MAILBOX}>\r\nTo: {RECIPIENT}\r\nSubject: Scan\r\n\r\nScanned.\r\n".encode()
)
SMUGGLED = (
    b"MAIL FROM:<ceo@contoso.com>\r\n"
    b"RCPT TO:<victim@partner.example>\r\n"
    b"DATA\r\n"
    b"From: CEO <ceo@contoso.com>\r\nTo: victim@partner.example\r\nSubject: Pay now\r\n\r\n"
    b"forged\r\n"
)
SMUGGLING_ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"]


class RawSmtp:
    """An SMTP client that sends exactly the bytes it is given and reads whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, source: str = "127.0.0.1") -> RawSmtp:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0), limit=1 << 20
        )
        return cls(reader, writer)

    async def reply(self) -> str:
        """The last line of the next (possibly multi-line) reply, without CRLF."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                line = await self.reader.readline()
                if not line:
                    raise ConnectionError("connection closed while waiting for a reply")
                if line[3:4] != b"-":
                    return line.decode("utf-8", "replace").rstrip("\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: bytes | str) -> str:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def greeted(self) -> RawSmtp:
        assert (await self.reply()).startswith("220 ")
        assert (await self.command("EHLO device.test")).startswith("250 ")
        return self

    async def envelope(self, sender: str = MAILBOX, recipient: str = RECIPIENT) -> None:
        assert (await self.command(f"MAIL FROM:<{sender}>")).startswith("250 ")
        assert (await self.command(f"RCPT TO:<{recipient}>")).startswith("250 ")
        assert (await self.command("DATA")).startswith("354 ")

    async def closed_by_server(self) -> bool:
        """True when the server closes the connection (after any replies still in flight)."""
        async with asyncio.timeout(TIMEOUT):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@pytest.fixture
async def clients() -> AsyncIterator[list[RawSmtp]]:
    """Raw sessions opened by a test; all are closed at teardown."""
    opened: list[RawSmtp] = []
    yield opened
    for client in opened:
        await client.close()


async def session(port: int, opened: list[RawSmtp], *, source: str = "127.0.0.1") -> RawSmtp:
    client = await RawSmtp.connect(port, source=source)
    opened.append(client)
    return client


def port_of(relay: RelayService) -> int:
    return relay.listeners[0].port


# --- open relay --------------------------------------------------------------------------------


async def test_open_relay_attempt_from_an_unknown_network_is_554_at_the_greeting(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """A client from 127.0.0.2, which no client entry lists, on a listener without AUTH, is
    answered 554 5.7.1 instead of a greeting and cannot even start a transaction."""
    client = await session(port_of(relay), clients, source="127.0.0.2")
    assert await client.reply() == "554 5.7.1 Relay access denied: not an allowed client"
    assert await client.closed_by_server()
    assert sandbox.received == []


# --- SMTP smuggling ------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
async def test_smuggled_second_transaction_is_refused_with_the_first(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp], ending: bytes
) -> None:
    """bare_line_endings: reject (default): the ambiguous end never ends DATA; the whole
    message, smuggled transaction included, is refused with 550 5.6.0 and nothing reaches
    Graph. The next command's reply is the next reply: no smuggled command was ever run."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(MESSAGE + b"Regards" + ending + SMUGGLED + b".\r\n")
    assert await client.reply() == (
        '550 5.6.0 A "." line next to a bare CR, LF or NUL is not accepted; end lines with CRLF'
    )
    assert await client.command("NOOP") == "250 OK"
    assert await client.command(f"RCPT TO:<{RECIPIENT}>") == "503 Error: need MAIL command"
    assert sandbox.received == []
    assert sandbox.graph_requests == 0


async def test_nul_before_the_dot_is_refused_like_a_bare_line_ending(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """CRLF NUL "." CRLF ends DATA on servers that drop NULs: refused, nothing delivered."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(MESSAGE + b"\0.\r\n" + SMUGGLED + b".\r\n")
    assert (await client.reply()).startswith('550 5.6.0 A "." line next to a bare CR, LF or NUL')
    assert sandbox.received == []


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
async def test_normalize_delivers_exactly_one_message_with_the_smuggled_text_in_it(
    start_relay: RelayFactory, sandbox: Sandbox, clients: list[RawSmtp], ending: bytes
) -> None:
    """bare_line_endings: normalize: the bare ending becomes CRLF, the "." stays content, and
    exactly one message (the first, to bob only) reaches Graph; the forged one does not."""
    relay = await start_relay(smtp_extra="bare_line_endings: normalize")
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(MESSAGE + b"Regards" + ending + SMUGGLED + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    assert await client.command("NOOP") == "250 OK"
    [mail] = sandbox.received
    assert mail.recipients == (RECIPIENT,)
    assert mail.from_address == MAILBOX
    assert mail.mime is not None
    assert mail.mime.endswith(b"Scanned.\r\nRegards\r\n.\r\n" + SMUGGLED)


async def test_bare_lf_body_of_a_legacy_device_is_still_delivered_unchanged(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """DESIGN §7: bare LF lines that cannot end DATA are tolerated and passed byte for byte."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    body = b"line one\nline two\n\n.. a stuffed dot\nlast\r\n"
    await client.send(MESSAGE + body + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    [mail] = sandbox.received
    assert mail.mime is not None
    assert mail.mime.endswith(b"Scanned.\r\n" + body)


async def test_bare_cr_in_the_header_is_refused(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """A CR-splitting parser would see a Bcc that the relay's recipient check does not."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(
        f"From: {MAILBOX}\r\nSubject: hi\rBcc: spy@elsewhere.example\r\n\r\nx\r\n.\r\n".encode()
    )
    assert await client.reply() == (
        "550 5.6.0 Bare CR in the message header is not accepted; end lines with CRLF"
    )
    assert sandbox.received == []


async def test_long_lines_are_tolerated_within_the_size_limit(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """DESIGN §7: a 20 000-character line (aiosmtpd alone would answer 500 past 1001) is
    delivered whole; only max_message_size bounds it."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    line = b"L" * 20_000 + b"\r\n"
    await client.send(MESSAGE + line + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    [mail] = sandbox.received
    assert mail.mime is not None
    assert mail.mime.endswith(b"Scanned.\r\n" + line)


async def test_client_vanishing_mid_data_delivers_nothing(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """Half a message and a closed socket: no delivery, and the relay keeps serving."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(MESSAGE + b"half a line")
    await client.close()
    await asyncio.sleep(0.2)
    other = await (await session(port_of(relay), clients)).greeted()
    assert await other.command("NOOP") == "250 OK"
    assert sandbox.received == []


async def test_help_still_lists_the_commands(relay: RelayService, clients: list[RawSmtp]) -> None:
    """Counting commands wraps aiosmtpd's command table; HELP must still see it."""
    client = await (await session(port_of(relay), clients)).greeted()
    reply = await client.command("HELP")
    assert reply.startswith("250 Supported commands: ")
    assert {"DATA", "EHLO", "MAIL", "RCPT", "QUIT"} <= set(reply.split(": ", 1)[1].split())
    assert await client.command("HELP DATA") == "250 Syntax: DATA"


# --- STARTTLS ------------------------------------------------------------------------------------


async def test_command_pipelined_after_starttls_is_discarded(
    start_relay: RelayFactory, sandbox: Sandbox, relay_tls: TlsFiles, clients: list[RawSmtp]
) -> None:
    """CVE-2011-0411 / CVE-2024-34083: plaintext sent with STARTTLS is not executed after the
    handshake. The first reply inside TLS answers our EHLO, and RCPT finds no MAIL."""
    relay = await start_relay(tls=True, listeners="[{address: 127.0.0.1, port: 0, tls: starttls}]")
    client = await (await session(port_of(relay), clients)).greeted()
    await client.send(b"STARTTLS\r\nMAIL FROM:<scanner@contoso.com>\r\nRCPT TO:<bob@x.example>\r\n")
    assert await client.reply() == "220 Ready to start TLS"
    async with asyncio.timeout(TIMEOUT):
        await client.writer.start_tls(relay_tls.client_context(), server_hostname="localhost")
    await client.send(b"EHLO device.test\r\n")
    first = await client.reader.readline()
    assert first.startswith(b"250-relay.test"), first
    await client.reply()
    assert await client.command(f"RCPT TO:<{RECIPIENT}>") == "503 Error: need MAIL command"
    assert sandbox.received == []


# --- envelope addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"MAIL FROM:<scan\rner@contoso.com>", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<scan\0ner@contoso.com>", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<scan\x85ner@contoso.com> SMTPUTF8", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<\xff\xfe@contoso.com>", "501 5.1.7 Bad sender address syntax"),
        (b"MAIL FROM:<\xff\xfe@contoso.com> SMTPUTF8", "501 5.1.7 Bad sender address syntax"),
        (
            "MAIL FROM:<jörg@contoso.com>".encode(),
            "553 5.6.7 Non-ASCII sender address needs MAIL FROM ... SMTPUTF8",
        ),
    ],
    ids=["CR", "NUL", "NEL", "invalid-UTF-8", "invalid-UTF-8+SMTPUTF8", "UTF-8-without-SMTPUTF8"],
)
async def test_broken_sender_addresses_get_a_clean_5xx(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp], command: bytes, reply: str
) -> None:
    """Control characters and invalid UTF-8 never reach policy, headers or logs; the reply is a
    plain 5xx with an enhanced code, never `500 Error: (Exception) ...`."""
    client = await (await session(port_of(relay), clients)).greeted()
    assert await client.command(command) == reply
    assert await client.command("NOOP") == "250 OK"
    assert sandbox.received == []


@pytest.mark.parametrize(
    ("address", "reply"),
    [
        (b"bob\r@partner.example", "501 5.1.3 Bad recipient address syntax"),
        (b"bob\0@partner.example", "501 5.1.3 Bad recipient address syntax"),
        (b"b\xffb@partner.example", "501 5.1.3 Bad recipient address syntax"),
        (
            "bøb@partner.example".encode(),
            "553 5.6.7 Non-ASCII recipient address needs MAIL FROM ... SMTPUTF8",
        ),
    ],
    ids=["CR", "NUL", "invalid-UTF-8", "UTF-8-without-SMTPUTF8"],
)
async def test_broken_recipient_addresses_get_a_clean_5xx(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp], address: bytes, reply: str
) -> None:
    """RCPT TO with a control character or invalid UTF-8 is 501 5.1.3 before any check."""
    client = await (await session(port_of(relay), clients)).greeted()
    assert (await client.command(f"MAIL FROM:<{MAILBOX}>")).startswith("250 ")
    assert await client.command(b"RCPT TO:<" + address + b">") == reply
    assert sandbox.received == []


async def test_utf8_sender_with_smtputf8_is_accepted(
    relay: RelayService, clients: list[RawSmtp]
) -> None:
    """The other side: valid UTF-8 with SMTPUTF8 (RFC 6531) is an ordinary address."""
    client = await (await session(port_of(relay), clients)).greeted()
    assert await client.command("MAIL FROM:<jörg@contoso.com> SMTPUTF8".encode()) == (
        "250 2.1.0 Sender OK"
    )


async def test_nul_in_the_message_is_refused(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """NUL is not allowed in a message sent without BINARYMIME (RFC 6152)."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(MESSAGE + b"binary\0junk\r\n.\r\n")
    assert await client.reply() == "550 5.6.0 NUL characters are not accepted in a message"
    assert sandbox.received == []


# --- limits ----------------------------------------------------------------------------------


async def test_1001_recipients_get_500_accepted_then_452_453(
    start_relay: RelayFactory, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """max_recipients (500): the 501st and later RCPTs get 452 4.5.3; the message goes to the
    first 500 only. (max_commands is raised so that 1001 RCPTs fit in one session.)"""
    relay = await start_relay(smtp_extra="max_commands: 2000")
    client = await (await session(port_of(relay), clients)).greeted()
    assert (await client.command(f"MAIL FROM:<{MAILBOX}>")).startswith("250 ")
    await client.send(b"".join(b"RCPT TO:<r%d@partner.example>\r\n" % n for n in range(1001)))
    replies = [await client.reply() for _ in range(1001)]
    assert replies[:500] == ["250 2.1.5 Recipient OK"] * 500
    assert replies[500:] == ["452 4.5.3 Too many recipients (at most 500)"] * 501
    assert await client.command("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    await client.send(f"From: {MAILBOX}\r\nSubject: many\r\n\r\nx\r\n.\r\n".encode())
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    [mail] = sandbox.received
    assert len(mail.recipients) == 500


async def test_command_1001_of_a_session_is_421_470_and_the_connection_closes(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """max_commands (default 1000) counts every command of the connection."""
    client = await (await session(port_of(relay), clients)).greeted()  # EHLO is command 1
    await client.send(b"NOOP\r\n" * 1000)
    replies = [await client.reply() for _ in range(1000)]
    assert replies[:999] == ["250 OK"] * 999
    assert replies[999] == "421 4.7.0 Too many commands, closing connection"
    assert await client.closed_by_server()
    assert sandbox.received == []


async def test_oversize_size_parameter_is_552_534_at_mail(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """RFC 1870: a declared SIZE over the limit is refused at MAIL, with an enhanced code."""
    client = await (await session(port_of(relay), clients)).greeted()
    reply = await client.command(f"MAIL FROM:<{MAILBOX}> SIZE=999999999999")
    assert reply == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert (await client.command(f"MAIL FROM:<{MAILBOX}> SIZE=1000")).startswith("250 ")
    assert sandbox.received == []


async def test_oversize_data_is_552_534_after_the_end_of_data(
    start_relay: RelayFactory, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """DATA past max_message_size is read to its end, refused, and the session goes on."""
    relay = await start_relay(smtp_extra="max_message_size: 10KB")
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(MESSAGE + (b"x" * 76 + b"\r\n") * 300 + b".\r\n")
    assert await client.reply() == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert await client.command("NOOP") == "250 OK"
    assert sandbox.received == []


async def test_slow_drip_data_is_cut_at_the_data_deadline_with_421_442(
    start_relay: RelayFactory, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """A client that keeps sending (so the idle timer never fires) still cannot hold DATA open
    past smtp.data_timeout: it gets 421 4.4.2 and the connection is closed."""
    relay = await start_relay(smtp_extra="data_timeout: 1s")
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    loop = asyncio.get_running_loop()
    started = loop.time()
    drip = asyncio.create_task(drip_forever(client))
    try:
        assert await client.reply() == "421 4.4.2 DATA took too long, closing connection"
    finally:
        drip.cancel()
    assert 0.9 <= loop.time() - started < 10
    assert await client.closed_by_server()
    assert sandbox.received == []


async def drip_forever(client: RawSmtp) -> None:
    """One byte every 0.1 s, with a CRLF now and then, until cancelled or disconnected."""
    data = MESSAGE + b"drip\r\n" * 10_000
    for n in range(len(data)):
        try:
            await client.send(data[n : n + 1])
        except ConnectionError:
            return
        await asyncio.sleep(0.1)


async def test_steady_data_keeps_the_idle_timer_alive(
    start_relay: RelayFactory, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """The idle timer counts from the last DATA line, not from the DATA command: a message
    that takes longer than idle_timeout but keeps coming is delivered."""
    relay = await start_relay(smtp_extra="idle_timeout: 1s\ndata_timeout: 30s")
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(MESSAGE)
    for n in range(8):  # about 2.4 s in all
        await asyncio.sleep(0.3)
        await client.send(b"line %d\r\n" % n)
    await client.send(b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    assert len(sandbox.received) == 1


def multipart(depth: int) -> bytes:
    head = f"From: {MAILBOX}\r\nTo: {RECIPIENT}\r\nSubject: deep\r\n".encode()
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (n, n)
        for n in range(depth)
    )
    closing = b"".join(b"--b%d--\r\n" % n for n in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\ndeep\r\n" + closing


async def test_500_deep_multipart_is_554_560(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """max_mime_depth (default 50): a 500-deep MIME tree is refused at the end of DATA."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(multipart(500) + b".\r\n")
    assert await client.reply() == "554 5.6.0 MIME nesting exceeds 50 levels"
    assert sandbox.received == []


async def test_50_deep_multipart_is_delivered(
    relay: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """The other side of the depth limit: 50 levels are accepted and delivered."""
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    await client.send(multipart(50) + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    assert len(sandbox.received) == 1


@pytest.mark.parametrize(
    ("smtp_extra", "reply"),
    [
        ("max_message_size: 20MB", "554 5.6.0 Message header block exceeds 1048576 bytes"),
        ("max_message_size: 512KB", "552 5.3.4 Message size exceeds fixed maximum message size"),
    ],
    ids=["header-limit-first", "size-limit-first"],
)
async def test_10_mb_header_block_is_refused(
    start_relay: RelayFactory,
    sandbox: Sandbox,
    clients: list[RawSmtp],
    smtp_extra: str,
    reply: str,
) -> None:
    """A 10 MB header block: with max_message_size 20MB (and large_messages: upload, so SIZE
    is not capped at one Graph request) the 1 MiB header limit refuses it with 554 5.6.0; with
    max_message_size 512KB the size limit is reached first: 552 5.3.4."""
    delivery = "{mode: direct, inline_timeout: 5s, large_messages: upload}"
    relay = await start_relay(smtp_extra=smtp_extra, delivery=delivery)
    client = await (await session(port_of(relay), clients)).greeted()
    await client.envelope()
    header = (
        f"From: {MAILBOX}\r\nTo: {RECIPIENT}\r\n".encode()
        + b"X-Junk: "
        + (b"j" * 70 + b"\r\n ") * 140_000
        + b"end\r\n\r\nbody\r\n"
    )
    assert len(header) > 10_000_000
    await client.send(header + b".\r\n")
    assert await client.reply() == reply
    assert sandbox.received == []


# --- PROXY protocol ----------------------------------------------------------------------------

PROXY_CLIENTS = textwrap.dedent(
    """\
    - name: behind-the-balancer
      networks: [192.0.2.0/24]
      senders: ["*@contoso.com"]
    """
)
PROXY_SMTP = "proxy_protocol: true\nproxy_networks: [127.0.0.1/32]"


def proxy_v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 2525\r\n".encode()


def proxy_v2(source: str | None, port: int = 40000) -> bytes:
    """A binary v2 header: PROXY over TCP/IPv4 from `source`, or LOCAL when it is None."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if source is None:
        return signature + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    body = addresses + struct.pack("!HH", port, 2525)
    return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.fixture
async def proxied(start_relay: RelayFactory) -> RelayService:
    """A relay behind a load balancer at 127.0.0.1 whose clients are in 192.0.2.0/24."""
    return await start_relay(smtp_extra=PROXY_SMTP, clients=PROXY_CLIENTS)


@pytest.mark.parametrize(
    "header", [proxy_v1("192.0.2.10"), proxy_v2("192.0.2.10")], ids=["v1", "v2"]
)
async def test_proxy_header_from_the_balancer_gives_the_real_client_address(
    proxied: RelayService,
    sandbox: Sandbox,
    clients: list[RawSmtp],
    header: bytes,
    log_records: pytest.LogCaptureFixture,
) -> None:
    """From 127.0.0.1 (in proxy_networks) the header's 192.0.2.10 is the client: policy lets it
    send, Received: and the delivery log name it."""
    client = await session(port_of(proxied), clients)
    await client.send(header)
    await client.greeted()
    await client.envelope()
    await client.send(MESSAGE + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    [mail] = sandbox.received
    assert mail.mime is not None
    assert b"(unknown [192.0.2.10])" in mail.mime.split(b"\r\n\t", 1)[0]
    [delivered] = [r for r in log_records.records if getattr(r, "event", "") == "delivered"]
    assert vars(delivered)["client_ip"] == "192.0.2.10"


async def test_proxied_client_outside_the_client_networks_is_554_571(
    proxied: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """The header's address is what policy judges: 198.51.100.7 is no client, so it is
    answered 554 5.7.1 instead of the greeting and closed."""
    client = await session(port_of(proxied), clients)
    await client.send(proxy_v1("198.51.100.7"))
    assert await client.reply() == "554 5.7.1 Relay access denied: not an allowed client"
    assert await client.closed_by_server()
    assert sandbox.received == []


async def test_proxy_local_command_means_the_balancer_itself(
    proxied: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """v2 LOCAL (a health check) keeps the TCP peer, 127.0.0.1, which is no client here."""
    client = await session(port_of(proxied), clients)
    await client.send(proxy_v2(None))
    assert await client.reply() == "554 5.7.1 Relay access denied: not an allowed client"
    assert await client.closed_by_server()
    assert sandbox.received == []


@pytest.mark.parametrize(
    "header", [proxy_v1("192.0.2.10"), proxy_v2("192.0.2.10")], ids=["v1", "v2"]
)
async def test_proxy_header_from_outside_proxy_networks_is_closed(
    proxied: RelayService, sandbox: Sandbox, clients: list[RawSmtp], header: bytes
) -> None:
    """From 127.0.0.2 a PROXY header is a forgery: the connection is closed, no greeting."""
    client = await session(port_of(proxied), clients, source="127.0.0.2")
    await client.send(header)
    assert await client.reader.read() == b""
    assert sandbox.received == []


async def test_missing_proxy_header_on_a_proxy_listener_is_closed(
    proxied: RelayService, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """Even from the balancer's address, plain SMTP without the header is not served."""
    client = await session(port_of(proxied), clients)
    await client.send(b"EHLO device.test\r\n")
    assert await client.reader.read() == b""
    assert sandbox.received == []


async def test_proxy_header_on_an_ordinary_listener_changes_nothing(
    start_relay: RelayFactory, sandbox: Sandbox, clients: list[RawSmtp]
) -> None:
    """Without proxy_protocol a PROXY line is an unknown command: the client 127.0.0.1
    claiming to be the outsider 198.51.100.7 is still judged as 127.0.0.1."""
    relay = await start_relay()
    client = await session(port_of(relay), clients)
    assert (await client.reply()).startswith("220 ")
    assert (await client.command(proxy_v1("198.51.100.7").rstrip(b"\r\n"))).startswith("500 ")
    assert (await client.command("EHLO device.test")).startswith("250 ")
    assert await client.command(f"MAIL FROM:<{MAILBOX}>") == "250 2.1.0 Sender OK"
    assert sandbox.received == []


async def test_starttls_behind_the_balancer_keeps_the_real_client_address(
    start_relay: RelayFactory, sandbox: Sandbox, relay_tls: TlsFiles, clients: list[RawSmtp]
) -> None:
    """STARTTLS starts a new aiosmtpd session; the proxied address must survive it."""
    relay = await start_relay(
        tls=True,
        listeners="[{address: 127.0.0.1, port: 0, tls: starttls}]",
        smtp_extra=PROXY_SMTP,
        clients=PROXY_CLIENTS,
    )
    client = await session(port_of(relay), clients)
    await client.send(proxy_v2("192.0.2.20"))
    await client.greeted()
    assert await client.command("STARTTLS") == "220 Ready to start TLS"
    async with asyncio.timeout(TIMEOUT):
        await client.writer.start_tls(relay_tls.client_context(), server_hostname="localhost")
    assert (await client.command("EHLO device.test")).startswith("250 ")
    await client.envelope()
    await client.send(MESSAGE + b".\r\n")
    assert (await client.reply()).startswith("250 2.0.0 Ok: delivered ")
    [mail] = sandbox.received
    assert mail.mime is not None
    assert b"[192.0.2.20]" in mail.mime
    assert b"with ESMTPS" in mail.mime
