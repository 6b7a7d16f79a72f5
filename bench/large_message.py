"""Peak memory and time of one large message through the relay's draft + upload-session path.

Why this module exists: the large-message path promises not to hold a 100 MB message as several
full copies (DESIGN §7). This runs the relay as a real child process (`python -m relay serve`)
against the in-process sandbox, sends one message with a big attachment over SMTP, and reads the
relay's peak resident set (VmHWM in /proc/PID/status) before and after:

    python -m bench.large_message --size-mb 100 --mode hybrid

Figures printed: SMTP DATA time (until the client's 250), time until the sandbox recorded the
sent message, the relay's VmHWM when idle and after the message, and the message size.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import random
import smtplib
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    CLIENT_ID,
    MAILBOX,
    RECIPIENT,
    SECRET,
    TENANT,
    relay_config_text,
    sandbox_world,
    write_secret,
)
from bench.crash_soak import RelayProcess, free_port

__all__ = ["build_message", "main", "vm_hwm_kib"]

MB = 1024 * 1024


def vm_hwm_kib(pid: int) -> int:
    """The peak resident set size of process `pid` in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


def build_message(size: int, seed: int = 1) -> tuple[bytes, str]:
    """A message with a short text and one `size`-byte attachment; and its SHA-256."""
    data = random.Random(seed).randbytes(size)
    digest = hashlib.sha256(data).hexdigest()
    head = (
        f"From: Scanner <{MAILBOX}>\r\nTo: {RECIPIENT}\r\nSubject: bench large\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="bench"\r\n\r\n'
        "--bench\r\nContent-Type: text/plain\r\n\r\nSee attachment.\r\n"
        '--bench\r\nContent-Type: application/octet-stream; name="data.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return head + body + b"\r\n--bench--\r\n", digest


def _send(port: int, raw: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=600) as client:
        client.ehlo("bench.test")
        client.mail(MAILBOX)
        client.rcpt(RECIPIENT)
        code, text = client.data(raw)
        return code, text.decode()


async def run(size_mb: int, mode: str) -> int:
    with tempfile.TemporaryDirectory(prefix="large-bench-") as folder:
        state = Path(folder)
        (state / "sandbox").mkdir()
        async with sandbox_world(state / "sandbox") as sandbox:
            sandbox.add_app(TENANT, CLIENT_ID, secret=SECRET, roles=("Mail.Send", "Mail.ReadWrite"))
            port = free_port()
            delivery = f"{{mode: {mode}, inline_timeout: 300s, spool_dir: {state / 'spool'}}}"
            text = relay_config_text(
                sandbox, port=port, delivery=delivery, secret_file=write_secret(state)
            )
            text = text.replace("  hostname: relay.bench\n", "  hostname: relay.bench\n"
                                "  max_message_size: 210MiB\n")  # fmt: skip
            text += "admin: {address: 127.0.0.1, port: 0}\n"
            config = state / "config.yaml"
            config.write_text(text)
            relay = RelayProcess(config)
            await relay.start()
            try:
                assert relay.process is not None
                pid = relay.process.pid
                idle = vm_hwm_kib(pid)
                raw, digest = build_message(size_mb * MB)
                print(f"message: {len(raw) / MB:.1f} MiB ({size_mb} MiB attachment), mode {mode}")
                started = time.monotonic()
                code, reply = await asyncio.to_thread(_send, port, raw)
                del raw
                answered = time.monotonic() - started
                await sandbox.wait_for_mail(1, timeout=600)
                delivered = time.monotonic() - started
                peak = vm_hwm_kib(pid)
            finally:
                await relay.terminate()
                await relay.aclose()
            mail = sandbox.received[0]
            ok = [a.sha256 for a in mail.attachments] == [digest]
            print(f"SMTP reply: {code} {reply}")
            print(f"client answered after {answered:.1f} s; Graph send after {delivered:.1f} s")
            print(f"relay VmHWM: idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")
            print(f"attachment SHA-256 matches: {ok}; upload PUTs: {dict(sandbox.upload_statuses)}")
            return 0 if ok and code == 250 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100, help="attachment size in MiB")
    parser.add_argument("--mode", choices=["hybrid", "queue", "direct"], default="hybrid")
    args = parser.parse_args(argv)
    return asyncio.run(run(args.size_mb, args.mode))


if __name__ == "__main__":
    sys.exit(main())
