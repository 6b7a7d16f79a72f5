"""`queue shape`'s table (relay.cli.queue_shape): doubling age buckets, totals, last errors."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from relay.cli.queue_shape import BUCKETS, bucket_of, shape_table
from relay.core.values import EntryMeta

NOW = 1_700_000_000.0
BASE = EntryMeta(
    queue_id="Q",
    created=NOW,
    mail_from="scanner@contoso.com",
    recipients=("bob@partner.example",),
    client="printers",
    client_ip="10.0.5.7",
    auth_object="contoso",
    mailbox="scanner@contoso.com",
    route="routes[0]",
    message_id="<q@relay.test>",
    size=10,
)


def test_the_buckets_double() -> None:
    assert all(b == 2 * a for a, b in itertools.pairwise(BUCKETS))


@pytest.mark.parametrize(
    ("minutes", "column"),
    [(0, 0), (4.99, 0), (5, 1), (9.9, 1), (10, 2), (79, 4), (80, 5), (1279, 8), (1280, 9)],
)
def test_an_entry_falls_in_the_first_bucket_its_age_is_under(minutes: float, column: int) -> None:
    assert bucket_of(minutes * 60) == column


def test_a_clock_step_backwards_counts_as_age_zero() -> None:
    assert bucket_of(-30) == 0


def test_rows_are_per_mailbox_without_ascii_case_with_totals_and_the_youngest_error() -> None:
    entries = [
        replace(BASE, queue_id="A", created=NOW - 3000 * 60, last_error="old error"),
        replace(
            BASE,
            queue_id="B",
            created=NOW - 60,
            mailbox="Scanner@Contoso.com",
            last_error="new error",
        ),
        replace(BASE, queue_id="C", created=NOW - 30 * 60, mailbox="alerts@contoso.com"),
    ]
    lines = shape_table(entries, NOW).splitlines()
    assert lines[1].split() == ["TOTAL", "3", "1", "0", "0", "1", "0", "0", "0", "0", "0", "1"]
    assert lines[2].split() == [
        "scanner@contoso.com",
        "2",
        "1",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "0",
        "1",
        "new",
        "error",
    ]
    assert lines[3].split() == ["alerts@contoso.com", "1", "0", "0", "0", "1"] + ["0"] * 6


def test_an_empty_queue_is_a_total_of_zero() -> None:
    lines = shape_table([], NOW).splitlines()
    assert lines[1].split() == ["TOTAL"] + ["0"] * 11
    assert len(lines) == 2
