"""`relay.core.waiting.HeldBack` as a specification: which part of a wait the relay caused."""

from __future__ import annotations

import pytest

from relay.core.waiting import HeldBack


def _held_back(*observations: tuple[float, set[str]], horizon: float = 1e9) -> HeldBack[str]:
    held: HeldBack[str] = HeldBack(horizon)
    for now, keys in observations:
        held.observe(keys, now)
    return held


# a held back from 10 to 20 and from 40 to 50; b from 10 to 30.
TIMELINE: tuple[tuple[float, set[str]], ...] = (
    (10.0, {"a", "b"}),
    (20.0, {"a", "b"}),
    (30.0, {"b"}),
    (40.0, {"a"}),
    (50.0, {"a"}),
    (60.0, set()),
)


@pytest.mark.parametrize(
    ("key", "since", "until", "expected"),
    [
        pytest.param("a", 0.0, 100.0, 20.0, id="both-intervals"),
        pytest.param("a", 15.0, 45.0, 10.0, id="overlaps-both-ends"),
        pytest.param("a", 12.0, 18.0, 6.0, id="inside-one"),
        pytest.param("a", 20.0, 40.0, 0.0, id="the-gap-between"),
        pytest.param("a", 25.0, 35.0, 0.0, id="inside-the-gap"),
        pytest.param("b", 0.0, 100.0, 20.0, id="held-at-three-looks"),
        pytest.param("b", 25.0, 100.0, 5.0, id="tail-of-b"),
        pytest.param("a", 45.0, 45.0, 0.0, id="empty-span"),
        pytest.param("a", 50.0, 10.0, 0.0, id="backwards-span"),
        pytest.param("c", 0.0, 100.0, 0.0, id="never-held"),
    ],
)
def test_held_is_the_overlap_of_the_span_with_the_held_intervals(
    key: str, since: float, until: float, expected: float
) -> None:
    """A key held back at two looks in a row was held back all the time between; a look
    without it closes the interval at the previous look."""
    assert _held_back(*TIMELINE).held(key, since, until) == expected


def test_a_single_look_holds_for_no_time() -> None:
    """Seen held back once, then not: nothing is known about any time between, so nothing
    is credited."""
    held = _held_back((10.0, {"a"}), (20.0, set()))
    assert held.held("a", 0.0, 30.0) == 0.0


def test_intervals_older_than_the_horizon_are_forgotten() -> None:
    """An interval that ended longer ago than the horizon no longer counts."""
    held = _held_back(*TIMELINE, (200.0, {"b"}), horizon=100.0)
    assert held.held("a", 0.0, 200.0) == 0.0
    assert held.held("b", 0.0, 200.0) == 0.0


def test_intervals_within_the_horizon_are_kept() -> None:
    """Only intervals ending before now - horizon go; later ones still count."""
    held = _held_back(*TIMELINE, (80.0, {"b"}), (90.0, {"b"}), horizon=45.0)
    assert held.held("a", 0.0, 100.0) == 10.0
    assert held.held("b", 0.0, 100.0) == 10.0
