"""An honest fake of the Graph client for tests of `relay.delivery`: scripted answers, no HTTP.

Why this module exists: the delivery roles must be testable without a network, a sandbox or
mocks standing in for the thing under test. `FakeGraph` implements `GraphSender` exactly (the
three calls of `relay.graph.client.GraphClient`), records every request it gets, and answers
each with the next scripted `Answer`: accept (202), raise a `DeliveryError`, or hold the request
open until the test releases it (a slow or hanging Microsoft 365).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.core.errors import DeliveryError
from relay.core.values import SendTarget

__all__ = ["Answer", "FakeGraph", "GraphCall", "Sent"]

Kind = Literal["mime", "large", "json"]


@dataclass(frozen=True, slots=True)
class Sent:
    """What the fake answers for an accepted request (the shape of GraphClient's result)."""

    status: int = 202
    request_id: str | None = "fake-request"


@dataclass(slots=True)
class Answer:
    """One scripted answer: `error` raised, or accepted; after `hold` is set when given.
    `bug` is raised instead, as an unexpected exception from inside the client would be."""

    error: DeliveryError | None = None
    hold: asyncio.Event | None = None
    bug: Exception | None = None


@dataclass(frozen=True, slots=True)
class GraphCall:
    kind: Kind
    target: SendTarget
    mime: bytes | None = None
    message_json: Mapping[str, Any] | None = None
    save_to_sent_items: bool = True


@dataclass(slots=True)
class FakeGraph:
    """Answers requests from `script` in order, then `default` (accept unless set)."""

    script: list[Answer] = field(default_factory=list)
    default: Answer = field(default_factory=Answer)
    calls: list[GraphCall] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # set by every request
    _outcomes: list[bool] = field(default_factory=list)  # per call: answered 202

    def answer(self, *answers: Answer | DeliveryError | None) -> None:
        """Append answers: an `Answer`, a `DeliveryError` to raise, or None for a 202."""
        for item in answers:
            self.script.append(item if isinstance(item, Answer) else Answer(error=item))

    @property
    def accepted(self) -> list[GraphCall]:
        """The requests answered 202 so far (what Microsoft 365 would have sent)."""
        return [c for c, ok in zip(self.calls, self._outcomes, strict=False) if ok]

    async def send_mime(self, target: SendTarget, mime: bytes) -> Sent:
        return await self._answer(GraphCall("mime", target, mime=mime))

    async def send_large_mime(self, target: SendTarget, mime: bytes) -> Sent:
        return await self._answer(GraphCall("large", target, mime=mime))

    async def send_json(
        self, target: SendTarget, message_json: Mapping[str, Any], save_to_sent_items: bool
    ) -> Sent:
        call = GraphCall(
            "json", target, message_json=message_json, save_to_sent_items=save_to_sent_items
        )
        return await self._answer(call)

    async def _answer(self, call: GraphCall) -> Sent:
        answer = self.script.pop(0) if self.script else self.default
        self.calls.append(call)
        self._outcomes.append(False)
        index = len(self.calls) - 1
        self.started.set()
        if answer.hold is not None:
            await answer.hold.wait()
        if answer.bug is not None:
            raise answer.bug
        if answer.error is not None:
            raise answer.error
        self._outcomes[index] = True
        return Sent()
