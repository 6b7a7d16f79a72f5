"""The embedded default store: one directory tree on the local file system (DESIGN §6).

A 250 is a promise (RFC 5321 §6.1), kept across kill -9: the relay answers 250 only after `put`
returns, so the message must survive any crash from that instant until Graph accepted it or an
operator gave up on it. The shape follows GNU Mailman's switchboard (write temp, fsync, rename;
claim by rename; recover claimed entries at start; quarantine what keeps crashing the worker)
plus the directory fsyncs Mailman lacks.

Modules, one concern each:

    layout.py     the directory tree and the durable steps (temp write, rename, fsyncs, set aside)
    recovery.py   the lock and what `open` makes of a dead process's leftovers
    operator.py   find, list, retry, delete, purge: safe beside a running relay
    spool.py      `Spool`, the blocking layer: the relay's moves, plus the above in one object
    store.py      `FileStore`, the `relay.store.protocol.Store` over a `Spool`: its own threads,
                  the in-memory due index and incremental stats

Theory of operation
-------------------
Layout under the root (directories 0700, files 0600)::

    tmp/<id>.<random>.tmp    being written; meaningless after a crash
    data/<id>.eml            message bytes, written once, never modified
    queue/<id>.json          waiting, including deferred entries (next_attempt in the future)
    active/<id>.json         claimed by a worker of the running relay
    dead/<id>.json           given up (permanent failure, expired); kept for the operator
    quarantine/<id>.json     crashed the relay CRASH_LIMIT times; kept for the operator
    hold/<id>.json           held by the operator (`queue hold`); never claimed until released
    corrupt/<id>.json[.N]    unreadable or mismatching entry moved aside, with corrupt/<id>.eml[.N]
    lock                     flock()ed by the relay between open() and close(): one relay a spool
    paused.json              the mailboxes the operator paused, replaced whole (paused.py),
                             with paused.lock serialising two operators

The directory holding an entry's metadata is its state. An entry has exactly one metadata file
at every instant: each state change is one rename, or an atomic rewrite in place (tmp, fsync,
rename over) followed by one rename. Metadata is created after its data and removed before it.

Commit point of `put` (`Spool.store`): the rename of the metadata into queue/ (active/ if
`claimed`), made after the data file was fsynced, renamed into data/ and data/ fsynced. queue/ is
fsynced before `put` returns, so the 250 always follows a durable commit. After every rename the
destination directory is fsynced, then the source: a file system that loses the second leaves the
entry under both names, which recovery resolves, never under neither. Unlinks fsync their
directory.

Crash windows (kill -9 after the step named) and what `open` (recovery) makes of them:

    operation        crash after                 left on disk              recovery
    store            tmp file written            tmp/ file                 removed (no 250 given)
    store            data renamed into data/     data without metadata     orphan, removed
    store            metadata renamed (commit)   whole entry, no 250 yet   kept; a resent copy
                                                                           is a duplicate, not loss
    claim, retry of  rename into active/         active/ entry             crashes+1 -> queue/
      a queued entry
    defer, bury      rewrite in active/          active/, new fields       crashes+1 -> queue/
    release, defer,  rename out of active/       queue/ or dead/ entry     kept as is
      bury, retry
    retry (dead/,    rewrite in place            entry, reason cleared     kept as is
      quarantine/)
    complete,        metadata unlinked           data without metadata     orphan, removed
      discard, delete
    open             active/ rewritten, crashes  active/ entry             counted once more:
                     +1, not yet renamed                                   quarantine comes early
    set aside        data moved to corrupt/      metadata without data     set aside too
    any rename       power loss, no journal      same id in two states     keep the first readable
                                                                           of queue > quarantine >
                                                                           dead > active
    (any time)       -                           bad JSON, version or id,  data, then metadata,
                                                 or data file missing      moved to corrupt/
    (any read)       -                           data shorter, longer or   set aside the same way
                                                 not matching its SHA-256  by `read_message`

An entry still in active/ at start was held by a process that died: it goes back to queue/ with
crashes+1, or to quarantine/ once crashes reaches CRASH_LIMIT (a kill of the whole relay counts
against every entry it held, as in Mailman). Recovery also empties tmp/: a CLI rewrite racing a
relay start then fails cleanly and can be repeated.

Operator operations (the `queue` CLI) run beside the relay without the lock, using the same
renames. A queue/ entry is changed only after claiming it (rename into active/), so a worker that
loses the race sees it vanish rather than a second copy; `delete` unlinks metadata before data and
reports False if the metadata was claimed meanwhile. Workers never touch dead/ or quarantine/.
"""

from relay.store.files.store import FileStore, StoreLockedError

__all__ = ["FileStore", "StoreLockedError"]
