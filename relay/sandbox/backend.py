# Why this module exists: the fake Entra and the fake Graph answer from one world, as the real
# services do: the same directory, the same token issuer, one fault plan, one journal, one clock
# and one notion of which resources the sandbox serves. The Sandbox builds that once and hands
# the same Backend to both services, instead of each taking (and storing) six loose arguments;
# the throttle too, because Exchange's limits count a mailbox's messages whichever endpoint
# sent them.
"""The state the sandbox's Entra and Graph services share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .access_tokens import AccessTokens
from .directory import Directory
from .faults import FaultPlan
from .recorder import Journal
from .throttle import Throttle

__all__ = ["REQUEST_ID", "Backend"]

# Graph's `request-id` for the request being answered, set by the Sandbox's middleware.
REQUEST_ID = web.RequestKey("request_id", str)


@dataclass(frozen=True, slots=True)
class Backend:
    """What both services read and update. `resources()` returns the resource ids a token may
    be for and Graph accepts as audience: Graph's own, and the sandbox's origins (lowercase)."""

    directory: Directory
    tokens: AccessTokens
    faults: FaultPlan
    journal: Journal
    clock: Callable[[], float]
    resources: Callable[[], frozenset[str]]
    throttle: Throttle
