"""relay.core.message.stdlib_email: RFC 5322 dates, and MIME parameters as the stdlib reads them."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from relay.core.message.stdlib_email import collapse_parameter, parse_mime_headers, rfc5322_date

offsets = st.one_of(st.none(), st.integers(min_value=-14 * 60, max_value=14 * 60))


@given(naive=st.datetimes(min_value=datetime(1900, 1, 1)), offset=offsets)
def test_dates_are_written_as_the_standard_library_writes_them(
    naive: datetime, offset: int | None
) -> None:
    """Our own formatter (no socket import) agrees with email.utils.format_datetime, for
    naive times and for every zone offset."""
    zone = None if offset is None else timezone(timedelta(minutes=offset))
    moment = naive.replace(tzinfo=zone)
    assert rfc5322_date(moment) == email.utils.format_datetime(moment)


def test_a_date_in_utc_has_the_zone_plus_0000() -> None:
    """RFC 5322 §3.3: a known UTC time is +0000; English day and month names."""
    assert rfc5322_date(datetime(2026, 12, 2, 1, 4, 23, tzinfo=UTC)) == (
        "Wed, 02 Dec 2026 01:04:23 +0000"
    )


def test_an_rfc_2231_parameter_is_decoded() -> None:
    """A filename*= parameter (charset'language'text) comes back as text."""
    headers = parse_mime_headers(
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''Rechnung%20M%C3%A4rz.pdf\r\n\r\n"
    )
    value = headers.get_param("filename", header="content-disposition")
    assert value is not None
    assert collapse_parameter(value) == "Rechnung März.pdf"
