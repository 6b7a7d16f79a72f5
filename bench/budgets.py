"""Pacing to Exchange Online's sending limits: a 2,000-message burst on one mailbox and on a pool.

Why this module exists: issue #12 asks for figures, not a timed test. An ERP that sends 2,000
invoices at once must see every SMTP transaction answered as fast as usual, while the relay
sends no faster than the mailbox's budget (here `messages_per_minute: 600`, the sandbox enforcing
600) and yet close to it, and a pool of 4 mailboxes must send about 4 times as fast. Printed:

- the SMTP side: 250s, p50/p99/max of the final-dot reply, paced, next to the same burst with
  the budgets lifted (same run, same machine);
- the Graph side: how long the burst took to deliver, the lower bound the budget allows
  (`(ceil(N / L) - 1) x 60 s`: the last window cannot open earlier), their ratio, messages per
  minute in each full minute, and the sandbox's limit violations (must be 0).

    python -m bench.budgets                      # 2,000 messages, 600/min, Graph 50 ms
    python -m bench.budgets -n 400 --per-minute 120   # a quicker look

The relay runs as its own process (`python -m relay serve`, hybrid mode, fsync on); the sandbox
and the load generator share this process.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import MAILBOX, UNPACED, relay_config_text, sandbox_world, write_secret
from bench.crash_soak import RelayProcess, free_port
from bench.loadgen import LoadConfig, LoadGenerator, percentile
from bench.report import put_section
from bench.standard import RESULTS
from relay.sandbox import Sandbox

__all__ = ["Run", "main", "run_burst"]

POOL = (
    "noreply1@contoso.com",
    "noreply2@contoso.com",
    "noreply3@contoso.com",
    "noreply4@contoso.com",
)


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    messages: int
    accepted: int
    p50: float
    p99: float
    worst: float
    delivered: int
    duration: float  # first to last 202
    bound: float  # the earliest the last message may go under the budgets
    per_minute: tuple[int, ...]
    violations: int

    @property
    def rate(self) -> float:
        return self.delivered / self.duration * 60 if self.duration else math.inf

    def markdown(self) -> str:
        share = f"{self.bound / self.duration:.1%}" if self.bound and self.duration else "-"
        return (
            f"| {self.name} | {self.accepted}/{self.messages} | {self.p50 * 1000:.1f} "
            f"| {self.p99 * 1000:.1f} | {self.worst * 1000:.1f} | {self.delivered} "
            f"| {self.duration:.1f} | {self.bound:.0f} | {share} | {self.rate:.0f} "
            f"| {', '.join(map(str, self.per_minute))} | {self.violations} |"
        )


EXPLAINED = (
    '"bound" is the earliest the last message may go under the budget alone '
    '((ceil(N / L) - 1) x 60 s); "bound/took" is how close the relay came to it. A pool of 4 '
    "holds a 2,000-message burst in its first window at 600/min each, so the pool runs at the "
    'relay\'s own speed and its ratio says "at least 4x" rather than measuring 4x.'
)

HEADER = (
    "| run | 250s | p50 ms | p99 ms | max ms | delivered | took s | bound s | bound/took "
    "| msg/min | per full minute | violations |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
)


async def run_burst(
    sandbox: Sandbox,
    folder: Path,
    *,
    name: str,
    messages: int,
    per_minute: int,
    mailbox: str,
    members: int,
    concurrency: int,
    paced: bool,
) -> Run:
    """One fresh relay; `messages` sent by `concurrency` SMTP clients as fast as they can."""
    await asyncio.to_thread(folder.mkdir, parents=True)
    limits = f"mailbox_limits: {{messages_per_minute: {per_minute}}}" if paced else UNPACED
    delivery = (
        f"{{mode: hybrid, inline_timeout: 10s, spool_dir: {folder / 'spool'}, concurrency: 32, "
        f"retry: {{first: 1s, max: 10s, lifetime: 1h}}, {limits}}}"
    )
    port = free_port()
    path = folder / "relay.yaml"
    path.write_text(
        relay_config_text(
            sandbox, port=port, delivery=delivery, secret_file=write_secret(folder), mailbox=mailbox
        )
    )
    before = len(sandbox.received)
    violations_before = sum(sandbox.violations.values())
    relay = RelayProcess(path)
    await relay.start()
    try:
        load = LoadGenerator(
            LoadConfig(port=port, concurrency=concurrency, mail_from=MAILBOX, subject_prefix=name)
        )
        report = await load.run(count=messages)
        target = before + len(report.accepted)
        bound = (math.ceil(messages / (per_minute * members)) - 1) * 60.0 if paced else 0.0
        await sandbox.wait_until(lambda: len(sandbox.received) >= target, timeout=bound * 1.5 + 120)
    finally:
        await relay.terminate()
        await relay.aclose()
    sent = sorted(mail.received_at for mail in sandbox.received[before:])
    duration = sent[-1] - sent[0] if len(sent) > 1 else 0.0
    minutes = [0] * (int(duration // 60) + 1)
    for at in sent:
        minutes[int((at - sent[0]) // 60)] += 1
    latencies = report.data_latencies() or [math.nan]
    return Run(
        name=name,
        messages=messages,
        accepted=len(report.accepted),
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        worst=latencies[-1],
        delivered=len(sent),
        duration=duration,
        bound=bound,
        per_minute=tuple(minutes[:-1]) if len(minutes) > 1 else tuple(minutes),
        violations=sum(sandbox.violations.values()) - violations_before,
    )


async def _bench(args: argparse.Namespace, work: Path) -> list[Run]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    runs: list[Run] = []
    plan = [
        ("unpaced, one mailbox", "sender", 1, False),
        ("paced, one mailbox", "sender", 1, True),
        ("paced, pool of 4", f"[{', '.join(POOL)}]", len(POOL), True),
    ]
    for index, (name, mailbox, members, paced) in enumerate(plan):
        # A fresh sandbox per run: Exchange's windows must not carry one run's sends into the next.
        async with sandbox_world(work / f"sandbox{index}") as sandbox:
            for member in POOL:
                sandbox.add_mailbox(member, send_as=(MAILBOX,))
            sandbox.faults.graph_latency(args.graph_latency)
            if paced:
                sandbox.set_limits(messages_per_minute=args.per_minute)
            started = time.monotonic()
            run = await run_burst(
                sandbox,
                work / f"run{index}",
                name=name,
                messages=args.messages,
                per_minute=args.per_minute,
                mailbox=mailbox,
                members=members,
                concurrency=args.concurrency,
                paced=paced,
            )
        print(f"{run.markdown()}   ({time.monotonic() - started:.0f} s)", flush=True)
        runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budgets", description=__doc__)
    parser.add_argument("-n", "--messages", type=int, default=2000, help="burst size (2000)")
    parser.add_argument("--per-minute", type=int, default=600, help="messages_per_minute (600)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="SMTP clients (8)")
    parser.add_argument("--graph-latency", type=float, default=0.05, metavar="SECONDS")
    parser.add_argument("--write", action="store_true", help="put the table into RESULTS.md")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-budgets-") as work:
        runs = asyncio.run(_bench(args, Path(work)))
    single, pool = runs[1], runs[2]
    summary = (
        f"pool of 4 / one mailbox: {pool.rate / single.rate:.2f}x the rate; "
        f"p99 paced / unpaced: {single.p99 / runs[0].p99:.2f}x; "
        f"violations: {sum(r.violations for r in runs)}"
    )
    print(f"\n{summary}")
    if args.write:
        table = "\n".join([HEADER, *(r.markdown() for r in runs)])
        body = (
            f"## Sending limits (`python -m bench.budgets`)\n\n{args.messages} messages, "
            f"messages_per_minute {args.per_minute} (the sandbox enforcing it), Graph "
            f"{args.graph_latency * 1000:.0f} ms, {args.concurrency} SMTP clients, hybrid mode.\n\n"
            f"{table}\n\n{summary}\n\n{EXPLAINED}\n"
        )
        RESULTS.write_text(put_section(RESULTS.read_text(), "budgets", body))
    return 0 if all(r.violations == 0 and r.delivered == r.accepted for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
