"""The `auth_objects:` section: Entra app registrations and the credentials they sign in with
(DESIGN §1, §11).

Why this module exists: an auth object is the one place where a tenant, an app, a national cloud
and a credential come together, and most setup mistakes are made here. This module checks what
can be checked from the values alone (GUIDs, hosts, scope, exactly one credential source) and
holds the resolved credential in objects whose repr hides the secret. Reading secret files,
environment variables and certificates is the loader's job (`relay.config.credentials`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import PrivateAttr, SecretStr, field_validator, model_validator

from relay.config.units import DOMAIN_RE, GUID_RE, StrictModel

__all__ = [
    "CLOUDS",
    "CREDENTIAL_SOURCES",
    "AuthObjectConfig",
    "ClientCertificate",
    "ClientSecret",
    "Credential",
]

# Cloud presets: Entra authority host and Graph endpoint per national cloud
# (learn.microsoft.com "National cloud deployments" for Microsoft Graph).
CLOUDS: Mapping[str, tuple[str, str]] = {
    "global": ("https://login.microsoftonline.com", "https://graph.microsoft.com"),
    "usgov": ("https://login.microsoftonline.us", "https://graph.microsoft.us"),
    "usgov-dod": ("https://login.microsoftonline.us", "https://dod-graph.microsoft.us"),
    "china": ("https://login.chinacloudapi.cn", "https://microsoftgraph.chinacloudapi.cn"),
}
# The keys that name a credential; an auth object sets exactly one of them.
CREDENTIAL_SOURCES = (
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "certificate_file",
)


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """An app registration's client secret. The value never appears in repr or str."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "ClientSecret(***)"

    @classmethod
    def from_text(cls, value: str, where: str) -> ClientSecret:
        """The secret as pasted or read from `where`, without its line ending; empty is refused
        (the message names where it came from, never the value)."""
        value = value.strip("\r\n")
        if not value.strip():
            raise ValueError(f"the client secret from {where} is empty; paste the secret's Value")
        return cls(value)


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A certificate credential: PEM private key, PEM certificate and its thumbprints."""

    private_key_pem: str = field(repr=False)
    certificate_pem: str
    thumbprint_sha1: str
    thumbprint_sha256: str
    not_after: datetime

    def __str__(self) -> str:
        return f"ClientCertificate(sha1={self.thumbprint_sha1})"


Credential = ClientSecret | ClientCertificate


class AuthObjectConfig(StrictModel):
    """An Entra app registration used for the client-credentials flow."""

    tenant_id: str
    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    scope: str | None = None
    cloud: Literal["global", "usgov", "usgov-dod", "china"] | None = None
    authority_host: str | None = None
    graph_endpoint: str | None = None
    ca_file: Path | None = None
    proxy: str | None = None

    _credential: Credential | None = PrivateAttr(default=None)

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, value: str) -> str:
        # Entra takes the tenant's GUID or one of its verified domain names in the authority
        # (login.microsoftonline.com/{tenant}); the client-credentials flow needs one tenant,
        # so the multi-tenant aliases are refused (AADSTS9001023 for common and consumers).
        if value != value.strip():
            raise ValueError(
                f"{value!r} has spaces around it; remove them (the id is the GUID alone)"
            )
        if value.lower() in ("common", "organizations", "consumers"):
            raise ValueError(
                f"{value!r} names no tenant, and an app-only token (client credentials) must "
                "come from one tenant; put the Directory (tenant) ID GUID from the app "
                "registration's Overview page"
            )
        if value.lower().startswith(("https://", "http://")):
            raise ValueError(
                "is a URL; put only the tenant id, the GUID (or domain) after the host, such "
                "as 11111111-2222-3333-4444-555555555555 from https://login.microsoftonline.com/"
                "11111111-2222-3333-4444-555555555555/v2.0 (the relay builds the URL itself; "
                "choose the host with cloud:)"
            )
        if not (GUID_RE.match(value) or DOMAIN_RE.match(value)):
            raise ValueError(
                "must be the Directory (tenant) ID GUID from the app registration's Overview "
                "page, or the tenant's domain such as contoso.onmicrosoft.com"
            )
        return value

    @field_validator("client_id")
    @classmethod
    def _client(cls, value: str) -> str:
        if not GUID_RE.match(value):
            raise ValueError(
                "must be the Application (client) ID GUID from the app registration's Overview page"
            )
        return value

    @field_validator("authority_host", "graph_endpoint")
    @classmethod
    def _https_base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https://[^/\s]+/?$", value):
            raise ValueError(
                f"{value!r} must be an https:// scheme and host (with optional port) and no path, "
                "for example https://login.microsoftonline.com"
            )
        return value.rstrip("/")

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith("/.default"):
            raise ValueError(
                f"{value!r} does not end in /.default; the client-credentials flow needs the "
                "resource's .default scope, e.g. https://graph.microsoft.com/.default"
            )
        return value

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError(f"{value!r} must look like http://proxy.example.com:3128")
        return value

    @model_validator(mode="after")
    def _endpoints_and_credential(self) -> AuthObjectConfig:
        if (self.authority_host is None) != (self.graph_endpoint is None):
            raise ValueError(
                "authority_host and graph_endpoint go together; set both, or neither and "
                "choose a cloud (global, usgov, usgov-dod, china)"
            )
        if self.authority_host is not None and self.cloud is not None:
            raise ValueError(
                "cloud and authority_host/graph_endpoint both set; keep cloud for Microsoft's "
                "clouds, or the two hosts for anything else"
            )
        sources = [name for name in CREDENTIAL_SOURCES if getattr(self, name) is not None]
        if len(sources) != 1:
            found = ", ".join(sources) if sources else "none"
            raise ValueError(
                f"set exactly one credential: client_secret_file, client_secret_env, "
                f"client_secret or certificate_file (+ private_key_file); found {found}"
            )
        if self.private_key_file is not None and self.certificate_file is None:
            raise ValueError("private_key_file needs certificate_file next to it")
        if self.client_secret is not None:  # the value is right here: no reading needed
            self._credential = ClientSecret.from_text(
                self.client_secret.get_secret_value(), "client_secret"
            )
        return self

    @property
    def authority_host_url(self) -> str:
        return self.authority_host or CLOUDS[self.cloud or "global"][0]

    @property
    def graph_endpoint_url(self) -> str:
        return self.graph_endpoint or CLOUDS[self.cloud or "global"][1]

    @property
    def authority_url(self) -> str:
        """What MSAL takes as `authority`: the host with the tenant appended."""
        return f"{self.authority_host_url}/{self.tenant_id}"

    @property
    def graph_base_url(self) -> str:
        """Graph v1.0 root, e.g. https://graph.microsoft.com/v1.0."""
        return f"{self.graph_endpoint_url}/v1.0"

    @property
    def effective_scope(self) -> str:
        return self.scope or f"{self.graph_endpoint_url}/.default"

    @property
    def is_microsoft_cloud(self) -> bool:
        """True for a preset cloud host; MSAL's instance discovery only knows those."""
        return any(self.authority_host_url == hosts[0] for hosts in CLOUDS.values())

    @property
    def credential(self) -> Credential:
        """The secret or certificate this app signs in with.

        An inline `client_secret` is resolved by the model itself; a file, an environment
        variable or a certificate is read by the loader (`relay.config.load`), which hands the
        result over with `with_credential`.
        """
        if self._credential is None:
            raise RuntimeError(
                "this auth object's credential was never read; build the configuration with "
                "relay.config.load (parse_config or load_config), which reads credential files"
            )
        return self._credential

    def with_credential(self, credential: Credential, **changes: object) -> AuthObjectConfig:
        """A copy holding the credential the loader read, with its resolved paths in `changes`."""
        copy = self.model_copy(update=changes)
        copy._credential = credential
        return copy
