"""The DATA memory budget: all messages being received and prepared at once share one bound.

Why this module exists: every DATA phase holds its message in memory until the message has
been prepared and handed to the store or to Graph. Without a shared bound, the connection
limits alone allow `max_connections x max_message_size` (about 7 GB with the defaults) and the
OOM killer ends the relay, losing what every other session was sending (issue #11 item 3).
`smtp.max_data_memory` is that bound; the service creates one `DataMemoryBudget` and every
listener and session reserves from it.

Theory of operation
- A session opens one `Reservation` per DATA phase and *reserves as bytes arrive*, in chunks
  (`chunk`, 1 MiB by default, so the budget is not consulted per line). Each received byte costs
  `COPIES` bytes of budget: while a message is being prepared it exists twice at most (the
  received buffer while it is joined, then the received bytes and the prepared copy), and the
  budget bounds memory, not message bytes.
- A message that declared its size (RFC 1870 `SIZE=`) reserves all of it up front: it either
  holds all it needs or nothing, so declared messages cannot deadlock each other.
- When there is no room the session stops reading (it does not take more from the stream, so
  asyncio's reader pauses the transport) and waits. Room is handed out in the order the
  reservations were opened, oldest first, so a message that started first finishes first.
- The one message alone may always proceed: a reservation is granted whatever its size when no
  other reservation holds anything (a message larger than the budget still goes through, one
  at a time, rather than never).
- Reserving in chunks is hold-and-wait: every holder can be waiting for room the others hold.
  When a request would wait while *every* holder is already waiting, no room can ever come, so
  the youngest waiting reservation is *spilled*: its room is taken back and its session reads
  the rest of DATA without keeping it and answers `452 4.3.1`. The oldest always progresses.
- A wait that gets no room within its timeout (`smtp.data_timeout`) spills too. A session
  releases its reservation when the message has been handed on, on a refusal, on a hang-up.

Single event loop, no locks: every method runs on the loop.
"""

from __future__ import annotations

import asyncio
import itertools

__all__ = ["COPIES", "DataMemoryBudget", "Reservation"]

COPIES = 2  # budget bytes per received byte (see the module docstring)
CHUNK = 1024 * 1024


class DataMemoryBudget:
    """`limit` bytes shared by every DATA phase of every listener (`smtp.max_data_memory`)."""

    def __init__(self, limit: int, *, chunk: int = CHUNK) -> None:
        if limit <= 0 or chunk <= 0:
            raise ValueError("the budget and its chunk must be positive")
        self.limit = limit
        self.chunk = chunk
        self._reserved = 0
        self._order = itertools.count()
        self._holders: dict[int, Reservation] = {}
        self._waiting: dict[int, tuple[Reservation, int, asyncio.Future[bool]]] = {}
        self.spills = 0  # reservations taken back (deadlock or timeout): each meant a 452

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def open(self) -> Reservation:
        """A new, empty reservation for one DATA phase."""
        return Reservation(self, next(self._order))

    # --- used by Reservation ---------------------------------------------------------------

    def _fits(self, reservation: Reservation, amount: int) -> bool:
        others = self._reserved - reservation.held
        return self._reserved + amount <= self.limit or others == 0

    def _take(self, reservation: Reservation, amount: int) -> None:
        self._reserved += amount
        reservation.held += amount
        self._holders[reservation.order] = reservation

    def _try(self, reservation: Reservation, amount: int) -> bool:
        # Oldest first: a younger request does not overtake older ones that are waiting.
        if any(order < reservation.order for order in self._waiting):
            return False
        if not self._fits(reservation, amount):
            return False
        self._take(reservation, amount)
        return True

    async def _wait(self, reservation: Reservation, amount: int, within: float) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[reservation.order] = (reservation, amount, future)
        self._break_deadlock()
        try:
            async with asyncio.timeout(within):
                return await future
        except TimeoutError:
            self.spills += 1
            return False
        finally:
            self._waiting.pop(reservation.order, None)
            self._grant()

    def _break_deadlock(self) -> None:
        """Spill the youngest waiter while every holder waits (module docstring)."""
        self._grant()
        while self._holders and all(order in self._waiting for order in self._holders):
            youngest = max(order for order in self._waiting if order in self._holders)
            reservation, _, future = self._waiting.pop(youngest)
            self.spills += 1
            self._give_back(reservation)
            if not future.done():
                future.set_result(False)
            self._grant()

    def _grant(self) -> None:
        for order in sorted(self._waiting):
            reservation, amount, future = self._waiting[order]
            if future.done():
                continue
            if not self._fits(reservation, amount):
                return  # oldest first: nobody younger overtakes
            del self._waiting[order]
            self._take(reservation, amount)
            future.set_result(True)

    def _give_back(self, reservation: Reservation) -> None:
        self._reserved -= reservation.held
        reservation.held = 0
        reservation.used = 0
        self._holders.pop(reservation.order, None)


class Reservation:
    """One DATA phase's share of the budget; `release` it when the message is handed on."""

    def __init__(self, budget: DataMemoryBudget, order: int) -> None:
        self._budget = budget
        self.order = order
        self.held = 0  # budget bytes reserved
        self.used = 0  # budget bytes accounted to received data

    def try_grow(self, received: int) -> bool:
        """Account `received` more bytes without waiting; False when that needs room now."""
        cost = received * COPIES
        if self.used + cost <= self.held:
            self.used += cost
            return True
        need = max(self._budget.chunk, self.used + cost - self.held)
        if self._budget._try(self, need):
            self.used += cost
            return True
        return False

    async def grow(self, received: int, *, within: float) -> bool:
        """Account `received` more bytes, waiting up to `within` seconds for room.

        False means the reservation was spilled (no room can come, or none came in time): it
        holds nothing now and the caller must stop keeping the message.
        """
        if self.try_grow(received):
            return True
        cost = received * COPIES
        need = max(self._budget.chunk, self.used + cost - self.held)
        if not await self._budget._wait(self, need, within):
            self.release()
            return False
        self.used += cost
        return True

    async def admit(self, declared: int | None, *, within: float) -> bool:
        """Before reading: reserve the whole declared size at once (module docstring)."""
        if not declared:
            return True
        cost = declared * COPIES
        if self._budget._try(self, cost) or await self._budget._wait(self, cost, within):
            return True
        self.release()
        return False

    def release(self) -> None:
        """Give all room back (message handed on, refused, or the client went away)."""
        self._budget._give_back(self)
        self._budget._grant()
