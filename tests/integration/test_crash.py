"""Crash safety of the spool (DESIGN §6, §10): the relay as a real process, killed under load.

A 250 is a promise (RFC 5321 §6.1). These tests run `python -m relay serve` as a child process
against the in-process sandbox, keep several SMTP connections busy with messages whose subjects
are unique, and then (a) SIGKILL it at random moments and restart it on the same spool and
port, or (b) SIGTERM it mid-burst. Every subject that got a 250 must reach Graph in the end;
duplicates are allowed (at-least-once, §5) and counted. What did not get a 250 (4xx, reset
connection) is the client's to retry and is only counted.

The kill moments come from `random.Random(seed)`; the seed is printed, and RELAY_CRASH_SEED
replays a run. `pytest -s` shows the figures; `python -m bench.crash_soak` is the long run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from bench import UNPACED
from bench.crash_soak import RelayProcess, SoakSettings, run_soak, spool_tree
from bench.loadgen import LoadConfig, LoadGenerator
from relay.sandbox import Sandbox
from tests.conftest import MAILBOX
from tests.integration.test_cli import free_port, write_config

RETRY = "retry: {first: 100ms, max: 500ms, lifetime: 1h}, " + UNPACED


def delivery(mode: str, spool: Path) -> str:
    return f"{{mode: {mode}, inline_timeout: 200ms, spool_dir: {spool}, {RETRY}}}"


def listener(port: int) -> str:
    return f"[{{address: 127.0.0.1, port: {port}}}]"


def crash_seed() -> int:
    seed = os.environ.get("RELAY_CRASH_SEED")
    return int(seed) if seed else random.SystemRandom().randrange(2**32)


@pytest.mark.parametrize("mode", ["hybrid", "queue"])
async def test_kill_9_under_load_loses_no_acknowledged_message(
    sandbox: Sandbox, tmp_path: Path, mode: str
) -> None:
    """SIGKILL the relay 6 times at random moments (and now and then again while it starts)
    while 6 connections send and Graph answers 503 to everything, restarting it on the same
    spool each time; then Graph recovers and every message that got a 250 is delivered.

    Entries the spool quarantined (held at 3 kills) are not lost but parked for an operator;
    the run releases them with `relay queue retry` as an operator would (and restarts the
    relay gracefully so it sees them at once), and reports them.
    """
    seed = crash_seed()
    print(f"\nkill -9 under load, mode={mode}, seed={seed} (RELAY_CRASH_SEED={seed} replays)")
    port, spool = free_port(), tmp_path / "spool"
    config = write_config(
        sandbox, tmp_path, listeners=listener(port), delivery=delivery(mode, spool)
    )
    settings = SoakSettings(
        kills=6,
        seed=seed,
        concurrency=6,
        size=1024,
        graph="failing",
        acks_between_kills=(3, 25),
        max_kill_delay=0.3,
        startup_kill_ratio=0.2,
        drain_timeout=25.0,
    )

    result = await run_soak(
        sandbox,
        config_path=config,
        spool_dir=spool,
        port=port,
        mode=mode,
        settings=settings,
        mail_from=MAILBOX,
    )

    print(result.summary())
    evidence = f"seed {seed}\n{result.summary()}\n{result.diagnostics}"
    assert result.kills == settings.kills
    assert result.acknowledged > 0, evidence
    assert result.lost == [], evidence
    assert result.dead == {}, evidence
    assert result.restart_exit in (None, 0), evidence
    assert result.final_exit == 0, evidence


@pytest.mark.parametrize("mode", ["hybrid", "queue"])
async def test_sigterm_mid_burst_exits_0_and_loses_nothing(
    sandbox: Sandbox, tmp_path: Path, mode: str
) -> None:
    """SIGTERM while 8 connections send a burst of 60 messages to a healthy but slow Graph
    (0.3 s per sendMail): the relay exits 0 within 30 s with nothing left claimed in active/,
    and after a restart every message that got a 250 reaches Graph."""
    port, spool = free_port(), tmp_path / "spool"
    config = write_config(
        sandbox, tmp_path, listeners=listener(port), delivery=delivery(mode, spool)
    )
    sandbox.faults.graph_latency(0.3)
    relay = RelayProcess(config)
    load = LoadGenerator(
        LoadConfig(
            port=port, concurrency=8, size=1024, mail_from=MAILBOX, subject_prefix=f"term-{mode}"
        )
    )
    try:
        await relay.start()
        burst = asyncio.create_task(load.run(count=60))
        await load.wait_accepted(8, timeout=30)
        asked = time.perf_counter()
        code = await relay.terminate(timeout=30)
        stopped_in = time.perf_counter() - asked
        assert code == 0, relay.log()
        async with asyncio.timeout(30):
            report = await burst
        held = sorted(p.name for p in (spool / "active").iterdir())
        assert held == [], f"claimed entries left behind by a graceful stop\n{spool_tree(spool)}"
        delivered_before_restart = len(sandbox.received)

        await relay.start()
        acked = set(load.accepted_subjects)
        seen: Counter[str] = Counter()

        def all_delivered() -> bool:
            seen.clear()
            seen.update(m.subject for m in sandbox.received)
            return acked <= seen.keys()

        try:
            await sandbox.wait_until(all_delivered, timeout=30)
        except TimeoutError:
            all_delivered()
            pytest.fail(
                f"lost {sorted(acked - seen.keys())}\n{report.summary()}\n{spool_tree(spool)}\n"
                f"{relay.log(80)}"
            )
        print(
            f"\nSIGTERM mid-burst, mode={mode}: exit {code} after {stopped_in:.2f} s; "
            f"{len(report.transactions)} tried, {len(acked)} acknowledged "
            f"({dict(report.outcome_counts())}); delivered before the restart "
            f"{delivered_before_restart}, after restart {len(seen)} unique, lost 0, "
            f"duplicates {sum(seen.values()) - len(seen)}"
        )
        assert await relay.terminate(timeout=30) == 0
    finally:
        await relay.aclose()
