"""Self-signed certificates for tests, built in one place.

Why this module exists: several suites need a throwaway certificate and its private key (an app
registration's certificate credential, a key that does not belong to a certificate, an extra trust
anchor). Each used to carry its own copy of the same `x509.CertificateBuilder` chain; this is that
chain once, with the few choices the tests actually vary as keyword arguments. The relay's own TLS
listeners use trustme (see conftest.py) because they need a CA-issued server certificate.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = ["SelfSigned", "self_signed"]

KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# Backdated so that a verifier whose clock is slightly behind ours still sees a valid certificate.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class SelfSigned:
    """A certificate and the private key that signed it."""

    certificate: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (what MSAL and the relay's config read)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, folder: Path, stem: str = "certificate") -> tuple[Path, Path]:
        """Write `<stem>.crt` and `<stem>.key` into `folder`; return (cert_path, key_path)."""
        cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


def self_signed(
    common_name: str, *, key_type: KeyType = "rsa", ca: bool = False, days: int = 30
) -> SelfSigned:
    """A new key and a certificate for `common_name` signed by it (SHA-256), valid from a few
    minutes ago for `days` days. `ca=True` adds a critical BasicConstraints(ca=True) extension,
    which trust stores need before they list the certificate as an anchor. RSA keys are 2048-bit
    (the slow part: share one across tests where they only need "some certificate"); EC keys use
    P-256."""
    key: PrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    return SelfSigned(builder.sign(key, hashes.SHA256()), key)
