"""New queue ids: the key of a message in every store, in logs and in the 250 reply.

Why this module exists: the SMTP session, the bounce builder and the CLI all mint queue ids, and a
store must be able to trust their grammar (`relay.core.values.check_queue_id`). Randomness has no
place in the pure core, so the generator lives here, beside the stores that key on it.
"""

from __future__ import annotations

import uuid

__all__ = ["new_queue_id"]


def new_queue_id() -> str:
    """A fresh queue id: 16 upper-case hex digits, random, safe as a file name."""
    return uuid.uuid4().hex[:16].upper()
