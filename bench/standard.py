"""The standard benchmark set: throughput, latency, memory and token economy, into RESULTS.md.

Why this module exists: one command that answers "how fast, how big, how polite to Microsoft"
the same way on any machine, and states the targets as met or not with the number:

    python -m bench.standard            # ~2-3 min on 2 cores; (re)writes bench/RESULTS.md
    python -m bench.standard --quick    # fewer messages, for a smoke run

Every scenario runs a fresh sandbox (fake Entra ID + Graph, so its counters start at zero) in
this process and a fresh relay as a child process (`python -m relay serve -c FILE`, spool on the
work directory's disk, fsync on), measured from outside: the load generator's clock for SMTP
transactions, /proc/PID/status for the relay's memory, /proc/PID/net/tcp for its connections to
the sandbox, the sandbox's journal for what "Microsoft" saw. After the scenarios, py-spy (when
installed) profiles the relay during a queue-mode C=8 run (bench.profile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import smtplib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench import (
    CLIENT_ID,
    MAILBOX,
    RECIPIENT,
    SECRET,
    TENANT,
    UNPACED,
    relay_config_text,
    sandbox_world,
    write_secret,
)
from bench.crash_soak import RelayProcess, free_port
from bench.large_message import build_message as build_large_message
from bench.loadgen import LoadConfig, LoadGenerator, Transaction, percentile
from bench.procfs import ConnectionSampler, Memory, describe_machine, memory
from bench.profile import Profile, Profiler, py_spy
from bench.report import Outcome, kept_sections, render
from relay.config.load import parse_config
from relay.core.errors import ConfigError
from relay.sandbox import MAILBOX_CONCURRENCY, Sandbox

__all__ = ["Scenario", "main", "run_scenario", "scenarios"]

Mode = Literal["direct", "hybrid", "queue"]
MODES: tuple[Mode, ...] = ("direct", "hybrid", "queue")
MIB = 1024 * 1024
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True, slots=True)
class Scenario:
    """One run: `messages` of `size` bytes over `concurrency` SMTP connections, spread over
    `mailboxes` senders (each its own mailbox), Graph answering after `graph_latency` seconds.
    `large`: one message of `size` bytes (an attachment) through the upload-session path."""

    group: str
    mode: Mode
    concurrency: int
    messages: int
    size: int = 2048
    graph_latency: float = 0.0
    mailboxes: int = 1
    large: bool = False
    warmup: int = 10

    @property
    def name(self) -> str:
        if self.large:
            return f"{self.size // MIB} MiB message, {self.mode}"
        boxes = f", {self.mailboxes} mailboxes" if self.mailboxes > 1 else ""
        return f"{self.mode}, C={self.concurrency}{boxes}"


GROUPS = {
    "modes": "2 KB messages per delivery mode and concurrency (Graph 0 ms, 1 mailbox)",
    "latency": "Graph-like latency: sendMail answers after 200 ms (2 KB, C=8, 1 mailbox)",
    "mailboxes": "1 mailbox vs 4 mailboxes (Graph 200 ms, 2 KB, C=32)",
    "large": "Large messages: peak RSS vs message size (upload sessions, hybrid)",
}


def scenarios(scale: float = 1.0) -> list[Scenario]:
    """The standard set; `scale` shrinks the message counts (--quick)."""

    def n(count: int) -> int:
        return max(20, int(count * scale))

    found = [
        Scenario("modes", mode, c, n({1: 200, 8: 800, 32: 800}[c]))
        for mode in MODES
        for c in (1, 8, 32)
    ]
    found += [Scenario("latency", mode, 8, n(200), graph_latency=0.2) for mode in MODES]
    found += [
        Scenario("mailboxes", mode, 32, n(240), graph_latency=0.2, mailboxes=boxes)
        for mode in ("direct", "queue")
        for boxes in (1, 4)
    ]
    found += [
        Scenario("large", "hybrid", 1, 1, size=mb * MIB, large=True, warmup=1) for mb in (25, 100)
    ]
    return found


def sender(index: int) -> str:
    return MAILBOX if index == 0 else MAILBOX.replace("@", f"{index}@")


def _config(sandbox: Sandbox, folder: Path, port: int, scenario: Scenario) -> str:
    large = "upload" if scenario.large else "reject"
    delivery = (
        f"{{mode: {scenario.mode}, inline_timeout: 60s, spool_dir: {folder / 'spool'}, "
        f"large_messages: {large}, retry: {{first: 1s, max: 10s, lifetime: 1h}}, {UNPACED}}}"
    )
    text = relay_config_text(
        sandbox, port=port, delivery=delivery, secret_file=write_secret(folder)
    )
    # All load comes from 127.0.0.1: allow C=32 from one client (the default is 20).
    limits = "  max_message_size: 210MiB\n  max_connections_per_client: 64\n"
    text = text.replace("  hostname: relay.bench\n", "  hostname: relay.bench\n" + limits)
    # A loopback admin port of its own: the default 9025 may be taken by another relay.
    return text + "admin: {address: 127.0.0.1, port: 0}\nlogging: {level: info}\n"


def upload_available(folder: Path) -> str | None:
    """None if `delivery.large_messages: upload` validates in relay.config; else why not."""
    text = f"""\
clients: [{{name: c, networks: [127.0.0.1/32], senders: ["*@contoso.com"]}}]
auth_objects:
  a: {{tenant_id: {TENANT}, client_id: {CLIENT_ID}, client_secret_file: {write_secret(folder)}}}
routes: [{{senders: ["*@contoso.com"], auth_object: a, mailbox: sender}}]
delivery: {{mode: hybrid, spool_dir: {folder / "spool"}, large_messages: upload}}
"""
    try:
        parse_config(text, base_dir=folder, environ={})
    except ConfigError as exc:
        return f"not available: {exc}".splitlines()[0]
    return None


async def _load(port: int, scenario: Scenario, prefix: str, count: int) -> tuple[
    list[Transaction], float
]:  # fmt: skip
    """`count` messages over `concurrency` connections, spread over the scenario's senders."""
    boxes = scenario.mailboxes
    generators = [
        LoadGenerator(
            LoadConfig(
                port=port,
                concurrency=max(1, scenario.concurrency // boxes),
                size=scenario.size,
                mail_from=sender(i),
                subject_prefix=f"{prefix}-{i}",
            )
        )
        for i in range(boxes)
    ]
    started = time.perf_counter()
    reports = await asyncio.gather(
        *(g.run(count=count // boxes + (i < count % boxes)) for i, g in enumerate(generators))
    )
    elapsed = time.perf_counter() - started
    return [t for r in reports for t in r.transactions], elapsed


def _send_large(port: int, raw: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=600) as client:
        client.ehlo("bench.test")
        client.mail(MAILBOX)
        client.rcpt(RECIPIENT)
        code, text = client.data(raw)
        return code, text.decode()


class _InFlight:
    """Samples the sandbox's sendMail requests in flight per mailbox every `interval` s."""

    def __init__(self, sandbox: Sandbox, interval: float = 0.005) -> None:
        self._sandbox = sandbox
        self._interval = interval
        self.samples: list[dict[str, int]] = []

    async def run(self) -> None:
        while True:
            self.samples.append(dict(self._sandbox.in_flight))
            await asyncio.sleep(self._interval)

    def full_share(self) -> float | None:
        """Lowest over the mailboxes: the share of samples with all slots busy, counted from
        the mailbox's first to its last busy sample (the time it had work)."""
        shares: list[float] = []
        for box in {b for s in self.samples for b in s}:
            busy = [i for i, s in enumerate(self.samples) if s.get(box, 0) > 0]
            window = self.samples[busy[0] : busy[-1] + 1]
            full = sum(1 for s in window if s.get(box, 0) >= MAILBOX_CONCURRENCY)
            shares.append(full / len(window))
        return min(shares) if shares else None


async def run_scenario(
    scenario: Scenario, work: Path, *, profile_with: str | None = None
) -> tuple[Outcome, Profile | None]:
    """A fresh sandbox and relay; warm-up, then the measured load; the figures."""
    folder = work / f"{scenario.group}-{scenario.name}".replace(" ", "").replace(",", "-")
    folder.mkdir(parents=True)
    async with sandbox_world(work / "sandbox") as sandbox:
        roles = ("Mail.Send", "Mail.ReadWrite")
        sandbox.add_app(TENANT, CLIENT_ID, secret=SECRET, roles=roles)
        for i in range(1, scenario.mailboxes):
            sandbox.add_mailbox(sender(i))
        port = free_port()
        config = folder / "relay.yaml"
        config.write_text(_config(sandbox, folder, port, scenario))
        relay = RelayProcess(config)
        await relay.start()
        try:
            assert relay.process is not None
            pid = relay.process.pid
            await asyncio.sleep(0.3)
            idle = memory(pid)
            return await _measure(scenario, sandbox, relay, pid, port, idle, profile_with, folder)
        finally:
            with contextlib.suppress(Exception):
                await relay.terminate()
            await relay.aclose()


async def _measure(
    scenario: Scenario,
    sandbox: Sandbox,
    relay: RelayProcess,
    pid: int,
    port: int,
    idle: Memory,
    profile_with: str | None,
    folder: Path,
) -> tuple[Outcome, Profile | None]:
    connections = ConnectionSampler(pid, sandbox.port)
    connections.start()
    sandbox.faults.graph_latency(scenario.graph_latency)
    if not scenario.large:
        warm, _ = await _load(port, scenario, "warmup", scenario.warmup * scenario.mailboxes)
        warmed = sum(1 for t in warm if t.accepted)
        await sandbox.wait_until(lambda: len(sandbox.received) >= warmed, timeout=120)
    before = len(sandbox.received)
    in_flight = _InFlight(sandbox)
    sampler = asyncio.create_task(in_flight.run())
    profiler = Profiler(profile_with, pid, folder / "py-spy.txt") if profile_with else None
    if profiler is not None:
        await profiler.start()
    started = time.perf_counter()
    try:
        if scenario.large:
            raw, _ = build_large_message(scenario.size * 3 // 4 - 64 * 1024)
            size = len(raw)
            code, text = await asyncio.to_thread(_send_large, port, raw)
            del raw
            elapsed = time.perf_counter() - started
            transactions = [Transaction(0, "large", 1, "body", code, text, started, elapsed, None)]
        else:
            size = scenario.size
            transactions, elapsed = await _load(port, scenario, "run", scenario.messages)
        accepted = [t for t in transactions if t.accepted]
        await sandbox.wait_until(
            lambda: len(sandbox.received) >= before + len(accepted), timeout=300
        )
        recorded = time.perf_counter() - started
    finally:
        sampler.cancel()
        profile = await profiler.stop() if profiler is not None else None
    peak = memory(pid)
    seen = await connections.stop()
    latencies = sorted(t.latency for t in accepted) or [float("nan")]
    overheads = sorted(
        t.latency - (scenario.graph_latency if "delivered" in t.text else 0.0) for t in accepted
    ) or [float("nan")]
    others = sorted(f"{t.code or 'error'} {t.text[:60]}" for t in transactions if not t.accepted)
    outcome = Outcome(
        name=scenario.name,
        group=scenario.group,
        mode=scenario.mode,
        concurrency=scenario.concurrency,
        mailboxes=scenario.mailboxes,
        graph_latency=scenario.graph_latency,
        message_bytes=size,
        tried=len(transactions),
        accepted=len(accepted),
        others=tuple(dict.fromkeys(others))[:3],
        accepted_per_second=len(accepted) / elapsed,
        recorded_seconds=recorded,
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        overhead_p50=percentile(overheads, 50),
        overhead_p99=percentile(overheads, 99),
        idle_rss_kib=idle.rss_kib,
        peak_rss_kib=peak.hwm_kib,
        token_requests=sandbox.token_requests,
        max_in_flight=dict(sandbox.max_concurrency),
        full_share=in_flight.full_share(),
        throttled=sandbox.graph_statuses[429],
        graph_requests=sandbox.graph_requests,
        connections=seen,
        relay_errors=relay.counts["errors"],
    )
    return outcome, profile


async def _bench(args: argparse.Namespace, work: Path) -> str:
    """Run every scenario and the profile; the RESULTS.md text."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # stop children
    machine = describe_machine(work)
    print(f"load average at start: {machine.load_average}", flush=True)
    upload = upload_available(work)
    outcomes: list[Outcome] = []
    skipped: dict[str, str] = {}
    for scenario in scenarios(0.25 if args.quick else 1.0):
        if scenario.large and upload is not None:
            skipped[scenario.name] = upload
            print(f"{scenario.name}: {upload}", flush=True)
            continue
        outcome, _ = await run_scenario(scenario, work)
        print(outcome.line(), flush=True)
        outcomes.append(outcome)
    profile: Profile | None = None
    profiled: Outcome | None = None
    spy = py_spy()
    if spy is None:
        print("py-spy not installed: no profile", flush=True)
    else:
        scenario = Scenario("profile", "queue", 8, 300 if args.quick else 2000)
        profiled, profile = await run_scenario(scenario, work / "profile", profile_with=spy)
        print(f"profiled run: {profiled.line()}", flush=True)
    return render(machine, GROUPS, outcomes, skipped, profile, profiled, quick=args.quick)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.standard",
        description="Run the standard benchmark set and (re)write bench/RESULTS.md.",
    )
    parser.add_argument("--quick", action="store_true", help="a quarter of the messages")
    parser.add_argument("--output", default=str(RESULTS), help="where to write (RESULTS.md)")
    parser.add_argument("--dir", help="work directory, on the disk to measure (default: /tmp)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(args.dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="std-")))
        work.mkdir(parents=True, exist_ok=True)
        text = asyncio.run(_bench(args, work))
    output = Path(args.output)
    old = output.read_text() if output.exists() else ""
    output.write_text(kept_sections(old, text))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
