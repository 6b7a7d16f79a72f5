"""What an access token grants, read for `test-auth`: roles, tenant, app, audience, expiry.

Why this module exists: `test-auth` must say more than "a token came back": whether the app
holds the Mail.Send *application* role that sendMail needs, and for which tenant and app the
token was issued. That is reading a JWT's payload, which is pure (a string in, values out) and
has nothing to do with how the token was obtained (relay.graph.tokens).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "MAIL_SEND_MISSING",
    "TokenCheck",
    "TokenClaims",
    "decode_jwt_payload",
    "token_claims",
]

MAIL_SEND_MISSING = (
    "Mail.Send role missing -> grant the Mail.Send *application* permission (API permissions > "
    "Add a permission > Microsoft Graph > Application permissions) and grant admin consent"
)


def decode_jwt_payload(token: str) -> dict[str, Any]:
    """The claims of a JWS compact token, WITHOUT verifying its signature (diagnostics only)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a signed JWT (expected three dot-separated parts)")
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the JWT payload is not base64url-encoded JSON") from exc
    if not isinstance(payload, dict):
        raise ValueError("the JWT payload is not a JSON object")
    return payload


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What test-auth reports about an access token."""

    roles: tuple[str, ...]
    tenant_id: str | None
    app_id: str | None
    audience: str | None
    expires_at: datetime | None

    @property
    def has_mail_send(self) -> bool:
        return "Mail.Send" in self.roles


def token_claims(payload: Mapping[str, Any]) -> TokenClaims:
    """Pick the claims we report: roles, tid, appid (v1) or azp (v2), aud, exp."""
    roles = payload.get("roles")
    exp = payload.get("exp")
    app_id = payload.get("appid") or payload.get("azp")
    return TokenClaims(
        roles=tuple(str(r) for r in roles) if isinstance(roles, list) else (),
        tenant_id=str(payload["tid"]) if payload.get("tid") else None,
        app_id=str(app_id) if app_id else None,
        audience=str(payload["aud"]) if payload.get("aud") else None,
        expires_at=datetime.fromtimestamp(exp, UTC) if isinstance(exp, int | float) else None,
    )


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The outcome of `TokenProvider.check`: `ok` means a token with the Mail.Send role."""

    auth_name: str
    token_acquired: bool
    code: str | None = None
    description: str = ""
    remedy: str = ""
    claims: TokenClaims | None = None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.token_acquired and not self.problems
