"""What a 250 costs: latency of the final DATA reply and throughput per delivery mode.

Why this module exists: the three delivery modes (DESIGN §5) trade the client's wait against
the relay's responsibility. `direct` answers after Graph's 202, `hybrid` after a durable spool
write plus one inline attempt, `queue` after the durable write alone. This script measures the
price of each with fsync on, against the sandbox's Graph, and prints a Markdown table:

    python -m bench.latency                       # 300 messages of 2 KB, C=1 and C=8
    python -m bench.latency --graph-latency 0.25  # a Graph that takes 250 ms per sendMail
    python -m bench.latency --subprocess          # relay in its own process (own CPU)

By default the relay runs in-process, on the same event loop as the sandbox and the load
generator (as tests/conftest.py builds it), so the figures include their CPU cost too; with
`--subprocess` the relay is `python -m relay serve` in a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import MAILBOX, UNPACED, relay_config_text, sandbox_world, write_secret
from bench.crash_soak import RelayProcess, free_port
from bench.loadgen import LoadConfig, LoadGenerator, LoadReport, percentile
from relay.config.load import parse_config
from relay.sandbox import Sandbox
from relay.service import RelayService

__all__ = ["Row", "main", "measure"]

MODES = ("direct", "hybrid", "queue")


@dataclass(frozen=True, slots=True)
class Row:
    mode: str
    concurrency: int
    messages: int
    accepted: int
    p50: float
    p90: float
    p99: float
    worst: float
    accepted_per_second: float
    delivered_per_second: float
    other_outcomes: str

    def markdown(self) -> str:
        return (
            f"| {self.mode} | {self.concurrency} | {self.accepted}/{self.messages} "
            f"| {self.p50 * 1000:.1f} | {self.p90 * 1000:.1f} | {self.p99 * 1000:.1f} "
            f"| {self.worst * 1000:.1f} | {self.accepted_per_second:.0f} "
            f"| {self.delivered_per_second:.0f} | {self.other_outcomes or '-'} |"
        )


HEADER = (
    "| mode | C | 250s | p50 ms | p90 ms | p99 ms | max ms | accepted msg/s | delivered msg/s "
    "| other replies |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _prepare(folder: Path, sandbox: Sandbox, port: int, mode: str) -> tuple[str, Path]:
    """Config text (and its file) for one run, with a fresh spool under `folder`."""
    folder.mkdir(parents=True)
    delivery = (
        f"{{mode: {mode}, inline_timeout: 10s, spool_dir: {folder / 'spool'}, "
        "retry: {first: 1s, max: 10s, lifetime: 1h}, " + UNPACED + "}"
    )
    text = relay_config_text(
        sandbox, port=port, delivery=delivery, secret_file=write_secret(folder)
    )
    path = folder / "relay.yaml"
    path.write_text(text)
    return text, path


async def _start_relay(
    sandbox: Sandbox, folder: Path, mode: str, *, subprocess: bool
) -> tuple[int, RelayService | RelayProcess]:
    if subprocess:
        port = free_port()
        _, path = _prepare(folder, sandbox, port, mode)
        process = RelayProcess(path)
        await process.start()
        return port, process
    text, _ = _prepare(folder, sandbox, 0, mode)
    service = RelayService(parse_config(text, base_dir=folder, environ={}))
    await service.start()
    return service.listeners[0].port, service


async def _stop_relay(relay: RelayService | RelayProcess) -> None:
    if isinstance(relay, RelayProcess):
        await relay.terminate()
        await relay.aclose()
    else:
        await relay.stop()


async def measure(
    sandbox: Sandbox,
    folder: Path,
    *,
    mode: str,
    concurrency: int,
    messages: int,
    size: int,
    warmup: int,
    subprocess: bool,
) -> Row:
    """One fresh relay in `mode`; `warmup` messages (token, connections), then the run."""
    port, relay = await _start_relay(sandbox, folder, mode, subprocess=subprocess)
    try:
        config = LoadConfig(
            port=port,
            concurrency=concurrency,
            size=size,
            mail_from=MAILBOX,
            subject_prefix=f"latency-{mode}-c{concurrency}",
        )
        await LoadGenerator(config).run(count=warmup)
        await sandbox.wait_until(lambda: not sandbox.in_flight, timeout=60)
        before = len(sandbox.received)
        load = LoadGenerator(config)
        started = time.perf_counter()
        report = await load.run(count=messages)
        target = before + len(report.accepted)
        await sandbox.wait_until(lambda: len(sandbox.received) >= target, timeout=120)
        delivered_in = time.perf_counter() - started
    finally:
        await _stop_relay(relay)
    return _row(mode, concurrency, messages, report, delivered_in)


def _row(
    mode: str, concurrency: int, messages: int, report: LoadReport, delivered_in: float
) -> Row:
    latencies = report.data_latencies() or [float("nan")]
    outcomes = report.outcome_counts()
    del outcomes["250"]
    return Row(
        mode=mode,
        concurrency=concurrency,
        messages=messages,
        accepted=len(report.accepted),
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        worst=latencies[-1],
        accepted_per_second=len(report.accepted) / report.elapsed,
        delivered_per_second=len(report.accepted) / delivered_in,
        other_outcomes=", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())),
    )


async def _bench(args: argparse.Namespace, work: Path) -> list[Row]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # stop children
    rows: list[Row] = []
    async with sandbox_world(work / "sandbox") as sandbox:
        if args.graph_latency:
            sandbox.faults.graph_latency(args.graph_latency)
        for mode in args.modes:
            for concurrency in args.concurrency:
                row = await measure(
                    sandbox,
                    work / f"{mode}-c{concurrency}",
                    mode=mode,
                    concurrency=concurrency,
                    messages=args.messages,
                    size=args.size,
                    warmup=args.warmup,
                    subprocess=args.subprocess,
                )
                print(row.markdown(), flush=True)
                rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description="Latency of the final DATA reply and throughput per delivery mode.",
    )
    parser.add_argument("-n", "--messages", type=int, default=300, help="per run (300)")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes (2048)")
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured messages per run")
    parser.add_argument("--graph-latency", type=float, default=0.0, metavar="SECONDS",
                        help="the sandbox's Graph waits this long per sendMail (0)")  # fmt: skip
    parser.add_argument("--subprocess", action="store_true", help="relay in a child process")
    parser.add_argument("--dir", help="work directory, on the disk to measure (default: /tmp)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = Path(args.dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="lat-")))
        work.mkdir(parents=True, exist_ok=True)
        where = "child process" if args.subprocess else "in-process"
        print(
            f"{args.messages} messages of {args.size} B per run, fsync on, relay {where}, "
            f"Graph latency {args.graph_latency * 1000:.0f} ms, spool under {work}\n"
        )
        print(HEADER, flush=True)
        asyncio.run(_bench(args, work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
