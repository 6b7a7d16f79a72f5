"""Settings that are valid but probably not what the administrator wants: `check-config`'s
warnings.

Why this module exists: some configurations load and run, yet fail at the first message or open
a door the administrator did not mean to open. They are not errors (a lab may want them, and the
example file ships placeholders), so the relay starts, but `check-config` names each one at its
key path with what to write instead. Pure: a `Config` in, `ConfigProblem`s out.
"""

from __future__ import annotations

from functools import cache

from relay.config.auth import ClientSecret
from relay.config.schema import ClientConfig, Config
from relay.config.units import GUID_RE
from relay.core.errors import ConfigProblem

__all__ = ["config_warnings", "matches_any_domain", "patterns_overlap"]

# The documentation's placeholder GUID (config.example.yaml, DESIGN §3): Entra has no such
# tenant or app, so every token request would fail (AADSTS90002 / AADSTS700016).
PLACEHOLDER_GUID = "00000000-0000-0000-0000-000000000000"


def matches_any_domain(pattern: str) -> bool:
    """True for `*`, and for a pattern whose domain is only wildcards (`*@*`, `ops@*`): such a
    pattern matches senders at every domain, including domains the organisation does not own."""
    if pattern == "*":
        return True
    _, at, domain = pattern.rpartition("@")
    return bool(at) and bool(domain) and set(domain) <= {"*", "?"}


# --- glob overlap -----------------------------------------------------------------------------
# A token is "*" (any run of characters) or a set of single characters: (negated, characters);
# "?" is the negated empty set. The patterns are fnmatch globs (relay.core.policy.matches_any),
# compared ASCII case-insensitively like the policy does.
_Token = tuple[bool, frozenset[str]] | str


_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _class_end(text: str, start: int) -> int:
    """Index of the `]` closing the class opened at `start`, or -1 (then `[` is a literal).
    As fnmatch: a `]` right after `[` or `[!` belongs to the class."""
    j = start + 1
    if text[j : j + 1] == "!":
        j += 1
    if text[j : j + 1] == "]":
        j += 1
    return text.find("]", j)


def _tokens(pattern: str) -> tuple[_Token, ...]:
    text = pattern.translate(_FOLD)
    found: list[_Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "*":
            if not found or found[-1] != "*":
                found.append("*")
        elif char == "?":
            found.append((True, frozenset()))
        elif char == "[" and (end := _class_end(text, i)) > 0:
            body = text[i + 1 : end]
            negated = body.startswith("!")
            found.append((negated, _class_chars(body[1:] if negated else body)))
            i = end
        else:
            found.append((False, frozenset(char)))
        i += 1
    return tuple(found)


def _class_chars(body: str) -> frozenset[str]:
    chars: set[str] = set()
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            chars.update(chr(c) for c in range(ord(body[i]), ord(body[i + 2]) + 1))
            i += 3
        else:
            chars.add(body[i])
            i += 1
    return frozenset(chars)


def _share_a_char(a: tuple[bool, frozenset[str]], b: tuple[bool, frozenset[str]]) -> bool:
    (neg_a, set_a), (neg_b, set_b) = a, b
    if neg_a and neg_b:
        return True  # two complements of finite sets always share a character
    if neg_a:
        return bool(set_b - set_a)
    if neg_b:
        return bool(set_a - set_b)
    return bool(set_a & set_b)


def _some_char(token: _Token) -> bool:
    """Whether a character matches `token` (an empty class such as `[?-.]` matches none)."""
    if isinstance(token, str):
        return True  # a star matches the empty string, and any character
    negated, chars = token
    return negated or bool(chars)


def patterns_overlap(first: str, second: str) -> bool:
    """True when some address matches both glob patterns (as `fnmatchcase`, ASCII case folded)."""
    a, b = _tokens(first), _tokens(second)

    @cache
    def meet(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*":  # the star matches nothing, or one more of b
            return meet(i + 1, j) or (j < len(b) and _some_char(b[j]) and meet(i, j + 1))
        if j < len(b) and b[j] == "*":
            return meet(i, j + 1) or (i < len(a) and _some_char(a[i]) and meet(i + 1, j))
        if i == len(a) or j == len(b):
            return False
        x, y = a[i], b[j]
        if isinstance(x, str) or isinstance(y, str):  # pragma: no cover - stars handled above
            return False
        return _share_a_char(x, y) and meet(i + 1, j + 1)

    return meet(0, 0)


# --- the warnings -------------------------------------------------------------------------------


def _example_pattern(config: Config) -> str:
    """`*@DOMAIN` for the first domain a route names exactly, else the documentation's."""
    for route in config.routes:
        for pattern in route.senders:
            domain = pattern.rpartition("@")[2]
            if domain and not set(domain) & set("*?[]"):
                return f"*@{domain}"
    return "*@contoso.com"


def _sender_warnings(config: Config, i: int, client: ClientConfig) -> list[ConfigProblem]:
    example = _example_pattern(config)
    route_patterns = [p for route in config.routes for p in route.senders]
    found: list[ConfigProblem] = []
    for j, pattern in enumerate(client.senders):
        where = f"clients[{i}].senders[{j}]"
        if pattern == "*" and not client.has_credentials:
            networks = ", ".join(str(n) for n in client.networks)
            found.append(
                ConfigProblem(
                    where,
                    f"'*' on client {client.name!r}, which is known by its network only: any "
                    f"device on {networks} may send as anyone, with no password asked, and "
                    "the bounce of a failed message goes to whoever was forged (backscatter)",
                    f"list the addresses these devices send as, such as {example!r}, or give "
                    "the client a username and password_hash",
                )
            )
        elif matches_any_domain(pattern):
            found.append(
                ConfigProblem(
                    where,
                    f"{pattern!r} matches senders at every domain, so client "
                    f"{client.name!r} may send as addresses nobody here owns: a forged MAIL "
                    "FROM passes the sender check, and the bounce (DSN) of a failed message "
                    "goes to whoever was forged (backscatter)",
                    f"list the senders this client really uses, such as {example!r} or "
                    "a single address",
                )
            )
        if not any(patterns_overlap(pattern, served) for served in route_patterns):
            found.append(
                ConfigProblem(
                    where,
                    f"no route serves {pattern!r}: the client may use it in MAIL FROM, but its "
                    "mail would be refused at the end of DATA with 550 5.7.1 No outbound route",
                    f"add a route whose senders match {pattern!r}, or remove the pattern",
                )
            )
    return found


def config_warnings(config: Config) -> list[ConfigProblem]:
    """Every warning for `config`, in the order of the file."""
    found: list[ConfigProblem] = []
    for i, client in enumerate(config.clients):
        found.extend(_sender_warnings(config, i, client))
    for name, auth in config.auth_objects.items():
        for key, page_name in (
            ("tenant_id", "Directory (tenant) ID"),
            ("client_id", "Application (client) ID"),
        ):
            if getattr(auth, key) == PLACEHOLDER_GUID:
                found.append(
                    ConfigProblem(
                        f"auth_objects.{name}.{key}",
                        "is the example's all-zero placeholder; Entra knows no such "
                        f"{key.removesuffix('_id')}, so every token request would fail",
                        f"copy the {page_name} from the app registration's Overview page "
                        "in the Entra admin center",
                    )
                )
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
