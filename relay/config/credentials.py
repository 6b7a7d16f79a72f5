"""Read each auth object's credential: a secret inline, from a file or an environment variable,
or a certificate with its private key (DESIGN §11).

Why this module exists: the schema says which credential an auth object names; this module goes
and gets it, so `check-config` catches a missing or mismatched credential without touching the
network, and the pure models never read a file. Secrets are handed back in objects whose repr
hides them and are never part of an error message.

Credential paths may start with `${CREDENTIALS_DIRECTORY}/`, where systemd's `LoadCredential=`
puts them. The relay only reads that variable, from the environment given to the loader; it
never sets one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.config.schema import AuthObjectConfig, ClientCertificate, ClientSecret, Credential
from relay.config.tls import absolute, check_ca_file
from relay.core.errors import ConfigProblem

__all__ = ["expand_credential_paths", "resolve_auth_object"]

_PATH_KEYS = ("client_secret_file", "certificate_file", "private_key_file")
_CREDENTIALS_PREFIXES = ("${CREDENTIALS_DIRECTORY}/", "$CREDENTIALS_DIRECTORY/")


def expand_credential_paths(
    data: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[ConfigProblem], set[str]]:
    """The raw YAML mapping with `${CREDENTIALS_DIRECTORY}/name` expanded in credential paths.

    Returns the new mapping, the problems (each at its key, `auth_objects.NAME.KEY`) and the
    names of the auth objects that had one, whose credential is then not read at all.
    """
    out = dict(data)
    auth_objects = data.get("auth_objects")
    if not isinstance(auth_objects, Mapping):
        return out, [], set()
    problems: list[ConfigProblem] = []
    failed: set[str] = set()
    expanded: dict[Any, Any] = {}
    for name, raw in auth_objects.items():
        if not isinstance(raw, Mapping):
            expanded[name] = raw
            continue
        entry = dict(raw)
        for key in _PATH_KEYS:
            value = entry.get(key)
            if not isinstance(value, str):
                continue
            try:
                entry[key] = _expand(value, key, environ)
            except ValueError as exc:
                problems.append(ConfigProblem(f"auth_objects.{name}.{key}", str(exc)))
                failed.add(str(name))
        expanded[name] = entry
    out["auth_objects"] = expanded
    return out, problems, failed


def _expand(value: str, key: str, environ: Mapping[str, str]) -> str:
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


def resolve_auth_object(
    name: str, auth: AuthObjectConfig, *, environ: Mapping[str, str], base_dir: Path
) -> tuple[AuthObjectConfig, list[ConfigProblem]]:
    """The auth object holding its credential and an absolute `ca_file`, and the problems found
    (each at `auth_objects.NAME`). With problems, the returned object is the one passed in."""
    where = f"auth_objects.{name}"
    problems: list[ConfigProblem] = []
    changes: dict[str, object] = {}
    if auth.ca_file is not None:
        try:
            changes["ca_file"] = check_ca_file(auth.ca_file, base_dir)
        except ValueError as exc:
            problems.append(ConfigProblem(where, str(exc)))
    try:
        credential = _read_credential(auth, environ=environ, base_dir=base_dir)
    except ValueError as exc:
        problems.append(ConfigProblem(where, str(exc)))
    if problems:
        return auth, problems
    return auth.with_credential(credential, **changes), []


def _read_credential(
    auth: AuthObjectConfig, *, environ: Mapping[str, str], base_dir: Path
) -> Credential:
    if auth.client_secret is not None:
        return auth.credential  # inline: the model resolved it already
    if auth.client_secret_env is not None:
        if auth.client_secret_env not in environ:
            raise ValueError(
                f"client_secret_env names ${auth.client_secret_env}, which is not set in the "
                "relay's environment; export it, or use client_secret_file"
            )
        return ClientSecret.from_text(environ[auth.client_secret_env], f"${auth.client_secret_env}")
    if auth.client_secret_file is not None:
        path = absolute(auth.client_secret_file, base_dir)
        if not path.exists() and looks_like_a_secret(str(auth.client_secret_file)):
            # Never print it: it is probably the secret itself, pasted into the wrong key.
            raise ValueError(
                "client_secret_file: this looks like a secret value, not a file path (the value "
                "is not shown); put the secret's Value into a file readable only by the relay "
                "and name that file here, or use client_secret_env"
            )
        return ClientSecret.from_text(
            _read_text(path, "client_secret_file"), f"client_secret_file {path}"
        )
    if auth.certificate_file is None:  # pragma: no cover - the schema demands one source
        raise ValueError("no credential is set")
    cert_path = absolute(auth.certificate_file, base_dir)
    key_path = absolute(auth.private_key_file or auth.certificate_file, base_dir)
    return _load_certificate(
        _read_text(cert_path, "certificate_file").encode(),
        _read_text(key_path, "private_key_file").encode(),
    )


def looks_like_a_secret(value: str) -> bool:
    """Whether a `*_file` setting is more likely a pasted secret than a path: Entra's secret
    Values are about 40 characters with a `~` and no `/`; paths have a `/` or a file extension."""
    if "/" in value or value.startswith("$"):
        return False
    return "~" in value or (len(value) >= 32 and "." not in value)


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
