"""`patterns_overlap`: does some address match two sender globs? check-config warns about a
client pattern that overlaps no route's pattern, so a wrong "no" would be a false warning and a
wrong "yes" a missed one. Checked against known cases and, by property, against fnmatch itself."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config.advice import patterns_overlap


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("*", "*@contoso.com", True),
        ("scanner@contoso.com", "*@contoso.com", True),
        ("Scanner@CONTOSO.com", "*@contoso.com", True),  # ASCII case-insensitive, as the policy
        ("*@fabrikam.com", "*@contoso.com", False),
        ("*@*", "*@contoso.com", True),
        ("ops@*", "a@b", False),
        ("scan-[0-9]@contoso.com", "scan-7@*", True),
        ("scan-[0-9]@contoso.com", "scan-x@*", False),
        ("[!b]x@d.com", "bx@d.com", False),
        ("a*b", "*c", False),
        ("*a*", "*b*", True),
        ("[]x]", "x", True),  # a `]` first in a class is a member, as in fnmatch
        ("[]x]", "y", False),
    ],
)
def test_known_cases_both_ways(first: str, second: str, overlap: bool) -> None:
    assert patterns_overlap(first, second) is overlap
    assert patterns_overlap(second, first) is overlap


ALPHABET = "abAB@.*?[]!-"


@given(
    address=st.text(alphabet="abAB@.-]!", max_size=6),
    first=st.text(alphabet=ALPHABET, max_size=6),
    second=st.text(alphabet=ALPHABET, max_size=6),
)
def test_an_address_both_patterns_match_means_they_overlap(
    address: str, first: str, second: str
) -> None:
    """Never a false 'no route serves this pattern': any address fnmatch matches with both
    (ASCII case folded) proves the overlap."""
    folded = address.lower()
    if fnmatchcase(folded, first.lower()) and fnmatchcase(folded, second.lower()):
        assert patterns_overlap(first, second)


@given(pattern=st.text(alphabet=ALPHABET, max_size=8))
def test_a_pattern_overlaps_itself_when_anything_matches_it(pattern: str) -> None:
    """A pattern no string can match (an empty class) overlaps nothing; any other overlaps
    itself."""
    assert patterns_overlap(pattern, pattern) is patterns_overlap(pattern, "*")


def test_an_empty_class_overlaps_nothing_not_even_a_star() -> None:
    """`[?-.]` is a reversed range: fnmatch matches no character with it (hypothesis found it)."""
    assert not patterns_overlap("[?-.]", "*")
    assert not patterns_overlap("a[?-.]@x", "*@x")
    assert patterns_overlap("a[?-z]@x", "*@x")
