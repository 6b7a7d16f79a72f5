"""The `smtp:` section: listeners, the relay's TLS files, and the protocol limits (DESIGN §3, §8).

Why this module exists: what a valid SMTP front end *is* — which listener combinations could
work, which need TLS, which limits apply — is decided here from the values alone. Loading the
certificate pair is the loader's job (`relay.config.tls`), so this module reads no files.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from relay.config.units import ByteSize, Duration, Network, StrictModel

__all__ = ["ListenerConfig", "SmtpConfig", "TlsFilesConfig"]


class ListenerConfig(StrictModel):
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


class TlsFilesConfig(StrictModel):
    """The relay's own server certificate for STARTTLS and implicit TLS listeners.

    Relative paths resolve against the config file's folder. The loader (`relay.config.tls`)
    loads the pair once, so a wrong path or a key that does not match shows up in
    `check-config`, not at the first client.
    """

    cert_file: Path
    key_file: Path


class SmtpConfig(StrictModel):
    # Empty (the default): this host's fully qualified name, which the loader fills in; the
    # schema does not ask the network. Written out, it must be a usable name.
    hostname: str = Field(default="", validate_default=False)
    listeners: list[ListenerConfig] = Field(
        default_factory=lambda: [ListenerConfig()], min_length=1
    )
    tls: TlsFilesConfig | None = None
    max_message_size: ByteSize = Field(default=35_000_000, gt=0)
    max_recipients: int = Field(default=500, ge=1)
    max_connections: int = Field(default=200, ge=1)
    max_connections_per_client: int = Field(default=20, ge=1)
    # Protocol limits (DESIGN §8), each answered with its own reply: see relay.core.message.limits.
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
