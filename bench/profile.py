"""Sampling profile of the relay process with py-spy, summarised into the figures we check.

Why this module exists: "what dominates the hot path" must be answered with numbers taken from
the real child process under load, not guessed. py-spy attaches to the running relay (no code in
the relay, `--nonblocking` so the relay is not paused), records CPU-active stacks per thread, and
this module reads its collapsed-stack output: where the event-loop thread spends its samples,
what the worker threads do, and the hot-path checks (token cache lookups, TLS handshakes, config
parsing, spool file I/O on the loop thread).

py-spy is optional: `pip install py-spy` into the virtualenv; without it the profile is skipped.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Profile", "Profiler", "parse_collapsed", "py_spy"]

_THREAD = re.compile(r"^thread \((?:0x)?[0-9A-Fa-f]+\): ?(.*)$")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
_TRIM = re.compile(r"^.*/(site-packages|lib/python3\.\d+)/|^.*/(?=relay/|bench/)")

# (label, regular expression on a frame "function (file:line)"): what the hot-path checks look
# for in the stacks. A match anywhere in a sample's stack counts the sample.
CHECKS: tuple[tuple[str, str], ...] = (
    ("token: TokenProvider.get_token / _acquire", r"TokenProvider\.get_token|_acquire \(relay/tok"),
    ("token: MSAL acquire_token_for_client (worker threads)", r"acquire_token_for_client"),
    ("TLS handshake (ssl do_handshake)", r"do_handshake"),
    ("config parsing (parse_config / load_config / model_validate)",
     r"parse_config|load_config|model_validate"),
    ("spool I/O (relay/spool*.py)", r"\(relay/spool(_entry)?\.py"),
    ("logging (logging/__init__.py)", r"\(logging/__init__\.py"),
    ("SMTP protocol (aiosmtpd)", r"\(aiosmtpd/"),
    ("HTTP client (aiohttp)", r"\(aiohttp/"),
    ("base64 of the MIME for sendMail", r"send_mime \(relay/graph"),
)  # fmt: skip


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass(slots=True)
class Profile:
    """Collapsed stacks of the CPU-active samples, per thread name."""

    threads: Counter[str] = field(default_factory=Counter)  # samples per thread name
    stacks: list[tuple[str, tuple[str, ...], int]] = field(default_factory=list)
    seconds: float = 0.0
    rate: int = 0

    def total(self) -> int:
        return sum(self.threads.values())

    def inclusive(self, thread: str | None = None) -> Counter[str]:
        """Samples whose stack contains each frame (counted once per sample)."""
        counts: Counter[str] = Counter()
        for name, frames, n in self.stacks:
            if thread is None or name == thread:
                for frame in set(frames):
                    counts[frame] += n
        return counts

    def leaves(self, thread: str | None = None) -> Counter[str]:
        """Samples per innermost Python frame (where the time is spent, self time)."""
        counts: Counter[str] = Counter()
        for name, frames, n in self.stacks:
            if (thread is None or name == thread) and frames:
                counts[frames[-1]] += n
        return counts

    def matching(self, pattern: str, thread: str | None = None) -> int:
        compiled = re.compile(pattern)
        return sum(
            n
            for name, frames, n in self.stacks
            if (thread is None or name == thread) and any(compiled.search(f) for f in frames)
        )

    def share(self, samples: int) -> str:
        """`samples` as thread-milliseconds and per cent of everything sampled. py-spy counts a
        thread inside fsync as active, so for spool threads this is time, not only CPU."""
        total = self.total() or 1
        ms = samples * 1000 / self.rate if self.rate else 0.0
        return f"{samples} samples ({ms:.0f} thread-ms, {100 * samples / total:.1f} %)"


def parse_collapsed(text: str) -> Profile:
    """py-spy's `--format raw --threads` output: `thread (ID): NAME;frame;frame N` lines."""
    profile = Profile()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = "?"
        head = _THREAD.match(parts[0])
        if head is not None:
            thread = _thread_kind(head.group(1) or "?")
            parts = parts[1:]
        frames = tuple(_short(frame) for frame in parts)
        profile.threads[thread] += int(count)
        profile.stacks.append((thread, frames, int(count)))
    return profile


def _thread_kind(name: str) -> str:
    """Group pool threads: `asyncio_3` -> `asyncio_*`, `msal_0` -> `msal_*`."""
    return re.sub(r"_\d+$", "_*", name.strip())


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = _TRIM.sub("", match.group("file"))
    return f"{match.group('function')} ({path}:{match.group('line')})"


class Profiler:
    """`py-spy record` attached to `pid` until `stop()`; `rate` samples per second."""

    def __init__(self, executable: str, pid: int, output: Path, rate: int = 250) -> None:
        self._command = [
            executable, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
            "--threads", "--nonblocking", "--full-filenames", "--output", str(output),
        ]  # fmt: skip
        self._output = output
        self._rate = rate
        self._process: asyncio.subprocess.Process | None = None
        self._started = 0.0

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.3)  # attach before the load starts

    async def stop(self) -> Profile:
        """SIGINT (py-spy then writes its file) and the parsed profile."""
        assert self._process is not None
        seconds = asyncio.get_running_loop().time() - self._started
        self._process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            _, errors = await self._process.communicate()
        if not self._output.exists():
            raise RuntimeError(f"py-spy wrote no profile: {errors.decode(errors='replace')}")
        profile = parse_collapsed(self._output.read_text())
        profile.seconds = seconds
        profile.rate = self._rate
        return profile
