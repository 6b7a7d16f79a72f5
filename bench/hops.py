"""How far one message travels through the relay's modules from DATA to Graph's sendMail.

Why this module exists: the architecture issue asks for the hop count of one message from DATA to
sendMail, before and after the layout change. This measures it instead of reading it off the code:
a relay in direct mode (no spool, so nothing runs on other threads) against the sandbox, one
warm-up message (the token is then cached), then a profiler records every call into a `relay.*`
module (not the sandbox) from the moment the DATA hook is entered until the sandbox first runs
(it is answering the sendMail request). It prints:

- chain: the call stack from the DATA hook down to the last relay frame before the request went
  out, as relay modules (consecutive frames of one module folded into one);
- hops: the module boundaries that chain crosses, the message's way from DATA to sendMail;
- modules: every relay module that ran for the message, helpers included.

    python -m bench.hops
"""

from __future__ import annotations

import asyncio
import smtplib
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from bench import MAILBOX, RECIPIENT, relay_config_text, sandbox_world, write_secret
from relay.service import RelayService

try:  # the pipeline layout
    from relay.config.load import parse_config
except ImportError:  # the flat layout before it
    from relay.config import parse_config  # type: ignore[attr-defined,no-redef]


class CallPath:
    """Relay modules entered between the DATA hook and the sandbox's first frame."""

    def __init__(self) -> None:
        self.recording = False
        self.done = threading.Event()
        self.sequence: list[str] = []
        self.chain: list[str] = []

    def profile(self, frame: FrameType, event: str, _: Any) -> None:
        if event != "call" or self.done.is_set():
            return
        module = str(frame.f_globals.get("__name__", ""))
        if not self.recording:
            if frame.f_code.co_name == "handle_DATA" and module.startswith("relay."):
                self.recording = True
            else:
                return
        if module.startswith("relay.sandbox"):
            self.done.set()
            return
        if module.startswith("relay.") and (not self.sequence or self.sequence[-1] != module):
            self.sequence.append(module)
        if module.startswith("relay."):
            self.chain = _chain(frame)


def _chain(frame: FrameType | None) -> list[str]:
    """The relay modules on the stack from the DATA hook down to `frame`, folded."""
    modules: list[str] = []
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith("relay.") and (not modules or modules[-1] != module):
            modules.append(module)
        if frame.f_code.co_name == "handle_DATA":
            return modules[::-1]
        frame = frame.f_back
    return []


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            MAILBOX,
            [RECIPIENT],
            f"From: {MAILBOX}\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode(),
        )


async def measure() -> CallPath:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        async with sandbox_world(root) as sandbox:
            text = relay_config_text(
                sandbox,
                port=0,
                delivery="{mode: direct, inline_timeout: 10s}",
                secret_file=write_secret(root),
            )
            relay = RelayService(parse_config(text, base_dir=root))
            await relay.start()
            try:
                port = relay.listeners[0].port
                await asyncio.to_thread(send, port, "warm-up")
                path = CallPath()
                sys.setprofile(path.profile)
                try:
                    await asyncio.to_thread(send, port, "measured")
                finally:
                    sys.setprofile(None)
            finally:
                await relay.stop()
    return path


def main() -> int:
    path = asyncio.run(measure())
    modules = list(dict.fromkeys(path.sequence))
    print(f"chain: {' > '.join(m.removeprefix('relay.') for m in path.chain)}")
    print(f"hops: {len(path.chain) - 1}")
    print(f"modules ({len(modules)}): {' '.join(m.removeprefix('relay.') for m in modules)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
