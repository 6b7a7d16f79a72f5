"""Password hashes for SMTP AUTH: argon2id PHC strings, and the `hash-password` command.

Why this module exists: the hash format is shared by two very different users, the CLI that
prints a hash for `clients[].password_hash` and the SMTP authenticator (`relay.auth`) that checks
one. Keeping it apart from the SMTP side keeps the one place that decides the cost of a hash
short enough to review, and lets the command use it without aiosmtpd. Nothing here logs a
password or puts one in an exception.

Verification reads the cost from the stored string, so hashes made with other parameters keep
working when `HASH_PARAMETERS` changes.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from typing import TextIO

from argon2 import Parameters, PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "DEFAULT_HASHER",
    "HASH_PARAMETERS",
    "hash_password",
    "hash_password_command",
    "verify_password",
]

# RFC 9106 §4, the second recommended option ("if much less memory is available"): argon2id,
# t=3 passes over m=64 MiB with p=4 lanes, 16-byte salt, 32-byte tag. About 0.1 s on one core;
# 64 MiB per check in flight, which `SmtpAuthenticator.max_parallel` bounds.
HASH_PARAMETERS = Parameters(
    type=Type.ID,
    version=19,
    salt_len=16,
    hash_len=32,
    time_cost=3,
    memory_cost=64 * 1024,  # KiB
    parallelism=4,
)
DEFAULT_HASHER = PasswordHasher.from_parameters(HASH_PARAMETERS)


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """An argon2id PHC string (`$argon2id$v=19$m=65536,t=3,p=4$salt$tag`) for `password`."""
    return (hasher if hasher is not None else DEFAULT_HASHER).hash(password)


def verify_password(
    password_hash: str, password: bytes | str, hasher: PasswordHasher | None = None
) -> bool:
    """True when `password` matches; False for a mismatch or an unusable hash (never raises)."""
    try:
        return (hasher if hasher is not None else DEFAULT_HASHER).verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def hash_password_command(
    *,
    use_stdin: bool,
    out: TextIO,
    stdin: TextIO | None = None,
    err: TextIO | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
    hasher: PasswordHasher | None = None,
) -> int:
    """`hash-password`: read a password, print only its hash. Returns the exit code.

    From a terminal the password is read twice without echo; with `--stdin`, or when stdin is
    not a terminal, it is the single line on stdin (its line ending removed).
    """
    stdin = stdin or sys.stdin
    err = err or sys.stderr
    if use_stdin or not stdin.isatty():
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
        if not stdin.isatty() and stdin.read().strip("\r\n"):
            print("give one password on one line of standard input", file=err)
            return 1
    else:
        password = prompt("Password: ")
        if prompt("Repeat password: ") != password:
            print("the two passwords differ; nothing was hashed", file=err)
            return 1
    if not password:
        print("the password is empty; nothing was hashed", file=err)
        return 1
    out.write(hash_password(password, hasher) + "\n")
    return 0
