"""Recipient reconciliation: To/Cc/Bcc naming exactly the envelope recipients, each once.

Why this module exists: Graph delivers to the addresses in the header, not to an envelope, and
DESIGN §7 promises delivery to exactly the RCPT TO addresses. Both forms of `sendMail` need that
decision: the MIME form as rewritten header fields (`relay.core.message.prepare`), the JSON form as
recipient lists (`relay.core.message.graph_json`, which reads the already reconciled fields). This
is the one implementation. Pure: fields in, fields out.
"""

# Theory of operation
# ===================
#
# The fields are walked once, in order. An item (a mailbox, or each member of a group) is kept when
# its address is an envelope recipient not named before, and the strict RFC 5322 reading agrees
# with ours (`AddressItem.strict`): where it does not, Graph's own parser could find another
# recipient in the same text, so the item goes and its envelope recipient is added to Bcc. A kept
# item with a tolerated display name (`eve@example.com <frank@example.com>`) is emitted in its
# canonical form (`"eve@example.com" <frank@example.com>`), so that every reader finds frank.
# A field whose items all stay as written is not re-emitted at all: it stays byte-identical.
#
# Author fields (From, Sender, Resent-From, Reply-To) are never filtered, but an item with a
# tolerated display name is emitted canonically there too (`canonical_authors`), for the same
# reason: the policy checked the strict reading, so Graph must not find another one.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.core.message import UnparseableMessageError
from relay.core.message.addresses import AddressItem, canonical_address, parse_addresses
from relay.core.message.headers import Field, fold_field

__all__ = ["RECIPIENT_FIELDS", "Reconciled", "canonical_authors", "reconcile_fields"]

RECIPIENT_FIELDS = ("to", "cc", "bcc")
_REWRITTEN_AUTHOR_FIELDS = ("from", "sender", "resent-from", "reply-to")


def _group_pieces(item: AddressItem, kept: Sequence[AddressItem]) -> list[str]:
    """A rebuilt group `name: m1, m2;` as pieces that, joined with ", ", give its text."""
    if not kept:
        return [f"{item.group_name}:;"]
    pieces = [member.text for member in kept]
    pieces[0] = f"{item.group_name}: {pieces[0]}"
    pieces[-1] += ";"
    return pieces


@dataclass(slots=True)
class _Reconciler:
    """Walks the recipient fields once, keeping the first mention of each envelope recipient."""

    wanted: dict[str, str]  # canonical form -> envelope spelling, in envelope order
    seen: set[str] = field(default_factory=set)

    def keep(self, item: AddressItem) -> bool:
        if not item.strict or not item.addresses:
            return False
        canonical = canonical_address(item.addresses[0])
        if canonical not in self.wanted or canonical in self.seen:
            return False
        self.seen.add(canonical)
        return True

    def filter(self, items: Sequence[AddressItem]) -> tuple[list[str], bool]:
        """The pieces to emit for the kept items, and whether anything was dropped or rewritten."""
        pieces: list[str] = []
        changed = False
        for item in items:
            if item.group_name is None:
                if self.keep(item):
                    pieces.append(item.text)
                    changed |= item.canonical is not None
                else:
                    changed = True
                continue
            kept = [member for member in item.members if self.keep(member)]
            if len(kept) == len(item.members) and all(m.canonical is None for m in kept):
                pieces.append(item.raw)
            else:
                changed = True
                pieces.extend(_group_pieces(item, kept))
        return pieces, changed


@dataclass(frozen=True, slots=True)
class Reconciled:
    """The reconciled header fields; `bcc_added` when a new Bcc field had to be appended."""

    fields: tuple[Field, ...]
    bcc_added: bool


def reconcile_fields(fields: Sequence[Field], recipients: Sequence[str], eol: bytes) -> Reconciled:
    """The fields with To/Cc/Bcc naming exactly `recipients`, each once.

    Header recipients that are not envelope recipients (or repeat an earlier mention, or are read
    differently by a strict parser) are removed; envelope recipients no field names are added to
    the first remaining Bcc field, or to a new Bcc field at the end. Comparison is ASCII
    case-insensitive (`fold_ascii`). Raises `UnparseableMessageError` for a recipient field that
    cannot be tokenized.
    """
    reconciler = _Reconciler({})
    for address in recipients:
        reconciler.wanted.setdefault(canonical_address(address), address)
    out: list[Field] = []
    bcc: tuple[int, list[str]] | None = None  # the first remaining Bcc field: position, pieces
    for f in fields:
        if f.key not in RECIPIENT_FIELDS:
            out.append(f)
            continue
        parsed = parse_addresses(f.text)
        pieces, changed = reconciler.filter(parsed.items)
        if changed and not pieces:
            continue  # nothing left to name: RFC 5322 has no use for an empty recipient field
        if f.key == "bcc" and bcc is None:
            bcc = (len(out), pieces)
        out.append(fold_field(f.name, pieces, eol) if changed or parsed.semicolons else f)
    missing = [a for c, a in reconciler.wanted.items() if c not in reconciler.seen]
    if not missing:
        return Reconciled(tuple(out), False)
    if bcc is None:
        out.append(fold_field(b"Bcc", missing, eol))
        return Reconciled(tuple(out), True)
    position, pieces = bcc
    out[position] = fold_field(out[position].name, [*pieces, *missing], eol)
    return Reconciled(tuple(out), False)


def canonical_authors(fields: Sequence[Field], eol: bytes) -> list[Field]:
    """The fields with each author item that has a tolerated display name in canonical form.

    Other fields, and author fields without such an item, are returned as they are.
    """
    out: list[Field] = []
    for f in fields:
        if f.key not in _REWRITTEN_AUTHOR_FIELDS:
            out.append(f)
            continue
        try:
            items = parse_addresses(f.text).items
        except UnparseableMessageError:
            out.append(f)  # From/Sender were refused before; Reply-To is passed on as written
            continue
        if any(item.canonical is not None for item in items):
            out.append(fold_field(f.name, [item.text for item in items], eol))
        else:
            out.append(f)
    return out
