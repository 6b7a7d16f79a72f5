"""YAML configuration -> frozen, validated models (DESIGN §3).

Why this module exists: the configuration is the relay's whole user interface, and a typo in a
mail relay must never silently change who may send or where mail goes. So the file is validated
once, completely and loudly, before anything starts:

- unknown keys are errors that name their path (`routes[2].mailbox`) and list the valid keys;
- duplicate YAML keys are errors (PyYAML would silently keep the last one);
- cross references (a route's `auth_object`) must resolve;
- secrets (client secret inline, from a file or an environment variable, or a certificate and
  private key) are read and checked here, so `check-config` catches a missing credential file
  without touching the network. Secrets are held in objects whose repr hides them and are never
  part of an error message. Credential paths may start with `${CREDENTIALS_DIRECTORY}/`, where
  systemd's `LoadCredential=` puts them (the relay only reads that variable, never sets one).

Everything that crosses into the rest of the program is a frozen model or dataclass.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "CLOUDS",
    "AdminConfig",
    "AuthObjectConfig",
    "ClientCertificate",
    "ClientConfig",
    "ClientSecret",
    "Config",
    "Credential",
    "DeliveryConfig",
    "ListenerConfig",
    "LoggingConfig",
    "RetryConfig",
    "RouteConfig",
    "SmtpConfig",
    "TlsFilesConfig",
    "parse_duration",
    "parse_size",
]

# Cloud presets: Entra authority host and Graph endpoint per national cloud
# (learn.microsoft.com "National cloud deployments" for Microsoft Graph).
CLOUDS: Mapping[str, tuple[str, str]] = {
    "global": ("https://login.microsoftonline.com", "https://graph.microsoft.com"),
    "usgov": ("https://login.microsoftonline.us", "https://graph.microsoft.us"),
    "usgov-dod": ("https://login.microsoftonline.us", "https://dod-graph.microsoft.us"),
    "china": ("https://login.chinacloudapi.cn", "https://microsoftgraph.chinacloudapi.cn"),
}

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_GUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}$"
)
_ADDRESS_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+$")


def parse_size(value: object) -> int:
    """`35MB` (decimal), `35MiB` (binary) or a plain number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 35MB, 35MiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(
        f"{value!r} is not a size; write a number of bytes or a number with one of "
        "KB, KiB, MB, MiB, GB, GiB (for example 35MB)"
    )


def parse_duration(value: object) -> float:
    """`30s`, `5m`, `2h`, `5d`, `1h30m`, `250ms` or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 2h or 5d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ValueError(
        f"{value!r} is not a duration; write seconds or a number with ms, s, m, h or d "
        "(for example 30s, 5m, 2h, 5d)"
    )


ByteSize = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]


def _check_glob(pattern: str) -> str:
    if not pattern or any(c.isspace() for c in pattern):
        raise ValueError(
            f"{pattern!r} is not an address pattern; use an address or a glob such as "
            "'*@contoso.com' or 'scanner@contoso.com'"
        )
    if pattern != "*" and "@" not in pattern:
        raise ValueError(
            f"{pattern!r} has no '@'; patterns match whole addresses, "
            f"so write '*@{pattern}' to allow a whole domain"
        )
    return pattern


def _check_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = str(value).strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a network; write an address or CIDR such as 10.0.5.0/24, "
                "192.0.2.7 or 2001:db8::/64"
            ) from exc
        raise ValueError(f"{text!r} has host bits set; did you mean {loose}?") from exc


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_check_network)]
AddressPattern = Annotated[str, BeforeValidator(lambda v: _check_glob(str(v)))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ListenerConfig(_Model):
    """One SMTP listening socket."""

    address: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)  # 0: any free port (tests)
    tls: Literal["none", "starttls", "implicit"] = "none"
    auth: Literal["none", "optional", "required"] = "none"

    @field_validator("address")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address; use 0.0.0.0 (all IPv4), :: (all IPv6) "
                "or one address of this host such as 10.0.5.10"
            ) from None
        return value

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> ListenerConfig:
        # AUTH PLAIN and LOGIN carry the password itself (RFC 4954 §4: mechanisms without
        # their own protection need TLS), so a listener that offers AUTH must offer TLS.
        if self.auth != "none" and self.tls == "none":
            raise ValueError(
                f"auth: {self.auth} on {self.address}:{self.port} needs TLS on this listener, "
                "because AUTH PLAIN and LOGIN send the password itself; set tls: starttls "
                "(e.g. port 587) or tls: implicit (e.g. port 465), or auth: none"
            )
        return self


class TlsFilesConfig(_Model):
    """The relay's own server certificate for STARTTLS and implicit TLS listeners.

    Relative paths resolve against the config file's folder; the pair is loaded once here so a
    wrong path or a key that does not match shows up in `check-config`, not at the first client.
    """

    cert_file: Path
    key_file: Path

    @model_validator(mode="after")
    def _loadable(self, info: ValidationInfo) -> TlsFilesConfig:
        context: Mapping[str, Any] = info.context or {}
        base_dir: Path = context.get("base_dir", Path.cwd())
        cert = self.cert_file if self.cert_file.is_absolute() else base_dir / self.cert_file
        key = self.key_file if self.key_file.is_absolute() else base_dir / self.key_file
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except FileNotFoundError as exc:
            raise ValueError(f"{exc.filename or cert} does not exist; fix the path") from None
        except PermissionError:
            raise ValueError(f"{cert} or {key} is not readable by this user") from None
        except ssl.SSLError as exc:
            raise ValueError(
                f"{cert} and {key} are not a PEM certificate chain and its matching "
                f"unencrypted private key ({exc.reason or exc})"
            ) from None
        object.__setattr__(self, "cert_file", cert)
        object.__setattr__(self, "key_file", key)
        return self


class SmtpConfig(_Model):
    hostname: str = Field(default_factory=socket.getfqdn)
    listeners: list[ListenerConfig] = Field(
        default_factory=lambda: [ListenerConfig()], min_length=1
    )
    tls: TlsFilesConfig | None = None
    max_message_size: ByteSize = Field(default=35_000_000, gt=0)
    max_recipients: int = Field(default=500, ge=1)
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_client: int = Field(default=20, ge=1)
    # Protocol limits (DESIGN §8), each answered with its own reply: see relay.mime.limits.
    max_header_size: ByteSize = Field(default=1024 * 1024, gt=0)  # each header block
    max_mime_depth: int = Field(default=50, ge=1)
    max_commands: int = Field(default=1000, ge=1)  # per connection, then 421 4.7.0
    idle_timeout: Duration = Field(default=300.0, gt=0)  # RFC 5321 §4.5.3.2.7: at least 5 min
    data_timeout: Duration = Field(default=600.0, gt=0)  # whole DATA phase, then 421 4.4.2
    # All messages being received and prepared at once; a DATA past it waits for room, and
    # after data_timeout without room is answered 452 4.3.1 (never 250, never the OOM killer).
    max_data_memory: ByteSize = Field(default=512 * 1024 * 1024, gt=0)
    bare_line_endings: Literal["reject", "normalize"] = "reject"
    # PROXY v1/v2 header on every listener, believed only from these load balancers.
    proxy_protocol: bool = False
    proxy_networks: list[Network] = Field(default_factory=list)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not value or any(c.isspace() or ord(c) < 32 for c in value) or len(value) > 253:
            raise ValueError("must be this host's name as clients and Received headers see it")
        return value

    @model_validator(mode="after")
    def _proxy_networks_when_needed(self) -> SmtpConfig:
        if self.proxy_protocol and not self.proxy_networks:
            raise ValueError(
                "proxy_protocol is true but proxy_networks is empty, so no load balancer could "
                "connect; list the balancers' addresses (for example [10.0.0.10/32])"
            )
        if self.proxy_networks and not self.proxy_protocol:
            raise ValueError(
                "proxy_networks has no effect while proxy_protocol is false; set proxy_protocol: "
                "true or remove proxy_networks"
            )
        for i, listener in enumerate(self.listeners):
            if self.proxy_protocol and listener.tls == "implicit":
                raise ValueError(
                    f"listeners[{i}] uses tls: implicit, which cannot follow a PROXY header; use "
                    "tls: starttls behind the load balancer, or terminate TLS on the balancer"
                )
        return self

    @model_validator(mode="after")
    def _tls_files_when_needed(self) -> SmtpConfig:
        for i, listener in enumerate(self.listeners):
            if listener.tls != "none" and self.tls is None:
                raise ValueError(
                    f"listeners[{i}] uses tls: {listener.tls} but smtp.tls is missing; add "
                    "smtp.tls with cert_file and key_file, or set tls: none"
                )
        seen: set[tuple[str, int]] = set()
        for i, listener in enumerate(self.listeners):
            key = (listener.address, listener.port)
            if listener.port != 0 and key in seen:  # port 0: each gets its own free port
                raise ValueError(f"listeners[{i}] repeats {listener.address}:{listener.port}")
            seen.add(key)
        return self


class ClientConfig(_Model):
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


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """An app registration's client secret. The value never appears in repr or str."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "ClientSecret(***)"


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


class AuthObjectConfig(_Model):
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
        if not (_GUID_RE.match(value) or _DOMAIN_RE.match(value)):
            raise ValueError(
                "must be the Directory (tenant) ID GUID from the app registration's Overview "
                "page, or the tenant's domain such as contoso.onmicrosoft.com"
            )
        return value

    @field_validator("client_id")
    @classmethod
    def _client(cls, value: str) -> str:
        if not _GUID_RE.match(value):
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

    @field_validator("client_secret_file", "certificate_file", "private_key_file", mode="before")
    @classmethod
    def _credentials_directory(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        context: Mapping[str, Any] = info.context or {}
        environ: Mapping[str, str] = context.get("environ", os.environ)
        return _expand_credentials_directory(value, str(info.field_name), environ)

    @model_validator(mode="after")
    def _endpoints_and_credential(self, info: ValidationInfo) -> AuthObjectConfig:
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
        context: Mapping[str, Any] = info.context or {}
        base_dir: Path = context.get("base_dir", Path.cwd())
        self._credential = _resolve_credential(
            self, environ=context.get("environ", os.environ), base_dir=base_dir
        )
        if self.ca_file is not None:
            ca_file = self.resolve_path(self.ca_file, base_dir)
            if not ca_file.is_file():
                raise ValueError(f"ca_file {ca_file} does not exist; fix the path or remove it")
            object.__setattr__(self, "ca_file", ca_file)
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
        if self._credential is None:  # pragma: no cover - set by the validator
            raise RuntimeError("credential was not resolved")
        return self._credential

    def resolve_path(self, path: Path, base_dir: Path) -> Path:
        return path if path.is_absolute() else base_dir / path


_CREDENTIALS_PREFIXES = ("${CREDENTIALS_DIRECTORY}/", "$CREDENTIALS_DIRECTORY/")


def _expand_credentials_directory(value: str, key: str, environ: Mapping[str, str]) -> str:
    """`${CREDENTIALS_DIRECTORY}/name` -> where systemd's `LoadCredential=name:...` put it.

    Only this one leading variable is expanded: general `$VAR` expansion would let the
    environment change which file is read, which the config should say by itself.
    """
    prefix = next((p for p in _CREDENTIALS_PREFIXES if value.startswith(p)), None)
    if prefix is None:
        if "CREDENTIALS_DIRECTORY" in value:
            raise ValueError(
                f"{key} must start with ${{CREDENTIALS_DIRECTORY}}/ followed by the credential "
                f"name (e.g. ${{CREDENTIALS_DIRECTORY}}/contoso), or be a plain path"
            )
        return value
    name = value[len(prefix) :]
    if not name:
        raise ValueError(f"{key} names no credential after ${{CREDENTIALS_DIRECTORY}}/")
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ValueError(
            f"{key} uses ${{CREDENTIALS_DIRECTORY}}, which is not set: run under systemd with "
            f"LoadCredential={name}:/path/to/file, or use an absolute path"
        )
    return f"{directory.rstrip('/')}/{name}"


def _resolve_credential(
    auth: AuthObjectConfig, *, environ: Mapping[str, str], base_dir: Path
) -> Credential:
    sources = [
        name
        for name in ("client_secret", "client_secret_file", "client_secret_env", "certificate_file")
        if getattr(auth, name) is not None
    ]
    if len(sources) != 1:
        found = ", ".join(sources) if sources else "none"
        raise ValueError(
            f"set exactly one credential: client_secret_file, client_secret_env, client_secret "
            f"or certificate_file (+ private_key_file); found {found}"
        )
    if auth.private_key_file is not None and auth.certificate_file is None:
        raise ValueError("private_key_file needs certificate_file next to it")
    if auth.client_secret is not None:
        return _secret(auth.client_secret.get_secret_value(), "client_secret")
    if auth.client_secret_env is not None:
        if auth.client_secret_env not in environ:
            raise ValueError(
                f"client_secret_env names ${auth.client_secret_env}, which is not set in the "
                "relay's environment; export it, or use client_secret_file"
            )
        return _secret(environ[auth.client_secret_env], f"${auth.client_secret_env}")
    if auth.client_secret_file is not None:
        path = auth.resolve_path(auth.client_secret_file, base_dir)
        return _secret(_read_text(path, "client_secret_file"), f"client_secret_file {path}")
    assert auth.certificate_file is not None
    cert_path = auth.resolve_path(auth.certificate_file, base_dir)
    key_path = auth.resolve_path(auth.private_key_file or auth.certificate_file, base_dir)
    return _load_certificate(
        _read_text(cert_path, "certificate_file").encode(),
        _read_text(key_path, "private_key_file").encode(),
    )


def _secret(value: str, where: str) -> ClientSecret:
    value = value.strip("\r\n")
    if not value.strip():
        raise ValueError(f"the client secret from {where} is empty; paste the secret's Value")
    return ClientSecret(value)


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{key} {path} does not exist; create it or fix the path") from None
    except PermissionError:
        raise ValueError(
            f"{key} {path} is not readable by this user; fix its owner or mode"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{key} {path} cannot be read: {exc.__class__.__name__}") from None


def _load_certificate(cert_pem: bytes, key_pem: bytes) -> ClientCertificate:
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(
            "certificate_file holds no PEM certificate (-----BEGIN CERTIFICATE-----); "
            "convert a .cer/.pfx with openssl first"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(
            "private_key_file is encrypted; store it unencrypted with mode 0600 "
            "(openssl pkey -in key.pem -out key-plain.pem)"
        ) from None
    except ValueError:
        raise ValueError(
            "private_key_file holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("the private key must be RSA (what Entra accepts for app certificates)")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != certificate.public_key().public_bytes(der, pub):
        raise ValueError("private_key_file does not belong to certificate_file")
    return ClientCertificate(
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        thumbprint_sha1=certificate.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - Entra shows SHA-1 thumbprints
        thumbprint_sha256=certificate.fingerprint(hashes.SHA256()).hex().upper(),
        not_after=certificate.not_valid_after_utc,
    )


class RouteConfig(_Model):
    """Which auth object and mailbox deliver the mail of the senders that match."""

    senders: list[AddressPattern] = Field(min_length=1)
    # What logs and metrics call the route; default: its first sender pattern. A queued message
    # is routed again by its sender at each attempt, so the name is a label, not a key.
    name: str | None = Field(default=None, min_length=1, max_length=100)
    auth_object: str
    mailbox: str = "sender"
    rewrite_from: bool = False
    save_to_sent_items: bool = True

    @property
    def label(self) -> str:
        """The route's name in logs and metrics: `name`, else its first sender pattern."""
        return self.name or self.senders[0]

    @field_validator("mailbox")
    @classmethod
    def _mailbox(cls, value: str) -> str:
        if value != "sender" and not _ADDRESS_RE.match(value):
            raise ValueError(
                f"{value!r} must be 'sender' (each sender's own mailbox) or one mailbox "
                "address such as relay@contoso.com"
            )
        return value


class RetryConfig(_Model):
    """Backoff for queued messages: `first`, doubling up to `max`; dead after `lifetime`."""

    first: Duration = Field(default=60.0, gt=0)
    max: Duration = Field(default=3600.0, gt=0)
    lifetime: Duration = Field(default=5 * 86400.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.first > self.max:
            raise ValueError("first is longer than max; the first retry cannot wait longer")
        if self.max > self.lifetime:
            raise ValueError("max is longer than lifetime; a message would expire between tries")
        return self


class DeliveryConfig(_Model):
    mode: Literal["hybrid", "queue", "direct"] = "hybrid"
    inline_timeout: Duration = Field(default=10.0, gt=0)
    spool_dir: Path = Path("/var/lib/smtp-graph-relay")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    bounces: bool = True
    # upload: past Graph's 4 MB request limit, send a draft + upload sessions (Mail.ReadWrite);
    # reject: advertise (and accept) only what fits one sendMail request.
    large_messages: Literal["upload", "reject"] = "upload"
    # Queued messages in delivery at once (each mailbox still gets at most 4).
    concurrency: int = Field(default=16, ge=1, le=256)

    @model_validator(mode="after")
    def _spool_dir_absolute(self, info: ValidationInfo) -> DeliveryConfig:
        context: Mapping[str, Any] = info.context or {}
        if not self.spool_dir.is_absolute():
            base_dir: Path = context.get("base_dir", Path.cwd())
            object.__setattr__(self, "spool_dir", base_dir / self.spool_dir)
        return self


class AdminConfig(_Model):
    """The HTTP endpoint for /healthz, /readyz, /metrics and the status page (loopback)."""

    address: str = "127.0.0.1"
    port: int = Field(default=9025, ge=0, le=65535)  # 0: any free port (tests)
    # Host header values accepted besides the bind address and localhost (DNS rebinding).
    hostnames: list[str] = Field(default_factory=list)


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(_Model):
    """The whole validated configuration."""

    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    clients: list[ClientConfig] = Field(min_length=1)
    auth_objects: dict[str, AuthObjectConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
