"""One app registration in the sandbox and the relay's auth object for it.

Why this module exists: the token provider and Graph client suites drive those clients directly
(not through a whole relay from YAML, as conftest.py does), and both need the same thing: an app
with a client secret in the sandbox's tenant, and an `AuthObjectConfig` pointed at the sandbox and
trusting its CA, with one field changed per test, and the `SendTarget` that sends through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay.config.schema import AuthObjectConfig
from relay.core.values import SendTarget
from relay.sandbox import Sandbox

__all__ = ["CLIENT", "MAILBOX", "SECRET", "TENANT", "auth_for", "target_for"]

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SECRET = "sandbox~Secret.Value_0123456789"
MAILBOX = "scanner@contoso.com"


def auth_for(sandbox: Sandbox, base_dir: Path, **overrides: Any) -> AuthObjectConfig:
    """The auth object for the TENANT/CLIENT app with SECRET, aimed at `sandbox` and trusting its
    CA through `ca_file`. Each override replaces one key; an override of None removes the key."""
    data: dict[str, Any] = {
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": SECRET,
        "authority_host": sandbox.authority_host,
        "graph_endpoint": sandbox.graph_endpoint,
        "ca_file": str(sandbox.ca_file),
        **overrides,
    }
    data = {key: value for key, value in data.items() if value is not None}
    return AuthObjectConfig.model_validate(data, context={"environ": {}, "base_dir": base_dir})


def target_for(
    auth: AuthObjectConfig, mailbox: str = MAILBOX, client_request_id: str = "c"
) -> SendTarget:
    """What one Graph request sends as: the auth object (named "contoso") and `mailbox`."""
    return SendTarget(
        auth_name="contoso", auth=auth, mailbox=mailbox, client_request_id=client_request_id
    )
