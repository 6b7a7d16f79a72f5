"""Coverage-guided fuzzing of the pure core with atheris (libFuzzer), when it is installed.

Not collected by pytest (no test_ prefix); hypothesis covers the same targets in CI. Run from the
repository root, bounded:

    .venv/bin/pip install atheris
    .venv/bin/python -m tests.fuzz.atheris_harness -runs=20000 -max_len=4096

The first input byte picks the target; the rest is the payload. Any exception other than the
documented ones, or a broken invariant (AssertionError), is a crash libFuzzer reports with the
input that caused it.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from datetime import UTC, datetime

from relay.core.errors import PolicyError
from relay.core.message.addresses import canonical_address
from relay.core.message.headers import split_header_from_body
from relay.core.message.limits import ContentLimits, ContentRefusedError, DataDecoder, check_content
from relay.core.message.prepare import (
    Envelope,
    TraceInfo,
    UnparseableMessageError,
    UnreadableAuthorError,
    prepare_for_graph,
    read_authors,
)
from relay.core.policy import check_authors, check_envelope_sender, identify_client
from tests.fuzz.test_fuzz_core import CONFIG, ambiguous_dot, whitespace_message_id

REJECT = ContentLimits(max_size=8192, max_header_bytes=512, max_mime_depth=4)
NORMALIZE = ContentLimits(
    max_size=8192, max_header_bytes=512, max_mime_depth=4, bare_line_endings="normalize"
)
TRACE = TraceInfo("relay.test", "192.0.2.1", None, "device", "ESMTP", "Q1", datetime.now(UTC))
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _data(payload: bytes, limits: ContentLimits) -> None:
    stream = payload + b"\r\n.\r\n"
    decoder = DataDecoder(limits)
    pos = 0
    while True:
        end = stream.find(b"\r\n", pos) + 2
        if decoder.feed(stream[pos:end]):
            break
        pos = end
    if decoder.refusal is not None:
        return
    content = decoder.content()
    assert b"\0" not in content
    if limits.bare_line_endings == "reject":
        assert not ambiguous_dot(stream[: end - 3])
    else:
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", content) is None


def _message(payload: bytes) -> None:
    if whitespace_message_id(payload):
        return  # the known bug, pinned by an xfail test in test_fuzz_core.py
    try:
        prepared = prepare_for_graph(
            split_header_from_body(payload),
            Envelope("scanner@contoso.com", ("bob@partner.example",)),
            TRACE,
            message_id_local="Q1",
        )
    except UnparseableMessageError:
        return
    assert prepared.mime.endswith(split_header_from_body(payload).body)
    assert {canonical_address(a) for a in prepared.header_recipients} == {"bob@partner.example"}


def _authors(raw: bytes) -> tuple[str, ...]:
    """The author addresses the SMTP layer checks, from the one header split of a DATA."""
    return read_authors(split_header_from_body(raw).fields).addresses


def _policy(payload: bytes) -> None:
    text = _UNSAFE.sub("", payload.decode("utf-8", "surrogateescape"))
    client = identify_client(CONFIG.clients, "10.0.5.9")  # a configured network client
    with contextlib.suppress(PolicyError):
        check_envelope_sender(client, text)
    try:
        authors = _authors(payload)
    except UnreadableAuthorError:
        return
    if not any(_UNSAFE.search(a) for a in authors):  # see the xfail in test_fuzz_core.py
        with contextlib.suppress(PolicyError):
            check_authors(client, authors)


def one_input(data: bytes) -> None:
    if not data:
        return
    target, payload = data[0] % 5, data[1:]
    if target == 0:
        _data(payload, REJECT)
    elif target == 1:
        _data(payload, NORMALIZE)
    elif target == 2:
        with contextlib.suppress(ContentRefusedError):
            check_content(payload, REJECT)
    elif target == 3:
        _message(payload)
    else:
        _policy(payload)


def main() -> None:
    atheris = importlib.import_module("atheris")  # optional: not a dependency of the project
    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
