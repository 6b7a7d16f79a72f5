"""relay.delivery.slots: Graph's 4 concurrent requests per mailbox, counted per real mailbox."""

from __future__ import annotations

from contextlib import AsyncExitStack

from relay.delivery.slots import MailboxSlots
from relay.store.protocol import mailbox_key


def clock() -> float:
    return 0.0


async def test_a_full_mailbox_is_busy_and_excluded_in_any_ascii_case() -> None:
    """Four requests fill Scanner@Contoso.com; scanner@contoso.com is the same mailbox."""
    slots = MailboxSlots(monotonic=clock)
    async with AsyncExitStack() as held:
        for _ in range(4):
            await held.enter_async_context(slots.hold("contoso", "Scanner@Contoso.com"))
        assert slots.busy("contoso", "scanner@contoso.com")
        assert slots.busy_keys() == {mailbox_key("contoso", "SCANNER@contoso.com")}
    assert not slots.busy("contoso", "scanner@contoso.com")


async def test_a_unicode_look_alike_is_another_mailbox_with_its_own_slots() -> None:
    """x@straße.de full does not make x@strasse.de busy: Exchange folds ASCII letters only
    (casefold() would merge them and starve one mailbox behind the other)."""
    slots = MailboxSlots(monotonic=clock)
    async with AsyncExitStack() as held:
        for _ in range(4):
            await held.enter_async_context(slots.hold("contoso", "x@straße.de"))
        assert slots.busy("contoso", "x@straße.de")
        assert not slots.busy("contoso", "x@strasse.de")
        assert not slots.busy("contoso", "x@\u017ftrasse.de")  # long s


def test_a_pause_applies_to_the_mailbox_and_ends() -> None:
    """A 429's Retry-After pauses the mailbox for everyone until the time has passed."""
    now = [100.0]
    slots = MailboxSlots(monotonic=lambda: now[0])
    slots.pause("contoso", "Scanner@contoso.com", 5.0)
    assert slots.busy("contoso", "scanner@contoso.com")
    assert slots.next_unpause() == 5.0
    now[0] = 105.0
    assert not slots.busy("contoso", "scanner@contoso.com")
    assert slots.next_unpause() is None
