"""Delivery: carry out the core's decisions against the store and Graph.

One role per module, as Postfix has one program per queue role:

- `engine`: the three modes (direct, queue, hybrid) and the inline attempt's hand-off;
  `submit` returns `Accepted` or `Refused`, never reply text.
- `workers`: the claim loop over `Store.due` / `claim` / `refresh` / `next_due`.
- `attempt`: one Graph request, its route found again by sender; the `GraphSender` protocol.
- `outcomes`: records `relay.core.lifecycle.settle`'s decisions; keeps what the store refuses.
- `slots`: 4 concurrent Graph requests per mailbox, and pauses after a 429.
- `bounces`: builds the DSN the core decided is due.

Nothing here decides a message's fate (that is `relay.core.lifecycle`) or touches a file
(that is `relay.store`).
"""
