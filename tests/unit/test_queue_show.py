"""`queue show`'s error line: the code once, and the remedy for its AADSTS or Graph code."""

from __future__ import annotations

import re

import pytest

from relay.cli.queue import error_and_remedy


@pytest.mark.parametrize(
    ("last_error", "words"),
    [
        (
            "550 5.7.1 Mailbox may not send as this sender (ErrorSendAsDenied; request-id r1) "
            "ErrorSendAsDenied",
            "Send As",
        ),
        ("550 5.1.1 Mailbox cannot send through Graph (MailboxNotEnabledForRESTAPI)", "licence"),
        ("451 4.4.2 Sending limit of the mailbox reached (ErrorExceededMessageLimit)", "pool"),
    ],
)
def test_queue_show_names_the_code_once_and_its_remedy(last_error: str, words: str) -> None:
    """Issue #13 item 5: the remedy once, and the code not repeated after the reply."""
    text, remedy = error_and_remedy(last_error)
    code = re.search(r"\((\w+)", last_error)
    assert code is not None
    assert text.count(code.group(1)) == 1
    assert words in remedy
