# Why this module exists: the fake Entra must both mint access tokens that the fake Graph can
# check, and verify the client assertions MSAL signs with a certificate (RFC 7523 §3). Both are
# compact JWS (RFC 7515); doing the few steps ourselves with `cryptography` keeps the sandbox free
# of a JWT dependency and makes every rejection reason explicit.
"""Compact JWS helpers: base64url, HS256 tokens, RS256/PS256 signature checks."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = [
    "JoseError",
    "ParsedJws",
    "b64url_decode",
    "b64url_encode",
    "parse_compact",
    "sign_hs256",
    "verify_hs256",
    "verify_rsa_signature",
]


class JoseError(ValueError):
    """A token is malformed or its signature does not verify; the message says which."""


@dataclass(frozen=True, slots=True)
class ParsedJws:
    """The three parts of a compact JWS, decoded but not yet verified."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    try:
        raw = text.encode("ascii")
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise JoseError("not base64url") from exc


def parse_compact(token: str) -> ParsedJws:
    """Split and decode `header.payload.signature`; both JSON parts must be objects."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise JoseError("JWT is not well formed: expected header.payload.signature")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (JoseError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JoseError("JWT header or payload is not base64url-encoded JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JoseError("JWT header and payload must be JSON objects")
    return ParsedJws(
        header=header,
        claims=claims,
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii"),
        signature=b64url_decode(parts[2]),
    )


def sign_hs256(
    claims: Mapping[str, Any], key: bytes, *, header: Mapping[str, Any] | None = None
) -> str:
    """A compact JWS over `claims`, MACed with HMAC-SHA256 under `key` (RFC 7518 §3.2)."""
    head = {"typ": "JWT", "alg": "HS256", **dict(header or {})}
    signing_input = ".".join(
        b64url_encode(json.dumps(part, separators=(",", ":")).encode("utf-8"))
        for part in (head, dict(claims))
    )
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def verify_hs256(token: str, key: bytes) -> dict[str, Any]:
    """The claims of an HS256 token MACed under `key`. Time claims are not checked here."""
    parsed = parse_compact(token)
    if parsed.header.get("alg") != "HS256":
        raise JoseError(f"unexpected signing algorithm {parsed.header.get('alg')!r}")
    expected = hmac.new(key, parsed.signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, parsed.signature):
        raise JoseError("signature validation failed")
    return parsed.claims


def verify_rsa_signature(public_key: PublicKeyTypes, parsed: ParsedJws) -> None:
    """Check an RS256 (PKCS#1 v1.5) or PS256 (RSASSA-PSS) signature, the two algorithms MSAL
    uses for certificate credentials (RFC 7518 §3.3, §3.5)."""
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise JoseError("the registered certificate does not hold an RSA key")
    alg = parsed.header.get("alg")
    scheme: padding.AsymmetricPadding
    if alg == "RS256":
        scheme = padding.PKCS1v15()
    elif alg == "PS256":
        scheme = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    else:
        raise JoseError(f"unsupported signing algorithm {alg!r}")
    try:
        public_key.verify(parsed.signature, parsed.signing_input, scheme, hashes.SHA256())
    except InvalidSignature as exc:
        raise JoseError("the provided signature value did not match the expected value") from exc
