"""The `clients:` and `routes:` sections: who may submit, as which senders, and which auth
object and mailbox deliver each sender's mail (DESIGN §3, §8).

Why this module exists: these two lists are the relay's access policy as the administrator
writes it. `relay.core.policy` reads them; they are pure values, checked here without I/O.
"""

from __future__ import annotations

import base64
import re

from pydantic import Field, SecretStr, field_validator, model_validator

from relay.config.units import ADDRESS_RE, AddressPattern, Network, StrictModel

__all__ = ["ClientConfig", "RouteConfig"]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class ClientConfig(StrictModel):
    """Who may submit mail, and as which senders.

    A client is recognised by its source `networks`, by SMTP AUTH (`username` and
    `password_hash`), or by both, in which case a session must come from one of the networks
    *and* authenticate. A client with credentials is never matched by network alone.
    """

    name: str = Field(min_length=1)
    networks: list[Network] = Field(default_factory=list)
    senders: list[AddressPattern] = Field(min_length=1)
    recipients: list[AddressPattern] | None = None
    username: str | None = None
    password_hash: SecretStr | None = None

    @field_validator("username")
    @classmethod
    def _username(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or len(value) > 128 or any(c.isspace() or not c.isprintable() for c in value)
        ):
            raise ValueError(
                "must be 1 to 128 printable characters without spaces, such as erp or scanner-3"
            )
        return value

    @field_validator("password_hash")
    @classmethod
    def _argon2id(cls, value: SecretStr | None) -> SecretStr | None:
        """An argon2id PHC string, or an error that never repeats the value (it may be the
        password itself, pasted by mistake)."""
        if value is None:
            return None
        text = value.get_secret_value()
        rerun = "run `smtp-graph-relay hash-password` and paste the line it prints"
        if text.startswith(("$argon2i$", "$argon2d$")):
            raise ValueError(f"is an argon2i or argon2d hash; the relay needs argon2id: {rerun}")
        if not text.startswith("$argon2id$"):
            raise ValueError(
                "is not an argon2id hash (it must start with $argon2id$); never put the "
                f"password itself here: {rerun}"
            )
        match = re.fullmatch(
            r"\$argon2id\$v=19\$m=\d{1,10},t=\d{1,10},p=\d{1,3}\$([A-Za-z0-9+/]{11,})"
            r"\$([A-Za-z0-9+/]{22,})",
            text,
        )
        if match is None or not all(cls._canonical_b64(part) for part in match.groups()):
            raise ValueError(f"is a damaged or truncated argon2id hash: {rerun} again")
        return value

    @staticmethod
    def _canonical_b64(text: str) -> bool:
        """PHC strings hold unpadded base64; a cut-off one decodes to different text."""
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except ValueError:  # binascii.Error is a ValueError
            return False
        return base64.b64encode(data).decode().rstrip("=") == text

    @model_validator(mode="after")
    def _identifiable(self) -> ClientConfig:
        if self.username is not None and self.password_hash is None:
            raise ValueError(
                "username needs a password_hash next to it; run `smtp-graph-relay "
                "hash-password` and paste the printed hash"
            )
        if self.password_hash is not None and self.username is None:
            raise ValueError("password_hash needs the username it belongs to")
        if not self.networks and self.username is None:
            raise ValueError(
                "networks is empty, so no connection could ever match this client; "
                "list the addresses or CIDR ranges it connects from, or give it a username "
                "and password_hash"
            )
        return self

    @property
    def has_credentials(self) -> bool:
        """True when sessions must authenticate (AUTH) to be this client."""
        return self.username is not None


class RouteConfig(StrictModel):
    """Which auth object and mailbox deliver the mail of the senders that match."""

    senders: list[AddressPattern] = Field(min_length=1)
    # What logs and metrics call the route; default: its first sender pattern. A queued message
    # is routed again by its sender at each attempt, so the name is a label, not a key.
    name: str | None = Field(default=None, min_length=1, max_length=100)
    auth_object: str
    # "sender", one mailbox, or a pool of mailboxes (each message goes out through the member
    # with the most sending budget left, relay.delivery.budget).
    mailbox: str | list[str] = "sender"
    rewrite_from: bool = False
    save_to_sent_items: bool = True

    @property
    def label(self) -> str:
        """The route's name in logs and metrics: `name`, else its first sender pattern."""
        return self.name or self.senders[0]

    @property
    def pool(self) -> tuple[str, ...]:
        """The pool's members; () unless `mailbox` lists two or more."""
        return tuple(self.mailbox) if isinstance(self.mailbox, list) else ()

    @property
    def mailbox_shown(self) -> str:
        """The mailbox as an operator reads it (status page, check-config)."""
        if isinstance(self.mailbox, list):
            return f"pool of {len(self.mailbox)}: {', '.join(self.mailbox)}"
        return "the sender's own mailbox" if self.mailbox == "sender" else self.mailbox

    @field_validator("mailbox")
    @classmethod
    def _mailbox(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            return cls._pool(value)
        if value != "sender" and not ADDRESS_RE.match(value):
            raise ValueError(
                f"{value!r} must be 'sender' (each sender's own mailbox), one mailbox "
                "address such as relay@contoso.com, or a pool [noreply1@contoso.com, "
                "noreply2@contoso.com]"
            )
        return value

    @staticmethod
    def _pool(members: list[str]) -> str | list[str]:
        if not members:
            raise ValueError("a pool needs at least one mailbox address")
        seen: set[str] = set()
        for member in members:
            if not isinstance(member, str) or not ADDRESS_RE.match(member):
                raise ValueError(
                    f"pool member {member!r} must be a mailbox address such as "
                    "noreply1@contoso.com ('sender' cannot be part of a pool)"
                )
            folded = member.translate(_ASCII_LOWER)
            if folded in seen:
                raise ValueError(f"pool member {member!r} is listed twice")
            seen.add(folded)
        return members[0] if len(members) == 1 else members
