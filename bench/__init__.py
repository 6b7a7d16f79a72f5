"""Benchmarks and soak runs that print figures (DESIGN §2 `bench/`); not part of the test suite.

Why this module holds code: every script needs the same world the test suite uses, a sandbox
(fake Entra ID + Graph) with one tenant, one app and one licensed mailbox, and a relay
configuration pointing at it. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from relay.sandbox import Sandbox, SandboxLimits

__all__ = [
    "CLIENT_ID",
    "MAILBOX",
    "RECIPIENT",
    "SECRET",
    "TENANT",
    "relay_config_text",
    "sandbox_world",
    "write_secret",
]

TENANT = "5b2e4c1a-7d3f-4e8a-9b0c-1d2e3f4a5b6c"
CLIENT_ID = "8c7d6e5f-4a3b-4c2d-9e1f-0a9b8c7d6e5f"
SECRET = "Bench~sandbox-secret-value-not-real"  # noqa: S105 - the fake app's, in the sandbox
MAILBOX = "scanner@contoso.com"
# The speed benchmarks measure the relay, not Microsoft's sending limits: they lift the
# mailbox budgets out of the way (in the relay and in the sandbox). `bench.budgets` measures
# the pacing itself, at the limits.
UNPACED = "mailbox_limits: {messages_per_minute: 10000000, recipients_per_day: 100000000}"
UNPACED_SANDBOX = SandboxLimits(
    messages_per_minute=10_000_000, recipients_per_day=100_000_000, requests_per_10_minutes=10**9
)
RECIPIENT = "bob@partner.example"


@contextlib.asynccontextmanager
async def sandbox_world(state_dir: Path) -> AsyncIterator[Sandbox]:
    """A started sandbox on a loopback port with the tenant, the app and the mailbox."""
    async with Sandbox(state_dir=state_dir, limits=UNPACED_SANDBOX) as sandbox:
        sandbox.add_tenant(TENANT)
        sandbox.add_app(TENANT, CLIENT_ID, secret=SECRET)
        sandbox.add_mailbox(MAILBOX)
        yield sandbox


def relay_config_text(
    sandbox: Sandbox, *, port: int, delivery: str, secret_file: Path, mailbox: str = "sender"
) -> str:
    """A relay config: one plain listener on 127.0.0.1:`port` (0 = any free port), clients from
    127.0.0.1 sending as *@contoso.com, each sender's own mailbox (or `mailbox`: a fixed one or
    a pool `[a, b]`) through the sandbox."""
    return f"""\
smtp:
  hostname: relay.bench
  listeners: [{{address: 127.0.0.1, port: {port}}}]
clients:
  - name: local
    networks: [127.0.0.1/32]
    senders: ["*@contoso.com"]
auth_objects:
  contoso:
    tenant_id: {TENANT}
    client_id: {CLIENT_ID}
    client_secret_file: {secret_file}
    authority_host: {sandbox.authority_host}
    graph_endpoint: {sandbox.graph_endpoint}
    ca_file: {sandbox.ca_file}
routes:
  - senders: ["*@contoso.com"]
    auth_object: contoso
    mailbox: {mailbox}
delivery: {delivery}
"""


def write_secret(folder: Path) -> Path:
    """The app's client secret in a 0600 file, as `client_secret_file` wants it."""
    path = folder / "client-secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path
