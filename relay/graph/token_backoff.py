"""A failed token request, remembered per auth object: backoff, and one log line per state change.

Why this module exists: during an Entra outage every delivery attempt used to ask for a token
again (#11: 396 failed requests in 15 s, each a WARNING). An outage is a state of the auth object,
not an event of each message, so it is kept here as one: attempts that come in while the state
says "wait" get the remembered failure without a request, and the log says when the state
changes instead of repeating itself.

Theory of operation
-------------------
- OK: no failure remembered; every caller may ask (MSAL's own cache answers most of them).
- FAILING: after the n-th consecutive failure, nobody asks again for
  `min(max_delay, first_delay * 2**(n-1))` seconds (1 s, 2 s, 4 s ... 5 min), or for as long as
  the token endpoint's Retry-After says when that is longer (still at most `max_delay`: a
  wrong header must not stop mail for hours). `blocked(now)` hands callers in that window a
  copy of the remembered failure whose `retry_after` is the wait that is left.
- The first failure reports "failing"; further failures report "still failing" at most every
  `report_every` seconds; a failure with another code (the outage ended, but the secret has
  expired) is a new "failing". The first success after failures reports "recovered".

Pure: the caller passes the time in (monotonic seconds) and logs what `failed` and `succeeded`
return; nothing here reads a clock, sleeps or logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from relay.core.errors import TransientDeliveryError

__all__ = ["FIRST_DELAY", "MAX_DELAY", "REPORT_EVERY", "FailureGate", "Report"]

FIRST_DELAY: Final = 1.0
MAX_DELAY: Final = 300.0
REPORT_EVERY: Final = 300.0

Report = Literal["failing", "still failing"]


@dataclass(slots=True)
class FailureGate:
    """The failure state of one auth object's token requests (see the module docstring)."""

    first_delay: float = FIRST_DELAY
    max_delay: float = MAX_DELAY
    report_every: float = REPORT_EVERY
    failure: TransientDeliveryError | None = None
    failures: int = 0  # consecutive failed requests
    answered: int = 0  # attempts given the remembered failure since the last report
    until: float = 0.0  # no request before this time
    since: float = 0.0  # when the current failing state began
    reported: float = 0.0  # when it was last reported

    def blocked(self, now: float) -> TransientDeliveryError | None:
        """The remembered failure while callers must wait, else None (then they may ask)."""
        if self.failure is None or now >= self.until:
            return None
        self.answered += 1
        wait = self.until - now
        old = self.failure
        return TransientDeliveryError(
            f"{old.message} (remembered; next token request in {wait:.0f}s)",
            reply=old.reply,
            retry_after=wait,
            alert=old.alert,
            code=old.code,
            http_status=old.http_status,
            request_id=old.request_id,
            remedy=old.remedy,
        )

    def delay(self) -> float:
        """The wait after the current number of consecutive failures, before Retry-After."""
        exponent = min(max(self.failures - 1, 0), 30)
        return min(self.max_delay, self.first_delay * 2.0**exponent)

    def failed(
        self, failure: TransientDeliveryError, now: float, retry_after: float | None = None
    ) -> Report | None:
        """Record a failed request; what to report about it, if anything."""
        previous = self.failure
        self.failures += 1
        wait = self.delay()
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        self.until = now + wait
        self.failure = failure
        if previous is None:
            self.since = now
        if previous is None or previous.code != failure.code:
            self.reported, self.answered = now, 0
            return "failing"
        if now - self.reported >= self.report_every:
            self.reported = now
            return "still failing"
        return None

    def succeeded(self, now: float) -> float | None:
        """Record a token; how long the failures lasted (since the first of them, whatever its
        code) if this ends them, else None."""
        if self.failure is None:
            return None
        lasted = now - self.since
        self.failure, self.failures, self.answered, self.until = None, 0, 0, 0.0
        return lasted
