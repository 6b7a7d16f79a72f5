"""RESULTS.md for the standard benchmark set: tables, targets met or not, profile findings.

Why this module exists: the figures and their judgement are kept apart from the code that
measures them, so the wording of a target and its threshold live in one place (TARGETS below)
and the Markdown can be checked without running a benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.procfs import Machine
from bench.profile import CHECKS, Profile

__all__ = ["Outcome", "render"]

MIB = 1024 * 1024
MAILBOX_LIMIT = 4  # Graph's MailboxConcurrency: concurrent requests per app and mailbox
SUSTAINED = 0.9  # "sustained 4 in flight": all slots busy for this share of the busy time


@dataclass(frozen=True, slots=True)
class Outcome:
    """The figures of one scenario (times in seconds, memory in KiB)."""

    name: str
    group: str
    mode: str
    concurrency: int
    mailboxes: int
    graph_latency: float
    message_bytes: int
    tried: int
    accepted: int
    others: tuple[str, ...]
    accepted_per_second: float
    recorded_seconds: float
    p50: float
    p90: float
    p99: float
    overhead_p50: float
    overhead_p99: float
    idle_rss_kib: int
    peak_rss_kib: int
    token_requests: int
    max_in_flight: Mapping[str, int]
    full_share: float | None
    throttled: int
    graph_requests: int
    connections: int
    relay_errors: int

    def line(self) -> str:
        return (
            f"{self.name}: {self.accepted}/{self.tried} accepted, "
            f"{self.accepted_per_second:.0f}/s, recorded after {self.recorded_seconds:.2f} s, "
            f"p99 {self.p99 * 1000:.1f} ms (overhead {self.overhead_p99 * 1000:.1f}), "
            f"RSS idle {self.idle_rss_kib / 1024:.0f} peak {self.peak_rss_kib / 1024:.0f} MiB, "
            f"tokens {self.token_requests}, in flight {_in_flight(self)}, 429 {self.throttled}"
        )


HEADER = (
    "| scenario | 250 / sent | accepted msg/s | all recorded (s) | p50 / p90 / p99 ms "
    "| overhead p50 / p99 ms | RSS idle / peak MiB | token req. | max in flight / mailbox "
    "| all 4 busy | 429s | TLS conns |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def _in_flight(outcome: Outcome) -> str:
    values = sorted(outcome.max_in_flight.values(), reverse=True)
    return ", ".join(str(v) for v in values) or "0"


def _row(o: Outcome) -> str:
    overhead = f"{_ms(o.overhead_p50)} / {_ms(o.overhead_p99)}"
    if o.mode == "queue" or o.graph_latency == 0:
        overhead += "" if o.mode == "queue" else " (Graph 0 ms)"
    full = "-" if o.full_share is None else f"{o.full_share:.0%}"
    rejected = f" ({'; '.join(o.others)})" if o.others else ""
    return (
        f"| {o.name} | {o.accepted} / {o.tried}{rejected} | {o.accepted_per_second:.0f} "
        f"| {o.recorded_seconds:.2f} | {_ms(o.p50)} / {_ms(o.p90)} / {_ms(o.p99)} "
        f"| {overhead} | {o.idle_rss_kib / 1024:.0f} / {o.peak_rss_kib / 1024:.0f} "
        f"| {o.token_requests} | {_in_flight(o)} | {full} | {o.throttled} | {o.connections} |"
    )


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _targets(outcomes: Sequence[Outcome], skipped: Mapping[str, str]) -> list[str]:
    lines = ["| target | result | verdict |", "|---|---|---|"]
    queue8 = [
        o for o in outcomes if o.group == "modes" and o.mode == "queue" and o.concurrency == 8
    ]
    for o in queue8:
        lines.append(
            f"| queue, 2 KB, C=8, fsync on: >= 400 messages/s accepted "
            f"| {o.accepted_per_second:.0f} msg/s | {_verdict(o.accepted_per_second >= 400)} |"
        )
        lines.append(
            f"| queue, 2 KB, C=8: p99 relay overhead < 20 ms | {_ms(o.overhead_p99)} ms "
            f"| {_verdict(o.overhead_p99 < 0.020)} |"
        )
    if outcomes:
        worst = max(outcomes, key=lambda o: o.idle_rss_kib)
        lines.append(
            f"| RSS < 60 MiB idle (largest idle RSS over all runs) "
            f"| {worst.idle_rss_kib / 1024:.1f} MiB ({worst.name}) "
            f"| {_verdict(worst.idle_rss_kib < 60 * 1024)} |"
        )
    big = [o for o in outcomes if o.group == "large" and o.message_bytes >= 90 * MIB]
    for o in big:
        ratio = o.peak_rss_kib * 1024 / o.message_bytes
        lines.append(
            f"| peak RSS < 2x message size for a 100 MiB message "
            f"| {o.peak_rss_kib / 1024:.0f} MiB for {o.message_bytes / MIB:.0f} MiB "
            f"({ratio:.2f}x) | {_verdict(ratio < 2)} |"
        )
    for name, why in skipped.items():
        if "100" in name:
            lines.append(f"| peak RSS < 2x message size for a 100 MiB message | {why} | n/a |")
    if outcomes:
        tokens = sorted({o.token_requests for o in outcomes})
        lines.append(
            "| token endpoint: 1 request per auth object per token lifetime at any load "
            f"| {', '.join(map(str, tokens))} per run (1 auth object, {len(outcomes)} runs, up to "
            f"{max(o.tried for o in outcomes)} messages each) | {_verdict(tokens == [1])} |"
        )
    slow = [o for o in outcomes if o.graph_latency >= 0.2 and o.mailboxes == 1]
    for o in slow:
        peak = max(o.max_in_flight.values(), default=0)
        share = o.full_share or 0.0
        ok = peak == MAILBOX_LIMIT and share >= SUSTAINED and o.throttled == 0
        lines.append(
            f"| Graph 200 ms, 1 mailbox ({o.name}): sustained 4 in flight, zero 429 "
            f"| max {peak} in flight, all 4 busy {share:.0%} of the busy time, "
            f"{o.throttled} x 429 | {_verdict(ok)} |"
        )
    return lines


def _profile(profile: Profile, run: Outcome | None) -> list[str]:
    messages = run.tried if run is not None else 0
    lines = [
        f"py-spy (active samples, idle threads left out; a thread in fsync counts as active; "
        f"{profile.rate} Hz, non-blocking) attached to the relay "
        f"for {profile.seconds:.1f} s"
        + (
            f" while it accepted {messages} messages in queue mode at C=8: {run.line()}"
            if run
            else ""
        )
        + ".",
        "",
        "CPU by thread:",
        "",
    ]
    for thread, samples in profile.threads.most_common():
        lines.append(f"- `{thread}`: {profile.share(samples)}")
    lines += ["", "Hot-path checks (samples whose stack contains the frame, all threads):", ""]
    for label, pattern in CHECKS:
        lines.append(f"- {label}: {profile.share(profile.matching(pattern))}")
    on_loop = profile.matching(
        r"\(relay/spool(_entry)?\.py|\(pathlib\.py|\(shutil\.py", "MainThread"
    )
    lines.append(f"- file I/O on the event-loop thread (spool, pathlib): {profile.share(on_loop)}")
    if run is not None:
        lines += [
            "",
            f"- token requests to Entra during the run: {run.token_requests} "
            f"for {run.tried} messages (+ warm-up)",
            f"- TCP (= TLS) connections from the relay to the sandbox: {run.connections} "
            f"for {run.graph_requests} Graph requests",
        ]
    lines += ["", "Event-loop thread (`MainThread`), inclusive, relay and library frames:", ""]
    inclusive = profile.inclusive("MainThread")
    boring = ("<module>", "run (asyncio/runners", "run_until_complete", "run_forever",
              "_run_once", "Handle._run", "_run (asyncio/events", "main (relay/",
              "run (relay/cli", "_run_module", "serve (relay/cli")  # fmt: skip
    shown = 0
    for frame, samples in inclusive.most_common():
        if any(b in frame for b in boring):
            continue
        lines.append(f"- `{frame}`: {profile.share(samples)}")
        shown += 1
        if shown == 15:
            break
    lines += ["", "Event-loop thread, self time (innermost Python frame):", ""]
    for frame, samples in profile.leaves("MainThread").most_common(12):
        lines.append(f"- `{frame}`: {profile.share(samples)}")
    lines += ["", "Other threads, self time:", ""]
    others = [
        (frame, n)
        for thread in profile.threads
        if thread != "MainThread"
        for frame, n in profile.leaves(thread).most_common(4)
    ]
    for frame, samples in sorted(others, key=lambda x: -x[1])[:8]:
        lines.append(f"- `{frame}`: {profile.share(samples)}")
    return lines


def render(
    machine: Machine,
    groups: Mapping[str, str],
    outcomes: Sequence[Outcome],
    skipped: Mapping[str, str],
    profile: Profile | None,
    profiled: Outcome | None,
    *,
    quick: bool = False,
) -> str:
    out = [
        "# Benchmark results",
        "",
        "Written by `python -m bench.standard`"
        + (" --quick (a quarter of the messages; not the reference run)" if quick else "")
        + "; do not edit by hand. Every scenario: a fresh sandbox (fake Entra ID + Graph) in "
        "the benchmark process and a fresh relay child process (`python -m relay serve`), "
        "spool with fsync on, 10 warm-up messages per sender before the measured load.",
        "",
        "## Machine",
        "",
        machine.markdown(),
        "",
        "## How to read the tables",
        "",
        "- **accepted msg/s**: 250 replies per second of the load; **all recorded**: from the "
        "first MAIL of the load until the sandbox's Graph recorded every accepted message.",
        "- **p50 / p90 / p99**: SMTP transaction latency, MAIL FROM to the reply after the "
        "final dot, on an open connection. **overhead**: the same minus the sandbox's Graph "
        "latency for replies that waited for Graph (`delivered`); in queue mode, and for "
        "hybrid messages answered `queued`, it is the whole latency.",
        "- **RSS**: the relay's VmRSS after start (idle) and VmHWM at the end of the run (peak), "
        "MiB. **token req.**: token requests the sandbox's Entra answered (1 auth object). "
        "**max in flight / mailbox**: the sandbox's peak of concurrent sendMail per mailbox; "
        "**all 4 busy**: share of the mailbox's busy time (sampled every 5 ms, first to last "
        f"request) with 4 in flight; the target counts >= {SUSTAINED:.0%} as sustained. "
        "**429s**: sendMail answers 429 (the sandbox's MailboxConcurrency rule). "
        "**TLS conns**: distinct TCP connections from the relay to the sandbox (all HTTPS), "
        "sampled every 50 ms from /proc (a lower bound).",
        "",
    ]
    for group, title in groups.items():
        rows = [o for o in outcomes if o.group == group]
        missing = {name: why for name, why in skipped.items() if group == "large"}
        if not rows and not missing:
            continue
        out += [f"## {title}", "", HEADER]
        out += [_row(o) for o in rows]
        out += [f"| {name} | {why} |" + " |" * 10 for name, why in missing.items()]
        if group == "large":
            out += [""] + [
                f"- {o.name}: {o.message_bytes / MIB:.1f} MiB over SMTP, peak RSS "
                f"{o.peak_rss_kib / 1024:.0f} MiB = {o.peak_rss_kib * 1024 / o.message_bytes:.2f}"
                f"x the message; {o.graph_requests} Graph requests"
                for o in rows
            ]
        out.append("")
    out += ["## Targets", "", *_targets(outcomes, skipped), ""]
    out += ["## Profile of the hot path (queue, 2 KB, C=8)", ""]
    out += _profile(profile, profiled) if profile is not None else ["py-spy not installed."]
    errors = sum(o.relay_errors for o in outcomes)
    out += ["", f"Relay ERROR lines logged over all runs: {errors}.", ""]
    return "\n".join(out)


def put_section(text: str, name: str, body: str) -> str:
    """`text` with the section `name` (between its markers) replaced by `body`, or appended:
    benchmarks outside the standard set keep their figures in RESULTS.md this way."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return text.rstrip() + "\n\n" + block


def kept_sections(old: str, new: str) -> str:
    """`new` with every marked section of `old` carried over (the standard set rewrites the
    file; `python -m bench.budgets --write` owns its own section)."""
    for chunk in old.split("<!-- section:")[1:]:
        name, _, rest = chunk.partition(" -->")
        body, found, _ = rest.partition(f"<!-- /section:{name} -->")
        if found and f"<!-- section:{name} -->" not in new:
            new = put_section(new, name, body.strip("\n"))
    return new
