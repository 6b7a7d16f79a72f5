"""The authors of a message (From, Sender, Resent-From), read so that nobody reads them otherwise.

Why this module exists: the sender policy (DESIGN §8) lets a client send only as its allowed
senders, and checks the author fields as well as MAIL FROM. That check is only as good as the
reading of those fields. A field that our tokenizer reads as no address at all
(`ceo@contoso.com scanner@contoso.com`, `"x" ceo@contoso.com`, a folded word sequence) used to
pass the check with nothing to check, and Exchange then delivered the message as ceo@ (issue #11
item 1). So an author field that is present must yield at least one address, and exactly the
addresses the strict RFC 5322 reading of `relay.core.message.addresses` finds; anything else is
refused with `550 5.7.1`, naming the field. Reply-To is not an author: it is returned for the log,
never checked.

Pure: header fields in, a frozen value out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from relay.core.errors import PolicyError, SmtpReply
from relay.core.message import UnparseableMessageError
from relay.core.message.addresses import AddressItem, fold_ascii, parse_addresses
from relay.core.message.headers import Field

__all__ = ["AUTHOR_FIELDS", "Authors", "UnreadableAuthorError", "read_authors"]

# RFC 5322 §3.6.2 and §3.6.6: the fields that say who wrote or sent the message. Sender holds one
# mailbox, the others a mailbox-list; none of them a group (RFC 6854 groups are not accepted here).
AUTHOR_FIELDS = {"from": "From", "sender": "Sender", "resent-from": "Resent-From"}


class UnreadableAuthorError(PolicyError):
    """Refuse the message: an author field cannot be read as exactly the addresses it names.

    `header` is the field's canonical name (`From`, `Sender`, `Resent-From`); the reply names it.
    """

    def __init__(self, header: str, why: str) -> None:
        self.header = header
        self.why = why
        super().__init__(
            SmtpReply(
                550,
                "5.7.1",
                f"The {header} header must name its sender addresses unambiguously ({why})",
            )
        )


@dataclass(frozen=True, slots=True)
class Authors:
    """The author addresses (ASCII-lowercased, first mention first) and the Reply-To ones."""

    addresses: tuple[str, ...]
    reply_to: tuple[str, ...] = ()


def _author_items(field: Field, header: str) -> list[AddressItem]:
    try:
        parsed = parse_addresses(field.text)
    except UnparseableMessageError as exc:
        raise UnreadableAuthorError(header, "it cannot be parsed") from exc
    if parsed.semicolons:
        raise UnreadableAuthorError(header, "';' is not an address separator")
    items = parsed.items
    if not items:
        raise UnreadableAuthorError(header, "it names no address")
    for item in items:
        if item.group_name is not None:
            raise UnreadableAuthorError(header, "a group is not a sender")
        if not item.strict or not item.addresses:
            raise UnreadableAuthorError(header, "it is not an RFC 5322 address list")
        if not all(_well_formed(address) for address in item.addresses):
            # `a@().a` reads as a@.a here and as no address at all to Python's parser
            raise UnreadableAuthorError(header, "an address has an empty local part or label")
    if header == "Sender" and len(items) > 1:
        raise UnreadableAuthorError(header, "it may name only one address")
    return list(items)


def _well_formed(address: str) -> bool:
    """A local part, and a domain (when there is one: cron's `From: root` has none) of
    non-empty labels: RFC 5322 dot-atoms never start, end or double a dot."""
    local, at, domain = address.rpartition("@")
    if not at:
        return bool(address)
    return bool(local and domain) and all(domain.split("."))


def _reply_to(fields: Iterable[Field]) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for field in fields:
        if field.key != "reply-to":
            continue
        try:
            items = parse_addresses(field.text).items
        except UnparseableMessageError:
            continue  # only logged: the JSON path refuses it if it is ever needed
        found.update((fold_ascii(a), None) for item in items for a in item.addresses)
    return tuple(found)


def read_authors(fields: Iterable[Field]) -> Authors:
    """The addresses of the top-level From, Sender and Resent-From fields, and Reply-To's.

    Raises `UnreadableAuthorError` (550 5.7.1, naming the field) when a present author field
    yields no address, an item the strict RFC 5322 reading does not accept, a group, or, for
    Sender, more than one address. `Authors(())` when the message has no author field.
    """
    fields = tuple(fields)
    found: dict[str, None] = {}
    for field in fields:
        header = AUTHOR_FIELDS.get(field.key)
        if header is None:
            continue
        for item in _author_items(field, header):
            found.update((fold_ascii(a), None) for a in item.addresses)
    return Authors(tuple(found), _reply_to(fields))
