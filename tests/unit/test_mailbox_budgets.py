"""`MailboxBudgets.blocked`, which the workers ask at every look at the queue: it answers from
what changed since the last look, and must still see time free a window and a reload move a
limit."""

from __future__ import annotations

from pathlib import Path

from relay.config.schema import Config
from relay.core.budgets import Need
from relay.delivery.budget import MailboxBudgets, Reservation
from relay.store.protocol import mailbox_key
from tests.unit.delivery_parts import Clock, make_config

BOX = "app@contoso.com"
KEY = mailbox_key("contoso", BOX)


def budgets(tmp_path: Path, per_minute: int) -> tuple[MailboxBudgets, Clock, list[Config]]:
    clock = Clock()
    holder = [
        make_config(
            tmp_path,
            delivery=f"{{mode: queue, mailbox_limits: {{messages_per_minute: {per_minute}}}}}",
        )
    ]
    return MailboxBudgets(config=lambda: holder[0], store=None, clock=clock), clock, holder


def send(budgets: MailboxBudgets) -> None:
    reservation = budgets.reserve("contoso", BOX, Need(1))
    assert isinstance(reservation, Reservation)
    budgets.finish(reservation, Need(1))


def test_a_spent_mailbox_is_blocked_until_its_window_frees_without_any_new_event(
    tmp_path: Path,
) -> None:
    b, clock, _ = budgets(tmp_path, 2)
    send(b)
    clock.now += 10
    send(b)
    assert b.blocked() == {KEY: 50.0}
    clock.now += 30
    assert b.blocked() == {KEY: 20.0}  # nothing happened in between: still answered right
    clock.now += 20
    assert b.blocked() == {}


def test_a_reload_that_lowers_a_limit_blocks_a_mailbox_that_did_nothing_new(
    tmp_path: Path,
) -> None:
    b, _, holder = budgets(tmp_path, 5)
    send(b)
    send(b)
    assert b.blocked() == {}
    holder[0] = make_config(
        tmp_path, delivery="{mode: queue, mailbox_limits: {messages_per_minute: 2}}"
    )
    assert b.blocked() == {KEY: 60.0}


def test_only_a_request_in_flight_can_end_a_wait_of_none(tmp_path: Path) -> None:
    b, _, _ = budgets(tmp_path, 1)
    reservation = b.reserve("contoso", BOX, Need(1))
    assert isinstance(reservation, Reservation)
    assert b.blocked() == {KEY: None}
    b.finish(reservation, None)  # refused before Microsoft counted it
    assert b.blocked() == {}
