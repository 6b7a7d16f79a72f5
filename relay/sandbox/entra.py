# Why this module exists: the relay gets app-only tokens from Entra ID with MSAL's
# client-credentials flow (DESIGN §1, §2 tokens.py), and `test-auth` must explain each AADSTS
# failure. This fake Entra serves OpenID discovery and the v2.0 token endpoint with Entra's wire
# format (error JSON with `error_codes`, `trace_id`, `correlation_id`, "AADSTSnnnn:" descriptions),
# checks secrets and certificate assertions like Entra, and issues `access_tokens`.
"""A stand-in for the Microsoft Entra ID v2.0 endpoints used by the client-credentials flow."""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import uuid
from collections.abc import Mapping
from urllib.parse import unquote_plus

from aiohttp import web

from .backend import Backend
from .directory import AppRegistration
from .jose import JoseError, parse_compact, verify_rsa_signature

__all__ = ["EntraService"]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLOCK_SKEW = 300  # seconds Entra tolerates on client assertion times


class EntraError(Exception):
    """An Entra OAuth error answer: HTTP status, OAuth `error`, AADSTS number, description."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.code, self.description = status, error, code, description


class EntraService:
    """aiohttp handlers for discovery and the token endpoint."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/{tenant}/v2.0/.well-known/openid-configuration", self.discovery),
            web.get("/{tenant}/discovery/v2.0/keys", self.keys),
            web.post("/{tenant}/oauth2/v2.0/token", self.token),
        ]

    async def discovery(self, request: web.Request) -> web.StreamResponse:
        tenant = request.match_info["tenant"]
        self._backend.journal.entra_requests += 1
        await self._backend.journal.notify()
        outage = self._outage(request)
        if outage is not None:
            return outage
        if not self._backend.directory.has_tenant(tenant):
            return self._error(
                request,
                EntraError(
                    400,
                    "invalid_tenant",
                    90002,
                    f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant "
                    "ID and are signing into the correct cloud. Check with your subscription "
                    "administrator, this may happen if there are no active subscriptions for the "
                    "tenant.",
                ),
            )
        base = f"{_origin(request)}/{tenant.lower()}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/v2.0",
                "request_uri_parameter_supported": False,
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "msgraph_host": request.host,
            }
        )

    async def keys(self, request: web.Request) -> web.StreamResponse:
        # Sandbox tokens are MACed, not signed, so there is no public key to publish.
        self._backend.journal.entra_requests += 1
        return self._outage(request) or web.json_response({"keys": []})

    async def token(self, request: web.Request) -> web.StreamResponse:
        self._backend.journal.token_requests += 1
        self._backend.journal.entra_requests += 1
        try:
            outage = self._outage(request)
            if outage is not None:
                return outage
            status = self._backend.faults.take_token_fault()
            if status is not None:
                return _gateway_error(status)
            try:
                form = await request.post()
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                access_token = self._grant(request, fields)
            except EntraError as exc:
                return self._error(request, exc)
            self._backend.journal.tokens_issued += 1
            lifetime = self._backend.tokens.lifetime
            return web.json_response(
                {
                    "token_type": "Bearer",
                    "expires_in": lifetime,
                    "ext_expires_in": lifetime,
                    "access_token": access_token,
                },
                headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
            )
        finally:
            await self._backend.journal.notify()

    def _outage(self, request: web.Request) -> web.StreamResponse | None:
        """The answer while Entra is down (FaultPlan.token_endpoint_down), else None."""
        outage = self._backend.faults.token_outage
        if outage is None:
            return None
        if outage.abort:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)  # never sent: the connection is gone
        response = _gateway_error(503)
        if outage.retry_after is not None:
            response.headers["Retry-After"] = outage.retry_after
        return response

    def _grant(self, request: web.Request, form: Mapping[str, str]) -> str:
        tenant = request.match_info["tenant"]
        if not self._backend.directory.has_tenant(tenant):
            raise EntraError(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                "and are signing into the correct cloud. Check with your subscription "
                "administrator, this may happen if there are no active subscriptions for the "
                "tenant.",
            )
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _missing("grant_type")
        if grant_type != "client_credentials":
            raise EntraError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        basic_id, basic_secret = _basic_credentials(request)
        client_id = form.get("client_id") or basic_id
        if not client_id:
            raise _missing("client_id")
        app = self._backend.directory.find_app(tenant, client_id)
        if app is None:
            raise EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You may "
                "have sent your authentication request to the wrong tenant.",
            )
        assertion = form.get("client_assertion")
        secret = form.get("client_secret") or basic_secret
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise EntraError(
                    400,
                    "invalid_request",
                    700025,  # sandbox choice; real Entra's wording for this case is unverified
                    f"'client_assertion_type' must be '{JWT_BEARER}'.",
                )
            self._check_assertion(app, assertion, f"{_origin(request)}/{tenant}")
        elif secret:
            if app.secret is None or not hmac.compare_digest(
                secret.encode("utf-8"), app.secret.encode("utf-8")
            ):
                raise EntraError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    "is the client secret value, not the client secret ID, for a secret added to "
                    f"app '{app.client_id}'.",
                )
        else:
            raise EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
            )
        self._check_scope(form.get("scope"))
        return self._backend.tokens.issue(app, issuer_host="https://sts.windows.net")

    def _check_scope(self, scope: str | None) -> None:
        if not scope:
            raise _missing("scope")
        scopes = scope.split()
        for item in scopes:
            if not item.endswith("/.default"):
                raise EntraError(
                    400,
                    "invalid_scope",
                    1002012,
                    f"The provided value for scope {item} is not valid. Client credential flows "
                    "must have a scope value with /.default suffixed to the resource identifier "
                    "(application ID URI).",
                )
        resource = scopes[0].removesuffix("/.default").rstrip("/").lower()
        if len(scopes) > 1 or resource not in self._backend.resources():
            raise EntraError(
                400,
                "invalid_scope",
                70011,
                "The provided request must include a 'scope' input parameter. The provided "
                f"value for the input parameter 'scope' is not valid. The scope {scope} is not "
                "valid.",
            )

    def _check_assertion(self, app: AppRegistration, assertion: str, tenant_base: str) -> None:
        try:
            parsed = parse_compact(assertion)
        except JoseError as exc:
            raise EntraError(
                400, "invalid_request", 50027, f"JWT token is invalid or malformed. {exc}."
            ) from exc
        thumbprint = parsed.header.get("x5t#S256") or parsed.header.get("x5t")
        # MSAL keeps the base64 padding on x5t; the thumbprint is the same either way.
        cert = app.certificates.get(thumbprint.rstrip("=")) if isinstance(thumbprint, str) else None
        shown = _hex_thumbprint(thumbprint)
        if cert is None:
            raise _bad_assertion(app, shown, "The key was not found.")
        try:
            verify_rsa_signature(cert.public_key(), parsed)
        except JoseError as exc:
            raise _bad_assertion(app, shown, f"{str(exc).capitalize()}.") from exc
        claims = parsed.claims
        if (
            claims.get("iss") != claims.get("sub")
            or str(claims.get("iss")).lower() != app.client_id
        ):
            raise EntraError(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            )
        expected_aud = f"{tenant_base}/oauth2/v2.0/token".lower()
        if str(claims.get("aud", "")).lower() != expected_aud:
            raise _bad_assertion(app, shown, f"The audience must be '{expected_aud}'.")
        now = self._backend.clock()
        exp, nbf = claims.get("exp"), claims.get("nbf", now)
        if not isinstance(exp, (int, float)) or not isinstance(nbf, (int, float)):
            raise _bad_assertion(app, shown, "The assertion has no numeric 'exp' claim.")
        if not nbf - CLOCK_SKEW <= now < exp + CLOCK_SKEW:
            raise EntraError(
                401,
                "invalid_client",
                700024,
                "Client assertion is not within its valid time range. "
                f"Current time: {_iso(now)}, assertion valid from {_iso(nbf)}, "
                f"expiry time of assertion {_iso(exp)}.",
            )

    def _error(self, request: web.Request, exc: EntraError) -> web.Response:
        now = self._backend.clock()
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
        return web.json_response(
            {
                "error": exc.error,
                "error_description": (
                    f"AADSTS{exc.code}: {exc.description}\r\nTrace ID: {trace_id}\r\n"
                    f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
                ),
                "error_codes": [exc.code],
                "timestamp": stamp,
                "trace_id": trace_id,
                "correlation_id": correlation_id,
                "error_uri": f"{_origin(request)}/error?code={exc.code}",
            },
            status=exc.status,
            headers={"Cache-Control": "no-store", "x-ms-request-id": trace_id},
        )


def _origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _missing(parameter: str) -> EntraError:
    return EntraError(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{parameter}'.",
    )


def _bad_assertion(app: AppRegistration, thumbprint: str, reason: str) -> EntraError:
    return EntraError(
        401,
        "invalid_client",
        700027,
        f"Client assertion contains an invalid signature. [Reason - {reason}, Thumbprint of key "
        f"used by client: '{thumbprint}', Please visit the Azure Portal, Graph Explorer or "
        f"directly use MS Graph to see configured keys for app Id '{app.client_id}'.]",
    )


def _hex_thumbprint(value: object) -> str:
    if not isinstance(value, str):
        return ""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex().upper()
    except (binascii.Error, ValueError):
        return value


def _basic_credentials(request: web.Request) -> tuple[str | None, str | None]:
    """client_secret_basic (RFC 6749 §2.3.1): form-urlencoded id and secret in Basic auth."""
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    client_id, sep, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else (None, None)


def _gateway_error(status: int) -> web.Response:
    """What a front door says when the service behind it is away: HTML, not OAuth JSON."""
    text = f"<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>"
    return web.Response(status=status, text=text, content_type="text/html")


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(float(timestamp), datetime.UTC)
    return moment.strftime("%m/%d/%Y %H:%M:%S")
