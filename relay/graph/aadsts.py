"""AADSTS knowledge: what an Entra token failure means and which setup step fixes it.

Why this module exists: an app registration can be wrong in a dozen ways (wrong or expired secret,
unknown app or tenant, certificate not uploaded, app disabled, bad scope), and each surfaces as an
`AADSTS<n>` code buried in an MSAL result dict or deep in an exception chain from MSAL or
`requests`. This module is the one place that reads those codes and turns them into a
`TransientDeliveryError` (451 4.7.0) carrying the code and the remedy, so `relay.graph.tokens` stays
a thin I/O shell around MSAL.

It is pure: values in, errors out. Nothing here talks to the network, reads files or logs, and
nothing here imports MSAL or `requests`: `relay.graph.tokens` converts their exceptions once, at
its boundary, into a `TokenFailure` (what kind of failure, and the text of the exception chain),
and this module maps that value to the error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from relay.core.errors import SmtpReply, TransientDeliveryError

__all__ = [
    "TokenFailure",
    "TokenFailureKind",
    "aadsts_code",
    "error_from_empty_result",
    "error_from_failure",
    "error_from_result",
    "remedy_for",
]

# What went wrong on the way to a token, as `relay.graph.tokens` classifies the exception:
# tls (certificate not trusted), proxy, timeout, unreachable (any other transport failure),
# service (Entra answered 5xx), unreadable (an answer MSAL could not read, incl. a refused
# OpenID discovery), local (ca_file missing or unreadable), other (anything else).
TokenFailureKind = Literal[
    "tls", "proxy", "timeout", "unreachable", "service", "unreadable", "local", "other"
]


@dataclass(frozen=True, slots=True)
class TokenFailure:
    """A failed token request as a value: its kind, the exception's type name and the text of
    its whole chain (`str()` of each exception, newest first, joined by " <- ")."""

    kind: TokenFailureKind
    type_name: str
    text: str


_DESCRIPTION_LIMIT = 300

# AADSTS code -> the setup step that fixes it. Meanings from Entra's error code reference
# (MicrosoftDocs/entra-docs, docs/identity-platform/reference-error-codes.md).
_REMEDIES: Mapping[str, str] = {
    "AADSTS7000215": (
        "the client secret is wrong: in App registrations > (the app) > Certificates & secrets "
        "create a new client secret and copy its Value (not the Secret ID) into the relay's "
        "client secret"
    ),
    "AADSTS7000222": (
        "the client secret has expired: create a new one in App registrations > (the app) > "
        "Certificates & secrets and put its Value into the relay's client secret"
    ),
    "AADSTS700016": (
        "no application with this client_id in the tenant: copy the Application (client) ID from "
        "the app registration's Overview page, and check that tenant_id is the Directory (tenant) "
        "ID of the tenant where the app is registered"
    ),
    "AADSTS90002": (
        "tenant not found: copy the Directory (tenant) ID from the app registration's Overview "
        "page into tenant_id, and check that cloud (global, usgov, usgov-dod, china) is the "
        "tenant's cloud"
    ),
    "AADSTS900023": (
        "tenant_id is not a valid tenant: copy the Directory (tenant) ID GUID from the app "
        "registration's Overview page"
    ),
    "AADSTS700027": (
        "the certificate was not accepted: upload the certificate in certificate_file (its public "
        "part, .cer/.pem) in App registrations > (the app) > Certificates & secrets > Certificates"
    ),
    "AADSTS700024": (
        "the signed client assertion was refused: check this host's clock (NTP), and upload the "
        "certificate in certificate_file in App registrations > (the app) > Certificates & secrets"
    ),
    "AADSTS1002012": (
        "invalid scope: set scope to https://graph.microsoft.com/.default (your cloud's Graph "
        "endpoint + /.default), or remove scope to use the default"
    ),
    "AADSTS70011": (
        "invalid scope: set scope to https://graph.microsoft.com/.default (your cloud's Graph "
        "endpoint + /.default), or remove scope to use the default"
    ),
    "AADSTS7000112": (
        "the application is disabled: in Enterprise applications > (the app) > Properties set "
        "'Enabled for users to sign in?' to Yes"
    ),
    "AADSTS500011": (
        "the resource in scope does not exist in the tenant: use the Microsoft Graph scope "
        "https://graph.microsoft.com/.default for your cloud, and check tenant_id"
    ),
}
# Entra `error` values that say "try again", not "fix the setup" (RFC 6749 §5.2, RFC 8628).
_RETRYABLE_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
_AADSTS_RE = re.compile(r"AADSTS(\d+)")


def remedy_for(code: str | None) -> str:
    """The setup step that fixes an AADSTS error code (``"AADSTS7000215"``)."""
    if code is None:
        return "check the auth object's tenant_id, client_id, credential and cloud"
    known = _REMEDIES.get(code)
    if known is not None:
        return known
    number = code.removeprefix("AADSTS")
    return (
        f"look up {code} at https://login.microsoftonline.com/error?code={number} and fix the "
        "app registration or the auth object"
    )


def aadsts_code(error_codes: object, description: str) -> str | None:
    """``"AADSTS<n>"`` from an Entra error's `error_codes` list, else from its description."""
    if isinstance(error_codes, list) and error_codes and isinstance(error_codes[0], int | str):
        return f"AADSTS{error_codes[0]}"
    match = _AADSTS_RE.search(description)
    return match.group(0) if match else None


def _reply(code: str | None) -> SmtpReply:
    what = f" ({code})" if code else ""
    return SmtpReply(451, "4.7.0", f"Cannot get a Microsoft 365 token{what}, try again later")


def _one_line(text: str, secret: str | None = None, limit: int = _DESCRIPTION_LIMIT) -> str:
    if secret:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_from_result(
    result: Mapping[str, Any], *, auth_name: str, secret: str | None = None
) -> TransientDeliveryError:
    """Convert an MSAL error result (`error`, `error_description`, `error_codes`) into our error.

    Configuration errors are retried like any transient failure, so no mail is lost while an
    administrator fixes the app registration, but they carry `alert=True` and the remedy.
    """
    error = str(result.get("error") or "unknown_error")
    description = _one_line(str(result.get("error_description") or ""), secret)
    code = aadsts_code(result.get("error_codes"), description)
    alert = error not in _RETRYABLE_ERRORS
    return TransientDeliveryError(
        f"token request for auth object {auth_name!r} failed: {error}: {description}",
        reply=_reply(code),
        alert=alert,
        code=code or error,
        remedy=remedy_for(code) if alert else "Entra asked to try again later; nothing to fix",
    )


def error_from_empty_result(*, auth_name: str) -> TransientDeliveryError:
    """MSAL returned neither a token nor an error dict (it returns None for some failures)."""
    return TransientDeliveryError(
        f"token request for auth object {auth_name!r} returned nothing",
        reply=_reply(None),
        remedy=remedy_for(None),
    )


def error_from_failure(
    failure: TokenFailure, *, auth_name: str, authority: str, secret: str | None = None
) -> TransientDeliveryError:
    """Convert a failed request to the authority (classified by relay.graph.tokens) into our
    error, naming the AADSTS code and the setup step that fixes it when the text has one."""
    host = urlparse(authority).netloc or authority
    where = f"token request for auth object {auth_name!r} to {host}"
    kind = failure.kind
    # The whole chain is searched (the AADSTS code sits deep in MSAL's __context__); only the
    # message is shortened.
    full = _one_line(failure.text, secret, limit=100_000)
    text = _one_line(full, limit=_DESCRIPTION_LIMIT)
    net = (
        f"the relay cannot reach {host}: check DNS, the firewall and the proxy "
        "(HTTPS_PROXY or the auth object's proxy)"
    )

    def transient(
        message: str, remedy: str, *, alert: bool = False, code: str | None = None, **kw: Any
    ) -> TransientDeliveryError:
        return TransientDeliveryError(
            f"{where}: {message}", reply=_reply(code), alert=alert, code=code, remedy=remedy, **kw
        )

    if kind == "tls":
        return transient(
            f"TLS verification failed: {text}",
            f"{host}'s certificate is not trusted: if a TLS-inspecting proxy is in the way, put "
            "its CA certificate into the auth object's ca_file",
            alert=True,  # does not heal by itself
        )
    if kind == "proxy":
        return transient(f"proxy failed: {text}", net)
    if kind == "timeout":
        return transient(f"timed out: {text}", net)
    if kind == "unreachable":
        return transient(f"unreachable: {text}", net)
    if kind == "service":
        # MSAL raises this for a 5xx from the token or discovery endpoint ("HTTP Error: 503").
        status = re.search(r"HTTP Error: (\d{3})", full)
        return transient(
            f"Entra answered an error: {text}",
            "Entra is having trouble; nothing to fix unless it persists",
            http_status=int(status.group(1)) if status else None,
        )
    if kind == "unreadable":
        found = _AADSTS_RE.search(full)
        # msal/authority.py: a 4xx from the OpenID discovery document (a tenant Entra does not
        # know answers 400 AADSTS90002) becomes ValueError("Unable to get authority
        # configuration ...") whose __context__ carries the response body.
        discovery = "OIDC Discovery failed" in full or "authority configuration" in full
        if discovery and (found or re.search(r"HTTP status: 4\d\d", full)):
            code = found.group(0) if found else None
            # The body is quoted JSON: keep "AADSTSnnnn: description" up to its escaped CRLF.
            detail = re.split(r"\\r\\n|Trace ID", full[found.start() :])[0] if found else text
            return transient(
                f"OpenID discovery refused the authority {authority}: {_one_line(detail)}",
                remedy_for(code or "AADSTS90002") + f"; the authority used was {authority}",
                alert=True,
                code=code,
            )
        return transient(
            f"unreadable answer from Entra: {text}",
            "Entra or a proxy answered something that is not Entra's JSON; nothing to fix "
            "unless it persists (then check the proxy and authority_host)",
        )
    if kind == "local":  # ca_file missing or unreadable
        return transient(
            f"cannot prepare TLS: {text}",
            "check that the auth object's ca_file exists and holds PEM certificates",
            alert=True,
        )
    return transient(
        f"{failure.type_name}: {text}", "see the relay's log; report it if it persists"
    )
