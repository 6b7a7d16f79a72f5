"""An asyncio SMTP load generator: raw SMTP over asyncio streams, no smtplib, no threads.

Why this module exists: the benchmarks and the crash tests need many concurrent SMTP clients
whose every transaction is accounted for: which message got a 250 (the relay now owns it,
RFC 5321 §6.1), which got a 4xx/5xx or lost its connection (the client still owns it), and how
long the final reply to DATA took (the cost of a durable 250). Running on the caller's event
loop means it can share one loop with the in-process sandbox.

Usage as a library::

    load = LoadGenerator(LoadConfig(port=2525, concurrency=8, size=2048))
    report = await load.run(count=300)            # each message tried once
    report = await load.run(stop=event, retry_connect=True)   # until `event`, riding out restarts

or from the shell: `python -m bench.loadgen --port 2525 -n 300 -c 8 --size 2048`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "LoadConfig",
    "LoadGenerator",
    "LoadReport",
    "Reply",
    "SmtpClient",
    "SmtpProtocolError",
    "Transaction",
    "build_message",
    "percentile",
]

# How far a transaction got; a failure is reported at the step it happened in.
Stage = Literal["connect", "mail", "rcpt", "data", "body"]
_NETWORK_ERRORS = (OSError, EOFError, TimeoutError)


class SmtpProtocolError(Exception):
    """The server said something that is not an SMTP reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class SmtpClient:
    """One SMTP connection: commands and replies (RFC 5321 §4.2), DATA with dot-stuffing."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout

    @classmethod
    async def connect(
        cls, host: str, port: int, *, helo: str = "loadgen.test", io_timeout: float = 30.0
    ) -> SmtpClient:
        """Open a connection, read the greeting and say EHLO; raise on anything but 2xx."""
        async with asyncio.timeout(io_timeout):
            reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer, io_timeout)
        try:
            for reply in (await client.read_reply(), await client.command(f"EHLO {helo}")):
                if reply.code // 100 != 2:
                    raise SmtpProtocolError(f"not ready: {reply}")
        except BaseException:
            client.abort()
            raise
        return client

    async def read_reply(self) -> Reply:
        """A possibly multi-line reply (`250-...` lines, then `250 ...`)."""
        texts: list[str] = []
        async with asyncio.timeout(self._timeout):
            while True:
                line = await self._reader.readline()
                if not line:
                    raise EOFError("connection closed by the server")
                decoded = line.decode("utf-8", "replace").rstrip("\r\n")
                if not decoded[:3].isdigit() or decoded[3:4] not in ("", " ", "-"):
                    raise SmtpProtocolError(f"not an SMTP reply line: {decoded!r}")
                texts.append(decoded[4:])
                if decoded[3:4] != "-":
                    return Reply(int(decoded[:3]), "\n".join(texts))

    async def command(self, line: str) -> Reply:
        self._writer.write(line.encode() + b"\r\n")
        await self._writer.drain()
        return await self.read_reply()

    async def send_body(self, message: bytes) -> Reply:
        """After `354`: the message, dot-stuffed (RFC 5321 §4.5.2), and the final `.`."""
        self._writer.write(_dot_stuffed(message) + b".\r\n")
        await self._writer.drain()
        return await self.read_reply()

    async def quit(self) -> None:
        """QUIT politely, then close; never raises."""
        with contextlib.suppress(*_NETWORK_ERRORS, SmtpProtocolError):
            await self.command("QUIT")
        self.abort()

    def abort(self) -> None:
        self._writer.close()


def _dot_stuffed(message: bytes) -> bytes:
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def build_message(*, subject: str, size: int, mail_from: str, to: Sequence[str]) -> bytes:
    """An RFC 5322 message of about `size` bytes (at least its headers) with `subject`."""
    head = (
        f"From: Load Generator <{mail_from}>\r\n"
        f"To: {', '.join(to)}\r\n"
        f"Subject: {subject}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    filler = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuv\r\n"
    lines = max(1, math.ceil((size - len(head)) / len(filler)))
    return head + filler * lines


@dataclass(frozen=True, slots=True)
class Transaction:
    """One message's fate, as the client saw it.

    `code` is the final reply (the one that ended the transaction), None when the connection
    failed before any; `accepted` means the 250 after the final `.`. `latency` runs from MAIL to
    the end; `data_latency` from the final `.` to its reply (None without that reply).
    """

    index: int
    subject: str
    connection: int
    stage: Stage
    code: int | None
    text: str
    started: float
    latency: float
    data_latency: float | None

    @property
    def accepted(self) -> bool:
        return self.stage == "body" and self.code == 250


@dataclass(frozen=True, slots=True)
class LoadConfig:
    port: int
    host: str = "127.0.0.1"
    concurrency: int = 8
    size: int = 2048
    mail_from: str = "scanner@contoso.com"
    recipients: tuple[str, ...] = ("bob@partner.example",)
    helo: str = "loadgen.test"
    subject_prefix: str = "load"
    timeout: float = 30.0
    # Pause after a refused or broken connection before trying again (retry_connect mode).
    reconnect_delay: float = 0.02
    # Messages per connection before it is closed with QUIT; 0 keeps each connection open.
    per_connection: int = 0


@dataclass(frozen=True, slots=True)
class LoadReport:
    transactions: tuple[Transaction, ...]
    elapsed: float
    connect_failures: int

    @property
    def accepted(self) -> list[Transaction]:
        return [t for t in self.transactions if t.accepted]

    @property
    def not_accepted(self) -> list[Transaction]:
        return [t for t in self.transactions if not t.accepted]

    def outcome_counts(self) -> Counter[str]:
        """`250`, `451`, ..., or `error@stage` for transactions that got no final reply."""
        return Counter(
            str(t.code) if t.code is not None else f"error@{t.stage}" for t in self.transactions
        )

    def data_latencies(self) -> list[float]:
        return sorted(t.data_latency for t in self.accepted if t.data_latency is not None)

    def summary(self) -> str:
        lat = self.data_latencies()
        rate = len(self.accepted) / self.elapsed if self.elapsed > 0 else 0.0
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(self.outcome_counts().items()))
        lines = [
            f"transactions {len(self.transactions)} in {self.elapsed:.2f} s "
            f"({rate:.1f} accepted/s); outcomes: {outcomes or 'none'}; "
            f"refused connections {self.connect_failures}",
        ]
        if lat:
            lines.append(
                "final DATA reply latency (ms): "
                + ", ".join(f"p{p:g} {percentile(lat, p) * 1000:.1f}" for p in (50, 90, 99))
                + f", max {lat[-1] * 1000:.1f}"
            )
        return "\n".join(lines)


class LoadGenerator:
    """`concurrency` connections sending messages with unique subjects `{prefix}-{index:06d}`.

    Everything observed is in `transactions` while it runs; `wait_accepted(n)` waits for the
    n-th 250 without polling.
    """

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.transactions: list[Transaction] = []
        self.accepted_subjects: list[str] = []
        self.connect_failures = 0
        self._indices = itertools.count()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._connections = itertools.count(1)

    def subject(self, index: int) -> str:
        return f"{self.config.subject_prefix}-{index:06d}"

    @property
    def accepted(self) -> int:
        return len(self.accepted_subjects)

    async def wait_accepted(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once `count` messages got their 250; TimeoutError after `timeout` seconds."""
        if self.accepted >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (count, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def run(
        self,
        count: int | None = None,
        *,
        stop: asyncio.Event | None = None,
        retry_connect: bool = False,
    ) -> LoadReport:
        """Send until `count` messages were tried or `stop` is set (at least one is needed).

        With `retry_connect`, a refused connection is retried (after `reconnect_delay`) without
        using up a message, which is how the load rides out a relay restart; without it, a
        message whose connection is refused is recorded as failed at the `connect` stage.
        A transaction in progress when `stop` is set is completed, not abandoned.
        """
        if count is None and stop is None:
            raise ValueError("give a count, a stop event, or both")
        stop = stop or asyncio.Event()
        started = time.perf_counter()
        first = len(self.transactions)
        refused_before = self.connect_failures
        limit = math.inf if count is None else count
        taken = itertools.count()

        def next_index() -> int | None:
            if stop.is_set() or next(taken) >= limit:
                return None
            return next(self._indices)

        async with asyncio.TaskGroup() as group:
            for _ in range(self.config.concurrency):
                group.create_task(self._worker(next_index, stop, retry_connect))
        return LoadReport(
            transactions=tuple(self.transactions[first:]),
            elapsed=time.perf_counter() - started,
            connect_failures=self.connect_failures - refused_before,
        )

    async def _worker(
        self, next_index: Callable[[], int | None], stop: asyncio.Event, retry_connect: bool
    ) -> None:
        config = self.config
        client: SmtpClient | None = None
        connection = 0
        sent_here = 0
        try:
            while True:
                if client is None and retry_connect:
                    client, connection = await self._connect_until(stop)
                    sent_here = 0
                    if client is None:
                        return
                index = next_index()
                if index is None:
                    return
                if client is None:
                    try:
                        client = await self._connect()
                    except (*_NETWORK_ERRORS, SmtpProtocolError) as exc:
                        self.connect_failures += 1
                        self._record(
                            index, 0, "connect", None, _describe(exc), time.perf_counter(), None
                        )
                        continue
                    connection, sent_here = next(self._connections), 0
                keep = await self._transaction(client, connection, index)
                sent_here += 1
                if not keep:
                    client.abort()
                    client = None
                elif config.per_connection and sent_here >= config.per_connection:
                    await client.quit()
                    client = None
        finally:
            if client is not None:
                await client.quit()

    async def _connect(self) -> SmtpClient:
        config = self.config
        return await SmtpClient.connect(
            config.host, config.port, helo=config.helo, io_timeout=config.timeout
        )

    async def _connect_until(self, stop: asyncio.Event) -> tuple[SmtpClient | None, int]:
        while not stop.is_set():
            try:
                return await self._connect(), next(self._connections)
            except (*_NETWORK_ERRORS, SmtpProtocolError):
                self.connect_failures += 1
                await asyncio.sleep(self.config.reconnect_delay)  # the client's own backoff
        return None, 0

    async def _transaction(self, client: SmtpClient, connection: int, index: int) -> bool:
        """One message on an open connection; True if the connection is still usable."""
        config = self.config
        subject = self.subject(index)
        data = build_message(
            subject=subject, size=config.size, mail_from=config.mail_from, to=config.recipients
        )
        started = time.perf_counter()
        stage: Stage = "mail"
        try:
            reply = await client.command(f"MAIL FROM:<{config.mail_from}>")
            if reply.code != 250:
                self._record(index, connection, stage, reply.code, reply.text, started, None)
                return False
            stage = "rcpt"
            for rcpt in config.recipients:
                reply = await client.command(f"RCPT TO:<{rcpt}>")
                if reply.code not in (250, 251):
                    self._record(index, connection, stage, reply.code, reply.text, started, None)
                    return False
            stage = "data"
            reply = await client.command("DATA")
            if reply.code != 354:
                self._record(index, connection, stage, reply.code, reply.text, started, None)
                return False
            stage = "body"
            body_sent = time.perf_counter()
            reply = await client.send_body(data)
        except (*_NETWORK_ERRORS, SmtpProtocolError) as exc:
            self._record(index, connection, stage, None, _describe(exc), started, None)
            return False
        now = time.perf_counter()
        self._record(index, connection, stage, reply.code, reply.text, started, now - body_sent)
        return reply.code // 100 == 2

    def _record(
        self,
        index: int,
        connection: int,
        stage: Stage,
        code: int | None,
        text: str,
        started: float,
        data_latency: float | None,
    ) -> None:
        transaction = Transaction(
            index=index,
            subject=self.subject(index),
            connection=connection,
            stage=stage,
            code=code,
            text=text,
            started=started,
            latency=time.perf_counter() - started,
            data_latency=data_latency,
        )
        self.transactions.append(transaction)
        if transaction.accepted:
            self.accepted_subjects.append(transaction.subject)
            done = [e for e in self._waiters if e[0] <= self.accepted]
            for entry in done:
                self._waiters.remove(entry)
                if not entry[1].done():
                    entry[1].set_result(None)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="Send N messages over C concurrent SMTP connections and print the figures.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("-n", "--messages", type=int, default=100)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--from", dest="mail_from", default="scanner@contoso.com")
    parser.add_argument("--to", action="append", help="recipient (repeatable)")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("this load generator only talks to a relay on the loopback interface")
    config = LoadConfig(
        port=args.port,
        host=args.host,
        concurrency=args.concurrency,
        size=args.size,
        mail_from=args.mail_from,
        recipients=tuple(args.to or ["bob@partner.example"]),
        subject_prefix=f"loadgen-{int(time.time())}",
    )
    report = asyncio.run(LoadGenerator(config).run(count=args.messages))
    print(report.summary())
    return 0 if not report.not_accepted else 1


if __name__ == "__main__":
    raise SystemExit(main())
