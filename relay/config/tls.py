"""Load the TLS files the configuration names: the relay's server certificate pair and an auth
object's `ca_file`.

Why this module exists: a certificate that does not load, or a key that belongs to another
certificate, must show up in `check-config`, not at the first STARTTLS. Loading needs `ssl` and
the file system, which the pure schema may not touch, so the loader calls this after the models
are valid. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from relay.config.schema import TlsFilesConfig

__all__ = ["absolute", "check_ca_file", "check_server_certificate"]


def absolute(path: Path, base_dir: Path) -> Path:
    """`path` as written, or relative to the config file's folder."""
    return path if path.is_absolute() else base_dir / path


def check_server_certificate(tls: TlsFilesConfig, base_dir: Path) -> TlsFilesConfig:
    """The pair with absolute paths, once it loads as a certificate chain and its matching
    unencrypted key; otherwise `ValueError` saying which file to fix."""
    cert = absolute(tls.cert_file, base_dir)
    key = absolute(tls.key_file, base_dir)
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
    return tls.model_copy(update={"cert_file": cert, "key_file": key})


def check_ca_file(ca_file: Path, base_dir: Path) -> Path:
    """The absolute path of an auth object's CA bundle, once it exists."""
    path = absolute(ca_file, base_dir)
    if not path.is_file():
        raise ValueError(f"ca_file {path} does not exist; fix the path or remove it")
    return path
