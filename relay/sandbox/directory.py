# Why this module exists: both fake services answer from the same directory, as the real ones
# do: Entra needs tenants and app registrations (with their secret, certificates and granted
# application roles), Graph needs mailboxes (licensed or not, with their Send-As grants) and
# must be able to tell that the app behind a token still exists.
"""The sandbox's directory: tenants, app registrations and mailboxes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .pki import thumbprint_b64url

__all__ = ["AppRegistration", "Directory", "Mailbox", "address_key", "is_valid_address"]

# Exchange matches SMTP addresses without case for the ASCII letters only: str.lower() would also
# turn the Kelvin sign (U+212A) into "k", making a look-alike From pass the Send-As check.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# Deliberately simple: Exchange only needs a resolvable SMTP address, local@domain, with no
# whitespace or address-list punctuation. Quoted local parts are rare enough to refuse.
_ADDRESS = re.compile(r"[^\s@<>()\[\],;:\"\\]+@[\w-]+(\.[\w-]+)*")


def address_key(address: str) -> str:
    """`address` as Exchange compares it: A-Z lowered, nothing else folded."""
    return address.translate(_ASCII_LOWER)


def is_valid_address(address: str) -> bool:
    """Whether `address` is a plain SMTP address Graph could resolve."""
    return _ADDRESS.fullmatch(address) is not None


@dataclass(frozen=True, slots=True)
class AppRegistration:
    """An app registration as far as the client-credentials flow cares."""

    tenant_id: str
    client_id: str
    secret: str | None
    # base64url SHA-1 and SHA-256 thumbprints (the `x5t` / `x5t#S256` header values) -> cert
    certificates: dict[str, x509.Certificate]
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Mailbox:
    """An Exchange Online mailbox; `send_as` lists the addresses it holds Send-As rights on."""

    address: str
    licensed: bool
    send_as: frozenset[str]

    def may_send_as(self, address: str) -> bool:
        wanted = address_key(address)
        return wanted == self.address or wanted in self.send_as


class Directory:
    """Mutable registry; every identifier is compared case-insensitively, like Entra and EXO."""

    def __init__(self, *, open_mailboxes: bool = False) -> None:
        self.open_mailboxes = open_mailboxes
        self._tenants: dict[str, dict[str, AppRegistration]] = {}
        self._mailboxes: dict[str, Mailbox] = {}

    def add_tenant(self, tenant_id: str) -> None:
        self._tenants.setdefault(tenant_id.lower(), {})

    def has_tenant(self, tenant_id: str) -> bool:
        return tenant_id.lower() in self._tenants

    def add_app(
        self,
        tenant_id: str,
        client_id: str,
        *,
        secret: str | None = None,
        certificate_pem: bytes | None = None,
        roles: Iterable[str] = ("Mail.Send",),
    ) -> None:
        """Register (or replace) an app in `tenant_id`, creating the tenant if needed."""
        certificates: dict[str, x509.Certificate] = {}
        if certificate_pem is not None:
            for cert in x509.load_pem_x509_certificates(certificate_pem):
                # SHA-1 here is the `x5t` naming scheme (RFC 7515 §4.1.7), not a security use.
                certificates[thumbprint_b64url(cert, hashes.SHA1())] = cert  # noqa: S303
                certificates[thumbprint_b64url(cert, hashes.SHA256())] = cert
        if secret is None and not certificates:
            raise ValueError("an app registration needs a secret or a certificate")
        self.add_tenant(tenant_id)
        self._tenants[tenant_id.lower()][client_id.lower()] = AppRegistration(
            tenant_id=tenant_id.lower(),
            client_id=client_id.lower(),
            secret=secret,
            certificates=certificates,
            roles=tuple(roles),
        )

    def remove_app(self, tenant_id: str, client_id: str) -> None:
        """Delete an app registration; tokens already issued to it stop working at Graph."""
        self._tenants.get(tenant_id.lower(), {}).pop(client_id.lower(), None)

    def find_app(self, tenant_id: str, client_id: str) -> AppRegistration | None:
        return self._tenants.get(tenant_id.lower(), {}).get(client_id.lower())

    def add_mailbox(
        self, address: str, *, licensed: bool = True, send_as: Iterable[str] = ()
    ) -> None:
        """Create (or replace) a mailbox that may send as itself and as each of `send_as`."""
        if not is_valid_address(address):
            raise ValueError(f"not an SMTP address: {address!r}")
        self._mailboxes[address_key(address)] = Mailbox(
            address=address_key(address),
            licensed=licensed,
            send_as=frozenset(address_key(a) for a in send_as),
        )

    def find_mailbox(self, address: str) -> Mailbox | None:
        """The mailbox for `address`; with `open_mailboxes`, any plausible address has one."""
        found = self._mailboxes.get(address_key(address))
        if found is None and self.open_mailboxes and is_valid_address(address):
            return Mailbox(address=address_key(address), licensed=True, send_as=frozenset())
        return found
