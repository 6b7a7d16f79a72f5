"""Which route a queued message goes out through, and how its log events name it.

Why this module exists: the route is not stored with the message: `resolve_route` finds it again
from the entry's routing sender against the *current* configuration at each attempt (as Postfix
resolves the transport at delivery time), so an administrator who fixes or replaces a route sees
queued mail take the fix (#10 item 3). `routed` and `sent_as` keep the entry's envelope in step
with the route and with the pool member that sent it, for the store and the log.
"""

from __future__ import annotations

from dataclasses import replace

from relay.config.schema import Config
from relay.core.errors import PolicyError
from relay.core.lifecycle import NoRoute
from relay.core.policy import choose_route
from relay.core.values import Delivered, EntryMeta, Route

__all__ = ["resolve_route", "routed", "sent_as"]


def resolve_route(config: Config, entry: EntryMeta) -> Route | NoRoute:
    """The route `entry` goes out through now: found again by its routing sender (MAIL FROM,
    or the header From for `<>`) in the current configuration, never by position or name."""
    sender = entry.sender or entry.mail_from
    try:
        return choose_route(config.routes, sender)
    except PolicyError:
        return NoRoute(sender)


def routed(entry: EntryMeta, route: Route) -> EntryMeta:
    """`entry` as it goes out through `route` (what its log events and the store show)."""
    return replace(entry, route=route.name, auth_object=route.auth_object, mailbox=route.mailbox)


def sent_as(entry: EntryMeta, delivered: Delivered) -> EntryMeta:
    """`entry` as its log events show it once delivered: the pool member that sent it."""
    if delivered.sent_as and delivered.sent_as != entry.mailbox:
        return replace(entry, mailbox=delivered.sent_as)
    return entry
