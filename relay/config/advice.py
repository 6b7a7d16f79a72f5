"""Settings that are valid but probably not what the administrator wants: `check-config`'s
warnings.

Why this module exists: some configurations load and run, yet open a door the administrator
did not mean to open. They are not errors (a lab may want them), so the relay starts, but
`check-config` names each one at its key path with what to write instead. Pure: a `Config` in,
`ConfigProblem`s out.
"""

from __future__ import annotations

from relay.config.auth import ClientSecret
from relay.config.schema import Config
from relay.config.units import GUID_RE
from relay.core.errors import ConfigProblem

__all__ = ["config_warnings", "matches_any_domain"]


def matches_any_domain(pattern: str) -> bool:
    """True for `*`, and for a pattern whose domain is only wildcards (`*@*`, `ops@*`): such a
    pattern matches senders at every domain, including domains the organisation does not own."""
    if pattern == "*":
        return True
    _, at, domain = pattern.rpartition("@")
    return bool(at) and bool(domain) and set(domain) <= {"*", "?"}


def _example_pattern(config: Config) -> str:
    """`*@DOMAIN` for the first domain a route names exactly, else the documentation's."""
    for route in config.routes:
        for pattern in route.senders:
            domain = pattern.rpartition("@")[2]
            if domain and not set(domain) & set("*?[]"):
                return f"*@{domain}"
    return "*@contoso.com"


def config_warnings(config: Config) -> list[ConfigProblem]:
    """Every warning for `config`, in the order of the file."""
    example = _example_pattern(config)
    found: list[ConfigProblem] = []
    for i, client in enumerate(config.clients):
        for j, pattern in enumerate(client.senders):
            if matches_any_domain(pattern):
                found.append(
                    ConfigProblem(
                        f"clients[{i}].senders[{j}]",
                        f"{pattern!r} matches senders at every domain, so client "
                        f"{client.name!r} may send as addresses nobody here owns: a forged MAIL "
                        "FROM passes the sender check, and the bounce (DSN) of a failed message "
                        "goes to whoever was forged (backscatter)",
                        f"list the senders this client really uses, such as {example!r} or "
                        "a single address",
                    )
                )
    for name, auth in config.auth_objects.items():
        secret = auth.credential
        if isinstance(secret, ClientSecret) and GUID_RE.fullmatch(secret.value.strip()):
            found.append(
                ConfigProblem(
                    f"auth_objects.{name}",
                    "the client secret is a GUID: that is the secret's Secret ID, which Entra "
                    "refuses as a credential (AADSTS7000215)",
                    "copy the secret's Value instead (Entra shows it once, right after the "
                    "secret is created; if it is gone, create a new secret)",
                )
            )
    return found
