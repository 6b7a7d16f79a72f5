"""The configuration's pure models: what a valid configuration *is* (DESIGN §3).

Why this module exists: the configuration is the relay's whole user interface, and a typo in a
mail relay must never silently change who may send or where mail goes. So the file is validated
once, completely and loudly, before anything starts: unknown keys are errors that name their path
(`routes[2].mailbox`) and list the valid keys, and every value is checked with a message that says
what would be valid.

These models are pure: they take values and check values. They read no files, no environment and
no network, so the pure core (`relay.core`) may import them. Turning a file into them — YAML,
duplicate keys, secrets, certificates, TLS files, `${CREDENTIALS_DIRECTORY}`, this host's name —
is `relay.config.load`'s job. The sections live in their own modules (`smtp`, `clients`, `auth`,
`units`); this module holds the top level and re-exports the public names, so
`from relay.config.schema import Config, RouteConfig, ...` is the one import callers need.

Everything that crosses into the rest of the program is a frozen model or dataclass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from relay.config.auth import CLOUDS, AuthObjectConfig, ClientCertificate, ClientSecret, Credential
from relay.config.clients import ClientConfig, RouteConfig
from relay.config.limits import LimitOverride, MailboxLimitsConfig
from relay.config.smtp import ListenerConfig, SmtpConfig, TlsFilesConfig
from relay.config.units import Duration, StrictModel, parse_duration, parse_size

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
    "HistoryConfig",
    "LimitOverride",
    "ListenerConfig",
    "LoggingConfig",
    "MailboxLimitsConfig",
    "RetryConfig",
    "RouteConfig",
    "SmtpConfig",
    "TlsFilesConfig",
    "parse_duration",
    "parse_size",
]


class RetryConfig(StrictModel):
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


class DeliveryConfig(StrictModel):
    mode: Literal["hybrid", "queue", "direct"] = "hybrid"
    inline_timeout: Duration = Field(default=10.0, gt=0)
    # A relative spool_dir is resolved against the config file's folder by the loader.
    spool_dir: Path = Path("/var/lib/smtp-graph-relay")
    retry: RetryConfig = Field(default_factory=RetryConfig)
    bounces: bool = True
    # upload: past Graph's 4 MB request limit, send a draft + upload sessions (Mail.ReadWrite);
    # reject: advertise (and accept) only what fits one sendMail request.
    large_messages: Literal["upload", "reject"] = "upload"
    # Queued messages in delivery at once (each mailbox still gets at most 4).
    concurrency: int = Field(default=16, ge=1, le=256)
    # Exchange Online's and Graph's per-mailbox budgets (DESIGN §5, relay.core.budgets).
    mailbox_limits: MailboxLimitsConfig = Field(default_factory=MailboxLimitsConfig)


class AdminConfig(StrictModel):
    """The HTTP endpoint for /healthz, /readyz, /metrics and the status page (loopback)."""

    address: str = "127.0.0.1"
    port: int = Field(default=9025, ge=0, le=65535)  # 0: any free port (tests)
    # Host header values accepted besides the bind address and localhost (DNS rebinding).
    hostnames: list[str] = Field(default_factory=list)


class HistoryConfig(StrictModel):
    """The delivery history (relay.core.history): every final outcome, kept for `retention`.
    `subjects`: also keep each message's Subject (off: a subject can be personal data)."""

    retention: Duration = Field(default=30 * 86400.0, gt=0)
    subjects: bool = False


class LoggingConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # None: standard error (journald, docker logs). A path: appended to, reopened on SIGUSR1.
    file: Path | None = None


class Config(StrictModel):
    """The whole validated configuration."""

    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    clients: list[ClientConfig] = Field(min_length=1)
    auth_objects: dict[str, AuthObjectConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
