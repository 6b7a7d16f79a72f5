"""SIGHUP reload (DESIGN §9): new clients, routes, secrets and certificates take effect without
dropping a connection or a message; an invalid file is rejected and the old one stays."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import ssl
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from relay.sandbox import Sandbox
from tests.conftest import (
    CLIENT_ID,
    MAILBOX,
    SECRET,
    TENANT,
    RelayFactory,
    TlsFiles,
    asmtp_send,
    build_config,
    message,
    relay_config_text,
)
from tests.integration.test_cli import child_env, free_port, wait_for_line, write_config

TWO_CLIENTS = """\
- name: local
  networks: [127.0.0.1/32]
  senders: ["*@contoso.com"]
- name: second
  networks: [127.0.0.2/32]
  senders: ["*@contoso.com"]
"""


async def test_reload_admits_a_new_client_for_the_next_transaction(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A client added by reload may send at once; nothing had to reconnect or restart."""
    relay = await start_relay()
    port = relay.listeners[0].port
    assert (await asmtp_send(port, message(), source="127.0.0.2")).code == 554
    notes = relay.reload(build_config(relay_config_text(sandbox, clients=TWO_CLIENTS), tmp_path))
    assert notes == []
    assert (await asmtp_send(port, message(), source="127.0.0.2")).code == 250
    assert relay.listeners[0].port == port


async def test_reload_keeps_listeners_and_says_a_restart_is_needed(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Listener changes cannot apply under a running process: noted, old sockets kept."""
    relay = await start_relay()
    before = relay.listeners
    notes = relay.reload(
        build_config(
            relay_config_text(sandbox, listeners="[{address: 127.0.0.1, port: 0}, {port: 0}]"),
            tmp_path,
        )
    )
    assert notes == ["smtp.listeners changed: restart to apply"]
    assert relay.listeners == before


async def test_reload_picks_up_a_rotated_client_secret(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path
) -> None:
    """After the secret is rotated in Entra, mail fails (451 4.7.0) until the relay reloads
    the new secret; then it flows again."""
    relay = await start_relay()
    port = relay.listeners[0].port
    assert (await asmtp_send(port, message())).code == 250
    sandbox.remove_app(TENANT, CLIENT_ID)
    sandbox.add_app(TENANT, CLIENT_ID, secret="rotated-secret-value")
    sandbox.revoke_tokens()
    assert (await asmtp_send(port, message())).text.startswith("4.7.0")
    relay.reload(build_config(relay_config_text(sandbox), tmp_path, secret="rotated-secret-value"))
    assert (await asmtp_send(port, message())).code == 250


def peer_certificate_serial(port: int, context: ssl.SSLContext) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=context)
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_reload_serves_a_renewed_certificate_on_the_next_handshake(
    start_relay: RelayFactory, sandbox: Sandbox, relay_tls: TlsFiles, tmp_path: Path
) -> None:
    """Renewing the relay's certificate in place and reloading changes what new STARTTLS
    handshakes present."""
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(relay_tls.cert_file.read_bytes())
    key_file.write_bytes(relay_tls.key_file.read_bytes())
    listeners = "[{address: 127.0.0.1, port: 0, tls: starttls}]"
    tls = f"tls: {{cert_file: {cert_file}, key_file: {key_file}}}"
    relay = await start_relay(listeners=listeners, smtp_extra=tls)
    port = relay.listeners[0].port
    trust = relay_tls.client_context()
    first = await asyncio.to_thread(peer_certificate_serial, port, trust)
    renewed = relay_tls.ca.issue_cert("localhost", "127.0.0.1")
    renewed.private_key_pem.write_to_path(str(key_file))
    renewed.cert_chain_pems[0].write_to_path(str(cert_file))
    relay.reload(
        build_config(relay_config_text(sandbox, listeners=listeners, smtp_extra=tls), tmp_path)
    )
    second = await asyncio.to_thread(peer_certificate_serial, port, trust)
    renewed_serial = x509.load_pem_x509_certificate(
        renewed.cert_chain_pems[0].bytes()
    ).serial_number
    assert first != second
    assert second == renewed_serial


class Load:
    """Sends numbered messages from threads until stopped; remembers every 250."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: set[str] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.count = 0

    def run(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            subject = f"load {worker}-{n}"
            n += 1
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                    client.sendmail(MAILBOX, ["bob@partner.example"], message(subject=subject))
            except (smtplib.SMTPException, OSError):
                continue  # not acknowledged: the client keeps it, not the relay's to lose
            with self.lock:
                self.accepted.add(subject)
                self.count += 1


async def test_sighup_under_load_loses_nothing_and_rejects_a_broken_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Two reloads and one invalid file while four clients send: every 250 is delivered, the
    broken file is logged and ignored, and SIGTERM still exits 0."""
    port = free_port()
    listeners = f"[{{address: 127.0.0.1, port: {port}}}]"
    delivery = "{mode: hybrid, spool_dir: spool, inline_timeout: 2s}"
    path = write_config(sandbox, tmp_path, listeners=listeners, delivery=delivery)
    good = path.read_text()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    assert process.stderr is not None
    load = Load(port)
    threads = [threading.Thread(target=load.run, args=(w,)) for w in range(4)]
    try:
        await wait_for_line(process.stderr, "listening on")
        for thread in threads:
            thread.start()
        for text in (good.replace("hostname: relay.test", "hostname: relay2.test"), good):
            path.write_text(text)
            process.send_signal(signal.SIGHUP)
            await wait_for_line(process.stderr, "configuration reloaded")
        path.write_text(good.replace("mailbox: sender", "mailbox: [broken"))
        process.send_signal(signal.SIGHUP)
        await wait_for_line(process.stderr, "reload rejected")
        # still accepting and delivering under the configuration that stayed in force
        await sandbox.wait_for_mail(len(sandbox.received) + 8, timeout=30)
        load.stop.set()
        await asyncio.gather(*(asyncio.to_thread(t.join) for t in threads))
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await process.wait() == 0
    finally:
        load.stop.set()
        if process.returncode is None:
            process.kill()
            await process.wait()
    path.write_text(good)
    # Whatever was queued at SIGTERM is delivered by the next start on the same spool.
    restarted = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "-c", str(path),
        stderr=asyncio.subprocess.PIPE, env=child_env(),
    )  # fmt: skip
    try:
        await sandbox.wait_until(
            lambda: load.accepted <= {m.subject for m in sandbox.received}, timeout=60
        )
    finally:
        restarted.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await restarted.wait()
    assert len(load.accepted) >= 8
    assert SECRET not in (tmp_path / "relay.yaml").read_text()


# --- routes are found again by sender at each attempt (#10 item 3) ----------------------------

SECOND_CLIENT_ID = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d"
OPS = "ops@contoso.com"
QUEUE_SLOWLY = "{mode: queue, retry: {first: 1h, max: 1h, lifetime: 5d}}"
INSERTED_AND_REORDERED = f"""\
- senders: ["{OPS}"]
  name: operations
  auth_object: second
  mailbox: ops-box@contoso.com
- senders: ["*@contoso.com"]
  name: staff
  auth_object: contoso
  mailbox: shared@contoso.com
  save_to_sent_items: false
"""


def with_second_auth_object(text: str, sandbox: Sandbox) -> str:
    """`text` with a second auth object, `second`, for another app in the same tenant."""
    second = "\n".join(
        [
            "  second:",
            f"    tenant_id: {TENANT}",
            f"    client_id: {SECOND_CLIENT_ID}",
            "    client_secret_env: RELAY_TEST_SECRET",
            f"    authority_host: {sandbox.authority_host}",
            f"    graph_endpoint: {sandbox.graph_endpoint}",
            f"    ca_file: {sandbox.ca_file}",
            "",
        ]
    )
    return text.replace("\nroutes:\n", f"\n{second}routes:\n", 1)


async def test_queued_mail_takes_the_route_its_sender_matches_after_a_reload(
    start_relay: RelayFactory, sandbox: Sandbox, tmp_path: Path, log_records: Any
) -> None:
    """Two messages wait in the queue; a reload inserts a route before the one that took them
    and changes that one. Each then goes out through the route its sender matches now: its
    auth object, its mailbox and its save_to_sent_items, never the route at its old position."""
    sandbox.add_app(TENANT, SECOND_CLIENT_ID, secret=SECRET)
    sandbox.add_mailbox(OPS)
    sandbox.add_mailbox("shared@contoso.com", send_as=[MAILBOX])
    sandbox.add_mailbox("ops-box@contoso.com", send_as=[OPS])
    sandbox.faults.fail_graph(503, "ServiceUnavailable", "try later", times=2)
    relay = await start_relay(delivery=QUEUE_SLOWLY)
    port = relay.listeners[0].port
    ids = []
    for sender in (MAILBOX, OPS):
        outcome = await asmtp_send(port, message(sender=sender), sender=sender)
        assert outcome.code == 250
        ids.append(outcome.text.rsplit(" ", 1)[-1])
    assert relay.store is not None
    store = relay.store

    async def both_deferred() -> bool:
        found = [await store.find(qid) for qid in ids]
        return all(f is not None and f[0] == "queue" and f[1].attempts == 1 for f in found)

    await until(both_deferred)
    text = relay_config_text(sandbox, routes=INSERTED_AND_REORDERED, delivery=QUEUE_SLOWLY)
    assert relay.reload(build_config(with_second_auth_object(text, sandbox), tmp_path)) == []
    for qid in ids:  # `queue retry`: due now instead of in an hour
        assert await store.retry(qid)
    relay.delivery.wake()
    mails = await sandbox.wait_for_mail(2)
    by_mailbox = {m.mailbox: m for m in mails}
    assert set(by_mailbox) == {"shared@contoso.com", "ops-box@contoso.com"}
    staff = by_mailbox["shared@contoso.com"]
    assert (staff.kind, staff.save_to_sent_items, staff.from_address) == ("json", False, MAILBOX)
    assert by_mailbox["ops-box@contoso.com"].kind == "mime"

    def delivered() -> dict[str, tuple[str, str]]:
        records = log_records.records
        return {
            r.queue_id: (r.route, r.auth_object)
            for r in records
            if getattr(r, "event", "") == "delivered"
        }

    async def both_delivered() -> bool:
        return len(delivered()) == 2

    await until(both_delivered)
    assert delivered() == {ids[0]: ("staff", "contoso"), ids[1]: ("operations", "second")}


async def until(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll an async condition with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
