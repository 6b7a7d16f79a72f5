"""kill -9 soak: the relay is killed at random moments under load and must lose nothing it acked.

Why this module exists: DESIGN §6 promises that `kill -9` at any moment loses no message that
got a 250. This is the harness that checks it: the relay runs as a real child process
(`python -m relay serve -c CONFIG`) against the in-process sandbox, a load generator keeps
several SMTP connections busy, and a seeded `random.Random` picks the moments to SIGKILL the
relay and restart it on the same spool and port. At the end Graph is made healthy and every
subject that got a 250 must reach the sandbox. Duplicates are allowed (at-least-once, §5).

`tests/integration/test_crash.py` runs a few cycles of it; `python -m bench.crash_soak` is the
long variant and prints the figures:

    python -m bench.crash_soak --kills 50 --mode hybrid --seed 1234

Graph answers either 503 to everything while the kills happen (`--graph failing`, messages pile
up in the spool and are claimed, deferred and recovered over and over), or 202 slowly
(`--graph slow`: kills land between Graph's 202 and the spool update, which makes duplicates).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Literal

from bench import MAILBOX, UNPACED, relay_config_text, sandbox_world, write_secret
from bench.loadgen import LoadConfig, LoadGenerator, LoadReport
from relay.sandbox import Sandbox

__all__ = [
    "RelayFailedError",
    "RelayProcess",
    "SoakAbortedError",
    "SoakResult",
    "SoakSettings",
    "free_port",
    "run_soak",
    "spool_subjects",
    "spool_tree",
]

Mode = Literal["hybrid", "queue"]
GraphBehaviour = Literal["failing", "slow"]


class RelayFailedError(Exception):
    """The relay process did not come up, or did not stop as asked."""


class SoakAbortedError(Exception):
    """The soak could not run to its end (relay or load stuck); the message has the evidence."""


class RelayProcess:
    """`python -m relay serve -c CONFIG` as a child; its stderr is read as long as it runs.

    Reading stderr continuously matters: a relay logging a deferral per attempt would otherwise
    fill the pipe and block. The last lines are kept for diagnostics, errors counted.
    """

    def __init__(self, config_path: Path, *, keep_lines: int = 400) -> None:
        self.config_path = config_path
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.tail: deque[str] = deque(maxlen=keep_lines)
        self.errors: list[str] = []  # ERROR/CRITICAL lines and tracebacks, the first 50
        self.counts: Counter[str] = Counter()
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()  # this run printed "listening on"
        self._gone = asyncio.Event()  # this run's stderr ended: the process is exiting

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def spawn(self) -> None:
        """Start the process without waiting for it to listen."""
        if self.running:
            raise RuntimeError("the relay is already running")
        self.starts += 1
        self.tail.append(f"--- relay start {self.starts} ---")
        self._ready, self._gone = asyncio.Event(), asyncio.Event()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "-c", str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.process.stderr is not None
        self._reader = asyncio.create_task(self._read(self.process.stderr, self._ready, self._gone))

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Spawn and wait for "listening on" (spool recovered, listener bound)."""
        await self.spawn()
        await self.wait_listening(timeout)

    async def wait_listening(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        ready, gone = (
            asyncio.ensure_future(self._ready.wait()),
            asyncio.ensure_future(self._gone.wait()),
        )
        try:
            await asyncio.wait({ready, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            gone.cancel()
        if self._ready.is_set():
            return
        if not self._gone.is_set():
            await self.kill()
            raise RelayFailedError(f"relay not listening after {timeout} s\n{self.log()}")
        code = await self._reap()
        raise RelayFailedError(f"relay exited with {code} before listening\n{self.log()}")

    async def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a power cut or the OOM killer would do."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self._reap()

    async def terminate(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM and the exit code; RelayFailedError if it takes longer than `timeout`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                return await self._reap()
        except TimeoutError:
            raise RelayFailedError(f"no exit {timeout} s after SIGTERM\n{self.log()}") from None

    async def aclose(self) -> None:
        """Make sure no child outlives the caller."""
        with contextlib.suppress(ProcessLookupError):
            await self.kill()

    def log(self, lines: int = 60) -> str:
        return "\n".join(list(self.tail)[-lines:])

    async def _reap(self) -> int:
        if self.process is None:
            return 0
        code = await self.process.wait()
        if self._reader is not None:
            await self._reader  # ends at EOF: the relay has no children holding the pipe
        return code

    async def _read(
        self, stream: asyncio.StreamReader, ready: asyncio.Event, gone: asyncio.Event
    ) -> None:
        in_traceback = False
        try:
            while raw := await stream.readline():
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.tail.append(line)
                if "listening on" in line:
                    ready.set()
                if "was held by a worker that died" in line:
                    self.counts["crashed entries"] += 1
                    if "quarantine/" in line:
                        self.counts["quarantined at start"] += 1
                serious = " ERROR " in line or " CRITICAL " in line or line.startswith("ERROR")
                if line.startswith("Traceback"):
                    self.counts["tracebacks"] += 1
                    in_traceback = True
                elif in_traceback and not line.startswith((" ", "Traceback")):
                    in_traceback = False
                    serious = True  # the exception line closing the traceback
                if serious:
                    self.counts["errors"] += 1
                if (serious or in_traceback) and len(self.errors) < 50:
                    self.errors.append(line)
        finally:
            gone.set()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spool_subjects(spool_dir: Path, state: str) -> dict[str, str]:
    """Queue id -> Subject of the entries in `state` (e.g. quarantine), read from data/."""
    found: dict[str, str] = {}
    parser = BytesHeaderParser(policy=default_policy)
    for meta in sorted((spool_dir / state).glob("*.json")):
        data = spool_dir / "data" / f"{meta.stem}.eml"
        try:
            with data.open("rb") as handle:
                found[meta.stem] = str(parser.parse(handle).get("Subject", ""))
        except FileNotFoundError:
            found[meta.stem] = "<data file missing>"
    return found


def spool_tree(spool_dir: Path, per_directory: int = 20) -> str:
    """Like `ls -R`, with at most `per_directory` names shown per directory."""
    lines = [f"{spool_dir}:"]
    if not spool_dir.is_dir():
        return f"{spool_dir}: missing"
    for folder in sorted(p for p in spool_dir.iterdir() if p.is_dir()):
        names = sorted(p.name for p in folder.iterdir())
        shown = " ".join(names[:per_directory])
        more = f" ... (+{len(names) - per_directory})" if len(names) > per_directory else ""
        lines.append(f"  {folder.name}/ [{len(names)}] {shown}{more}")
    return "\n".join(lines)


async def queue_cli(config_path: Path, *args: str) -> str:
    """`python -m relay queue -c CONFIG ARGS...`: what an operator would type."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", "-c", str(config_path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    return f"$ relay queue {' '.join(args)} (exit {process.returncode})\n" + output.decode(
        "utf-8", "replace"
    )


@dataclass(frozen=True, slots=True)
class SoakSettings:
    kills: int = 50
    seed: int = 0
    concurrency: int = 6
    size: int = 1024
    graph: GraphBehaviour = "failing"
    graph_latency: float = 0.3  # for graph="slow"
    # Between kills: this many new 250s (uniform in the range), then up to this extra delay.
    acks_between_kills: tuple[int, int] = (3, 25)
    max_kill_delay: float = 0.3
    # Share of restarts that are themselves killed at a random moment of the start (recovery).
    startup_kill_ratio: float = 0.0
    step_timeout: float = 30.0
    drain_timeout: float = 60.0


@dataclass(slots=True)
class SoakResult:
    mode: str
    settings: SoakSettings
    kills: int = 0
    startup_kills: int = 0
    attempts: int = 0
    acknowledged: int = 0
    client_failures: Counter[str] = field(default_factory=Counter)
    delivered: int = 0
    delivered_unacknowledged: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)
    dead: dict[str, str] = field(default_factory=dict)
    graph_statuses: dict[int, int] = field(default_factory=dict)
    relay_counts: Counter[str] = field(default_factory=Counter)
    relay_errors: list[str] = field(default_factory=list)
    restart_exit: int | None = None  # SIGTERM after releasing quarantined entries
    final_exit: int | None = None
    elapsed: float = 0.0
    drain_seconds: float = 0.0
    diagnostics: str = ""

    def summary(self) -> str:
        s = self.settings
        failures = ", ".join(f"{k}: {v}" for k, v in sorted(self.client_failures.items()))
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.graph_statuses.items()))
        relay = ", ".join(f"{k} {v}" for k, v in sorted(self.relay_counts.items()))
        lines = [
            f"crash soak: mode={self.mode} graph={s.graph} seed={s.seed} "
            f"connections={s.concurrency} size={s.size}",
            f"  kills (SIGKILL)           {self.kills} under load"
            f" + {self.startup_kills} while starting",
            f"  attempts (transactions)   {self.attempts}",
            f"  acknowledged (250)        {self.acknowledged}",
            f"  not acknowledged          {self.attempts - self.acknowledged}"
            + (f" ({failures})" if failures else ""),
            f"  delivered (unique)        {self.delivered}"
            f" (of which never acknowledged: {self.delivered_unacknowledged})",
            f"  lost                      {len(self.lost)}",
            f"  duplicates                {self.duplicates}",
            f"  quarantined at restart    {len(self.quarantined)}"
            + (
                f" (released with `queue retry`, SIGTERM exit {self.restart_exit}, restarted)"
                if self.quarantined
                else ""
            ),
            f"  dead                      {len(self.dead)}",
            f"  graph answers             {statuses}",
            f"  relay log                 {relay}",
            f"  final SIGTERM exit code   {self.final_exit}",
            f"  time                      {self.elapsed:.1f} s"
            f" (final drain {self.drain_seconds:.1f} s)",
        ]
        if self.quarantined:
            lines.append("  quarantined: " + ", ".join(sorted(self.quarantined.values())[:20]))
        if self.dead:
            lines.append("  dead: " + "; ".join(list(self.dead.values())[:10]))
        if self.lost:
            lines.append("  LOST: " + ", ".join(self.lost[:50]))
        if self.relay_errors:
            lines.append("  relay errors (first lines):")
            lines.extend(f"    {line}" for line in self.relay_errors[:20])
        return "\n".join(lines)


async def run_soak(
    sandbox: Sandbox,
    *,
    config_path: Path,
    spool_dir: Path,
    port: int,
    mode: str,
    settings: SoakSettings,
    mail_from: str = MAILBOX,
    say: Callable[[str], None] = print,
) -> SoakResult:
    """Kill the relay `settings.kills` times under load, then check every 250 was delivered.

    The relay configured in `config_path` must listen on 127.0.0.1:`port` with its spool in
    `spool_dir`. The sandbox's faults are cleared at the end (Graph healthy for the drain).
    """
    rng = random.Random(settings.seed)
    result = SoakResult(mode=mode, settings=settings)
    relay = RelayProcess(config_path)
    load = LoadGenerator(
        LoadConfig(
            port=port,
            concurrency=settings.concurrency,
            size=settings.size,
            mail_from=mail_from,
            subject_prefix=f"soak-{mode}-{settings.seed}",
        )
    )
    stop_load = asyncio.Event()
    load_task: asyncio.Task[LoadReport] | None = None
    started = time.perf_counter()

    async def more_acks(low: int, high: int) -> None:
        target = load.accepted + rng.randint(low, high)
        waiting = asyncio.ensure_future(load.wait_accepted(target, settings.step_timeout))
        assert load_task is not None
        await asyncio.wait({waiting, load_task}, return_when=asyncio.FIRST_COMPLETED)
        if load_task.done():  # the load generator must not end on its own: raise its error
            waiting.cancel()
            load_task.result()
            raise RuntimeError("the load generator stopped early")
        waiting.result()  # TimeoutError when the relay stopped acknowledging

    try:
        if settings.graph == "failing":
            sandbox.faults.fail_graph(503, "ServiceUnavailable", "soak", times=10**9)
        else:
            sandbox.faults.graph_latency(settings.graph_latency)
        await relay.start(settings.step_timeout)
        load_task = asyncio.create_task(load.run(stop=stop_load, retry_connect=True))
        for kill in range(1, settings.kills + 1):
            await more_acks(*settings.acks_between_kills)
            await asyncio.sleep(rng.uniform(0.0, settings.max_kill_delay))  # a random moment
            await relay.kill()
            result.kills += 1
            if rng.random() < settings.startup_kill_ratio:
                await relay.spawn()
                await asyncio.sleep(rng.uniform(0.05, 0.8))  # somewhere in imports or recovery
                await relay.kill()
                result.startup_kills += 1
            await relay.start(settings.step_timeout)
            if kill % 10 == 0 or kill == settings.kills:
                say(f"  {kill} kills, {load.accepted} acknowledged, {len(load.transactions)} tried")
        await more_acks(*settings.acks_between_kills)  # the last relay takes load too
        stop_load.set()
        async with asyncio.timeout(settings.step_timeout):
            report = await load_task

        # From here Graph is healthy. The last start's recovery is the last chance for an
        # entry to reach quarantine/, and nothing in this run expires: inspect the spool now.
        drain_started = time.perf_counter()
        sandbox.faults.clear()
        result.quarantined = spool_subjects(spool_dir, "quarantine")
        if result.quarantined:
            # What an operator does: `queue retry` each one. The runner would find them at its
            # next rescan (up to 2 x RESCAN_SECONDS); a graceful restart finds them at once.
            for queue_id in result.quarantined:
                say(await queue_cli(config_path, "retry", queue_id))
            result.restart_exit = await relay.terminate(settings.step_timeout)
            await relay.start(settings.step_timeout)
        acked = set(load.accepted_subjects)
        prefix = load.config.subject_prefix + "-"
        seen = Counter[str]()
        counted = 0

        def all_delivered() -> bool:
            nonlocal counted
            received = sandbox.received
            for mail in received[counted:]:
                if mail.subject.startswith(prefix):
                    seen[mail.subject] += 1
            counted = len(received)
            return acked <= seen.keys()

        with contextlib.suppress(TimeoutError):
            await sandbox.wait_until(all_delivered, settings.drain_timeout)
        result.drain_seconds = time.perf_counter() - drain_started
        all_delivered()

        result.attempts = len(report.transactions)
        result.acknowledged = len(acked)
        result.client_failures = report.outcome_counts()
        del result.client_failures["250"]
        result.delivered = len(seen)
        result.delivered_unacknowledged = len(seen.keys() - acked)
        result.duplicates = sum(n - 1 for n in seen.values())
        result.lost = sorted(acked - seen.keys())
        result.dead = {
            qid: f"{subject}: {reason}"
            for qid, subject in spool_subjects(spool_dir, "dead").items()
            for reason in [_dead_reason(spool_dir / "dead" / f"{qid}.json")]
        }
        if result.lost or result.dead:
            result.diagnostics = "\n".join(
                [
                    spool_tree(spool_dir),
                    await queue_cli(config_path, "list"),
                    "relay log (last lines):",
                    relay.log(80),
                ]
            )
        result.final_exit = await relay.terminate(settings.step_timeout)
    except (TimeoutError, RelayFailedError, RuntimeError, OSError) as exc:
        raise SoakAbortedError(
            f"soak aborted after {result.kills} kills ({load.accepted} acknowledged): {exc!r}\n"
            f"{spool_tree(spool_dir)}\nrelay log (last lines):\n{relay.log(80)}"
        ) from exc
    finally:
        stop_load.set()
        if load_task is not None and not load_task.done():
            load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await load_task
        await relay.aclose()
        result.graph_statuses = dict(sandbox.graph_statuses)
        result.relay_counts = Counter(relay.counts)
        result.relay_counts["starts"] = relay.starts
        result.relay_errors = list(relay.errors)
        result.elapsed = time.perf_counter() - started
    return result


def _dead_reason(path: Path) -> str:
    try:
        return str(json.loads(path.read_bytes()).get("dead_reason", "?"))
    except (OSError, ValueError):
        return "?"


async def _soak(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # kill the child
    with contextlib.ExitStack() as stack:
        if args.dir:
            base = Path(args.dir)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crash-soak-")))
        async with sandbox_world(base / "sandbox") as sandbox:
            port = free_port()
            spool = base / "spool"
            delivery = (
                f"{{mode: {args.mode}, inline_timeout: 200ms, spool_dir: {spool}, "
                "retry: {first: 100ms, max: 500ms, lifetime: 1h}, " + UNPACED + "}"
            )
            config = base / "relay.yaml"
            secret = write_secret(base)
            config.write_text(
                relay_config_text(sandbox, port=port, delivery=delivery, secret_file=secret)
            )
            settings = SoakSettings(
                kills=args.kills,
                seed=args.seed,
                concurrency=args.concurrency,
                size=args.size,
                graph=args.graph,
                startup_kill_ratio=args.startup_kills,
                drain_timeout=args.drain_timeout,
            )
            print(f"crash soak in {base}: {args.kills} kills, seed {args.seed}", flush=True)
            result = await run_soak(
                sandbox,
                config_path=config,
                spool_dir=spool,
                port=port,
                mode=args.mode,
                settings=settings,
                say=lambda text: print(text, flush=True),
            )
            print(result.summary())
            if result.diagnostics:
                print(result.diagnostics)
    return 1 if result.lost or result.dead or result.final_exit != 0 else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.crash_soak",
        description="SIGKILL the relay at random moments under load; count what was lost.",
    )
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs under load (50)")
    parser.add_argument("--mode", choices=["hybrid", "queue"], default="hybrid")
    parser.add_argument("--graph", choices=["failing", "slow"], default="failing",
                        help="Graph during the kills: 503 to all, or 202 after 0.3 s")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("-c", "--concurrency", type=int, default=6, help="SMTP connections")
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes")
    parser.add_argument("--startup-kills", type=float, default=0.2, metavar="RATIO",
                        help="share of restarts also killed while starting (0.2)")  # fmt: skip
    parser.add_argument("--drain-timeout", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--dir", help="work directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    return asyncio.run(_soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
