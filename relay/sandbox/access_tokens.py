# Why this module exists: Graph must only honour tokens Entra issued, and must refuse them
# once expired, revoked, or orphaned by a deleted app, so the relay's "401 -> fresh token ->
# retry once" path (DESIGN §5) can be tested. Tokens are HS256 JWTs under a per-sandbox key,
# carrying Entra's app-only claims, so they look like the real thing on the wire.
"""Access tokens shared by the fake Entra (which mints them) and the fake Graph (which checks)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .directory import AppRegistration, Directory
from .jose import JoseError, sign_hs256, verify_hs256

__all__ = ["GRAPH_APP_ID", "GRAPH_RESOURCE", "AccessTokens", "InvalidTokenError", "TokenClaims"]

GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"  # Microsoft Graph's well-known app id


class InvalidTokenError(Exception):
    """Graph must answer 401 InvalidAuthenticationToken with this message."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What Graph learns from a valid access token."""

    tenant_id: str
    client_id: str
    roles: tuple[str, ...]
    jti: str


class AccessTokens:
    """Mints and checks the sandbox's access tokens: HS256 JWTs under a per-sandbox key,
    carrying Entra's app-only claims (`tid`, `appid`, `roles`, `aud`, `exp`, ...)."""

    def __init__(self, directory: Directory, clock: Callable[[], float], lifetime: int) -> None:
        self._directory = directory
        self._clock = clock
        self.lifetime = lifetime
        self._key = secrets.token_bytes(32)
        self._issued: set[str] = set()
        self._revoked: set[str] = set()

    def issue(
        self, app: AppRegistration, *, issuer_host: str, expires_in: int | None = None
    ) -> str:
        now = int(self._clock())
        jti = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "aud": GRAPH_RESOURCE,
            "iss": f"{issuer_host}/{app.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": now + (self.lifetime if expires_in is None else expires_in),
            "app_displayname": f"sandbox app {app.client_id}",
            "appid": app.client_id,
            "appidacr": "2" if app.certificates else "1",
            "idtyp": "app",
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{app.tenant_id}/{app.client_id}")),
            "tid": app.tenant_id,
            "uti": jti,
            "ver": "1.0",
        }
        if app.roles:  # Entra omits the claim when no application permission is granted
            claims["roles"] = list(app.roles)
        self._issued.add(jti)
        return sign_hs256(claims, self._key, header={"kid": "sandbox"})

    def revoke_all(self) -> None:
        self._revoked |= self._issued

    def validate(self, token: str, audiences: frozenset[str]) -> TokenClaims:
        """The claims of a token Graph should honour, or InvalidTokenError saying why not."""
        try:
            claims = verify_hs256(token, self._key)
        except JoseError as exc:
            raise InvalidTokenError(f"Access token validation failure. {exc}.") from exc
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int) or not isinstance(nbf, int) or not nbf <= now < exp:
            raise InvalidTokenError("Access token has expired or is not yet valid.")
        if claims.get("aud") not in audiences:
            raise InvalidTokenError("Access token validation failure. Invalid audience.")
        jti, tenant, client = str(claims.get("uti")), str(claims.get("tid")), claims.get("appid")
        if jti in self._revoked:
            raise InvalidTokenError("Access token validation failure. The token has been revoked.")
        if not isinstance(client, str) or self._directory.find_app(tenant, client) is None:
            raise InvalidTokenError(
                "Access token validation failure. The application no longer exists in the tenant."
            )
        roles = claims.get("roles", [])
        return TokenClaims(
            tenant_id=tenant,
            client_id=client,
            roles=tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else (),
            jti=jti,
        )
