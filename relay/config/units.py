"""The value types every configuration section shares: sizes, durations, address patterns,
networks, identifier patterns, and the strict frozen base model.

Why this module exists: each section module (`smtp`, `clients`, `auth`, `schema`) parses the same
units the same way and words the same mistake the same way, so the parsing lives once, here. It
is pure: text in, value or `ValueError` out, no files and no environment.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = [
    "ADDRESS_RE",
    "DOMAIN_RE",
    "GUID_RE",
    "AddressPattern",
    "ByteSize",
    "Duration",
    "Network",
    "StrictModel",
    "parse_duration",
    "parse_size",
]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}$"
)
ADDRESS_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+$")


def parse_size(value: object) -> int:
    """`35MB` (decimal), `35MiB` (binary) or a plain number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 35MB, 35MiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(
        f"{value!r} is not a size; write a number of bytes or a number with one of "
        "KB, KiB, MB, MiB, GB, GiB (for example 35MB)"
    )


def parse_duration(value: object) -> float:
    """`30s`, `5m`, `2h`, `5d`, `1h30m`, `250ms` or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 2h or 5d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ValueError(
        f"{value!r} is not a duration; write seconds or a number with ms, s, m, h or d "
        "(for example 30s, 5m, 2h, 5d)"
    )


def _check_glob(pattern: str) -> str:
    if not pattern or any(c.isspace() for c in pattern):
        raise ValueError(
            f"{pattern!r} is not an address pattern; use an address or a glob such as "
            "'*@contoso.com' or 'scanner@contoso.com'"
        )
    if pattern != "*" and "@" not in pattern:
        raise ValueError(
            f"{pattern!r} has no '@'; patterns match whole addresses, "
            f"so write '*@{pattern}' to allow a whole domain"
        )
    return pattern


def _check_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = str(value).strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a network; write an address or CIDR such as 10.0.5.0/24, "
                "192.0.2.7 or 2001:db8::/64"
            ) from exc
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from exc


ByteSize = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_check_network)]
AddressPattern = Annotated[str, BeforeValidator(lambda v: _check_glob(str(v)))]


class StrictModel(BaseModel):
    """Base of every section: unknown keys are errors, values are frozen, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
