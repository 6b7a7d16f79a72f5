"""The configuration contract (DESIGN §3): valid files load, every mistake names its key path."""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path
from typing import get_args

import pytest
from cryptography.hazmat.primitives import hashes
from pydantic import BaseModel

from relay.config.load import load_config, parse_auth_object, parse_config
from relay.config.schema import (
    AuthObjectConfig,
    ClientCertificate,
    ClientSecret,
    Config,
    parse_duration,
    parse_size,
)
from relay.core.errors import ConfigError
from tests.certificates import self_signed

REPO = Path(__file__).resolve().parents[2]
TENANT = "11111111-2222-3333-4444-555555555555"
APP = "66666666-7777-8888-9999-000000000000"
SECRET = "Zq8Q~not-a-real-secret-value~abc"

MINIMAL = f"""
clients:
  - name: printers
    networks: [10.0.5.0/24]
    senders: ["scanner@contoso.com"]
auth_objects:
  contoso:
    tenant_id: {TENANT}
    client_id: {APP}
    client_secret_env: RELAY_SECRET
routes:
  - senders: ["*@contoso.com"]
    auth_object: contoso
"""


def parse(text: str, tmp_path: Path | None = None, **env: str) -> object:
    return parse_config(
        textwrap.dedent(text), base_dir=tmp_path, environ={"RELAY_SECRET": SECRET, **env}
    )


def problems_of(text: str, tmp_path: Path | None = None, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, tmp_path, **env)
    return str(caught.value)


def test_minimal_config_gets_safe_defaults() -> None:
    """Only clients, auth_objects and routes are required; the rest defaults safely."""
    config = parse_config(MINIMAL, environ={"RELAY_SECRET": SECRET})
    assert config.smtp.listeners[0].address == "127.0.0.1"
    assert config.smtp.listeners[0].port == 2525
    assert config.smtp.max_message_size == 35_000_000
    assert config.delivery.mode == "hybrid"
    auth = config.auth_objects["contoso"]
    assert auth.authority_url == f"https://login.microsoftonline.com/{TENANT}"
    assert auth.graph_base_url == "https://graph.microsoft.com/v1.0"
    assert auth.effective_scope == "https://graph.microsoft.com/.default"
    assert auth.credential == ClientSecret(SECRET)


def _example_config(tmp_path: Path) -> Config:
    """config.example.yaml loaded as systemd would run it: the secret in the credentials
    directory, the TLS files present."""
    text = (REPO / "config.example.yaml").read_text()
    (tmp_path / "contoso").write_text(SECRET + "\n")
    cert_file, key_file = self_signed("relay").write(tmp_path, "tls")
    text = text.replace("/etc/smtp-graph-relay/tls.crt", str(cert_file))
    text = text.replace("/etc/smtp-graph-relay/tls.key", str(key_file))
    return parse_config(text, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_the_example_config_validates(tmp_path: Path) -> None:
    """config.example.yaml is valid when run as systemd would: the secret in the credentials
    directory, the TLS files present."""
    config = _example_config(tmp_path)
    assert config.auth_objects["contoso"].credential == ClientSecret(SECRET)
    assert len(config.routes) >= 1


def _keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, key) of every key the schema knows, sections included."""
    found = []
    for key, info in model.model_fields.items():
        found.append((f"{prefix}{key}", key))
        for sub in (info.annotation, *get_args(info.annotation)):
            for inner in (sub, *get_args(sub)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    found += _keys(inner, f"{prefix}{key}.")
    return found


def test_the_example_config_documents_every_key() -> None:
    """Every key of the schema, the new ones included (smtp.max_data_memory, admin.hostnames,
    routes[].name), is written in config.example.yaml, set or in a comment, as `key:`."""
    text = (REPO / "config.example.yaml").read_text()
    keys = _keys(Config)
    assert {"smtp.max_data_memory", "admin.hostnames", "routes.name"} <= {p for p, _ in keys}
    missing = [
        path for path, key in keys if not re.search(rf"(^|[\s{{,#-]){re.escape(key)}:", text, re.M)
    ]
    assert not missing, f"config.example.yaml does not mention: {', '.join(missing)}"


def test_the_example_config_sets_the_new_keys(tmp_path: Path) -> None:
    """The example shows the new keys with working values: a route name, the DATA memory budget
    and the admin page's extra host names."""
    config = _example_config(tmp_path)
    assert config.routes[0].label == "contoso-senders"
    assert config.smtp.max_data_memory == 512 * 2**20  # the default, written out
    assert config.admin.hostnames == []


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("smtp: {listners: []}", "smtp.listners", "hostname, idle_timeout, listeners"),
        (
            "smtp: {listeners: [{port: 2525, tls: sometimes}]}",
            "smtp.listeners[0].tls",
            "'none', 'starttls' or 'implicit'",
        ),
        ("smtp: {listeners: [{port: 70000}]}", "smtp.listeners[0].port", "65535"),
        ("smtp: {listeners: [{address: eth0}]}", "smtp.listeners[0].address", "not an IP"),
        ("smtp: {listeners: [{tls: starttls}]}", "smtp", "smtp.tls is missing"),
        ("smtp: {max_message_size: 35 megs}", "smtp.max_message_size", "is not a size"),
        ("delivery: {inline_timeout: soon}", "delivery.inline_timeout", "is not a duration"),
        ("delivery: {mode: later}", "delivery.mode", "'hybrid', 'queue' or 'direct'"),
        ("delivery: {retry: {first: 2h, max: 1h}}", "delivery.retry", "first is longer than max"),
        ("delivery: {retry: {max: 6d}}", "delivery.retry", "max is longer than lifetime"),
        ("logging: {format: xml}", "logging.format", "'text' or 'json'"),
    ],
)
def test_invalid_values_name_the_key_path_and_the_fix(text: str, path: str, words: str) -> None:
    """Each class of mistake points at the exact key and says what would be valid."""
    message = problems_of(MINIMAL + text)
    assert f"{path}:" in message
    assert words in message


@pytest.mark.parametrize(
    ("replace", "by", "path", "words"),
    [
        (
            "networks: [10.0.5.0/24]",
            "networks: [10.0.5.1/24]",
            "clients[0].networks[0]",
            "did you mean 10.0.5.0/24",
        ),
        ("networks: [10.0.5.0/24]", "networks: []", "clients[0]", "networks is empty"),
        (
            'senders: ["scanner@contoso.com"]',
            'senders: ["contoso.com"]',
            "clients[0].senders[0]",
            "'*@contoso.com'",
        ),
        (
            f"tenant_id: {TENANT}",
            "tenant_id: my tenant",
            "auth_objects.contoso.tenant_id",
            "Directory (tenant) ID",
        ),
        (
            f"client_id: {APP}",
            "client_id: relay-app",
            "auth_objects.contoso.client_id",
            "Application (client) ID",
        ),
        (
            "auth_object: contoso",
            "auth_object: contosso",
            "routes[0].auth_object",
            "use one of: contoso",
        ),
        ("auth_objects:\n", "auth_objectz:\n", "auth_objectz", "unknown key"),
        (
            "client_secret_env: RELAY_SECRET",
            "client_secret_env: MISSING_VAR",
            "auth_objects.contoso",
            "$MISSING_VAR",
        ),
        (
            "client_secret_env: RELAY_SECRET",
            "cloud: global",
            "auth_objects.contoso",
            "set exactly one credential",
        ),
        (
            "client_secret_env:",
            "scope: https://graph.microsoft.com/Mail.Send\n    client_secret_env:",
            "auth_objects.contoso.scope",
            "/.default",
        ),
    ],
)
def test_invalid_sections_name_the_key_path(replace: str, by: str, path: str, words: str) -> None:
    """Clients, auth objects and routes report their problems at the key that must change."""
    assert replace in MINIMAL
    message = problems_of(MINIMAL.replace(replace, by, 1))
    assert f"{path}:" in message
    assert words in message


def test_unknown_key_inside_an_auth_object_lists_its_valid_keys() -> None:
    """A typo under a named auth object is reported with the auth object's own keys."""
    message = problems_of(MINIMAL.replace("client_id:", "clientid:"))
    assert "auth_objects.contoso.clientid: unknown key" in message
    assert "client_secret_file" in message


def test_duplicate_yaml_keys_are_refused() -> None:
    """PyYAML keeps the last of two equal keys; the relay refuses the file instead."""
    message = problems_of(MINIMAL + "delivery: {}\ndelivery: {}\n")
    assert "duplicate key 'delivery'" in message


def test_yaml_syntax_error_names_the_line() -> None:
    """A syntax error reports the line and column."""
    message = problems_of("clients: [\n  - oops: {\n")
    assert "line " in message
    assert "YAML syntax" in message


def test_secret_values_never_appear_in_errors() -> None:
    """Even when an inline secret sits next to a mistake, the error does not echo it."""
    text = MINIMAL.replace(
        "client_secret_env: RELAY_SECRET", f"client_secret: {SECRET}\n    client_secret_env: X"
    ).replace(f"client_id: {APP}", "client_id: wrong")
    message = problems_of(text, X=SECRET)
    assert SECRET not in message
    config = parse_config(MINIMAL, environ={"RELAY_SECRET": SECRET})
    assert SECRET not in repr(config)
    assert SECRET not in str(config.auth_objects["contoso"].credential)


def test_secret_file_is_read_relative_to_the_config_and_trimmed(tmp_path: Path) -> None:
    """client_secret_file may be relative to the config file; a trailing newline is dropped."""
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    config_file = tmp_path / "relay.yaml"
    config_file.write_text(
        MINIMAL.replace("client_secret_env: RELAY_SECRET", "client_secret_file: secret.txt")
    )
    config = load_config(config_file, environ={})
    assert config.auth_objects["contoso"].credential == ClientSecret(SECRET)


def test_missing_secret_file_names_the_key_and_path(tmp_path: Path) -> None:
    """A secret file that does not exist is a config error, not a crash at first mail."""
    message = problems_of(
        MINIMAL.replace("client_secret_env: RELAY_SECRET", "client_secret_file: nope.txt"),
        tmp_path,
    )
    assert "auth_objects.contoso" in message
    assert "nope.txt does not exist" in message


def _certificate_and_foreign_key(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate file and a private key file that does not belong to it."""
    cert_file, _ = self_signed("relay").write(tmp_path, "app")
    _, foreign_key = self_signed("relay").write(tmp_path, "other")
    return cert_file, foreign_key


def test_certificate_credential_derives_thumbprints(tmp_path: Path) -> None:
    """certificate_file + private_key_file load, match each other and yield the thumbprints."""
    app_certificate = self_signed("relay")
    cert_file, key_file = app_certificate.write(tmp_path)
    config = parse(
        MINIMAL.replace(
            "client_secret_env: RELAY_SECRET",
            f"certificate_file: {cert_file}\n    private_key_file: {key_file}",
        )
    )
    credential = config.auth_objects["contoso"].credential  # type: ignore[attr-defined]
    assert isinstance(credential, ClientCertificate)
    cert = app_certificate.certificate
    assert credential.thumbprint_sha1 == cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303
    assert "PRIVATE KEY" not in repr(credential)


def test_certificate_and_foreign_key_are_refused(tmp_path: Path) -> None:
    """A private key that does not belong to the certificate is caught at load time."""
    cert_file, other_key = _certificate_and_foreign_key(tmp_path)
    message = problems_of(
        MINIMAL.replace(
            "client_secret_env: RELAY_SECRET",
            f"certificate_file: {cert_file}\n    private_key_file: {other_key}",
        )
    )
    assert "does not belong to certificate_file" in message


def test_tls_files_must_load(tmp_path: Path) -> None:
    """A missing certificate file is reported under smtp.tls with the path."""
    message = problems_of(
        MINIMAL + "smtp: {tls: {cert_file: missing.crt, key_file: missing.key}}", tmp_path
    )
    assert "smtp.tls:" in message
    assert "missing.crt does not exist" in message


def test_tls_key_must_match_certificate(tmp_path: Path) -> None:
    """A certificate with somebody else's key is refused before any client connects."""
    cert_file, other_key = _certificate_and_foreign_key(tmp_path)
    message = problems_of(
        MINIMAL + f"smtp: {{tls: {{cert_file: {cert_file}, key_file: {other_key}}}}}", tmp_path
    )
    assert "smtp.tls:" in message
    assert "matching" in message


@pytest.mark.parametrize(
    ("cloud", "authority", "graph"),
    [
        ("usgov", "https://login.microsoftonline.us", "https://graph.microsoft.us"),
        ("usgov-dod", "https://login.microsoftonline.us", "https://dod-graph.microsoft.us"),
        ("china", "https://login.chinacloudapi.cn", "https://microsoftgraph.chinacloudapi.cn"),
    ],
)
def test_cloud_presets_set_both_hosts_and_the_scope(cloud: str, authority: str, graph: str) -> None:
    """A national cloud changes the authority, the Graph endpoint and the default scope."""
    config = parse(MINIMAL.replace("client_secret_env:", f"cloud: {cloud}\n    client_secret_env:"))
    auth = config.auth_objects["contoso"]  # type: ignore[attr-defined]
    assert auth.authority_url == f"{authority}/{TENANT}"
    assert auth.graph_base_url == f"{graph}/v1.0"
    assert auth.effective_scope == f"{graph}/.default"
    assert auth.is_microsoft_cloud


def test_custom_hosts_must_come_in_pairs() -> None:
    """authority_host without graph_endpoint is ambiguous and refused."""
    message = problems_of(
        MINIMAL.replace(
            "client_secret_env:", "authority_host: https://login.example\n    client_secret_env:"
        )
    )
    assert "authority_host and graph_endpoint go together" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [(1024, 1024), ("35MB", 35_000_000), ("35MiB", 35 * 2**20), ("1.5 KiB", 1536), ("10", 10)],
)
def test_sizes(text: object, expected: int) -> None:
    """Sizes take decimal and binary units or plain bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (30, 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("5d", 432000.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
    ],
)
def test_durations(text: object, expected: float) -> None:
    """Durations take ms, s, m, h, d, combinations, or plain seconds."""
    assert parse_duration(text) == expected


def test_the_schema_reads_no_file(tmp_path: Path) -> None:
    """The pure models accept a credential path without opening it; the credential is only
    there once the loader has read it, and asking earlier says so."""
    auth = AuthObjectConfig.model_validate(
        {"tenant_id": TENANT, "client_id": APP, "client_secret_file": str(tmp_path / "absent")}
    )
    assert auth.client_secret_file == tmp_path / "absent"
    with pytest.raises(RuntimeError, match=r"relay\.config\.load"):
        _ = auth.credential


def test_an_inline_secret_needs_no_loader() -> None:
    """client_secret written in the file is resolved by the model itself: nothing to read."""
    auth = AuthObjectConfig.model_validate(
        {"tenant_id": TENANT, "client_id": APP, "client_secret": SECRET + "\n"}
    )
    assert auth.credential == ClientSecret(SECRET)


def test_the_loader_fills_in_this_hosts_name() -> None:
    """smtp.hostname defaults to this host's fully qualified name, taken at load time."""
    config = parse_config(MINIMAL, environ={"RELAY_SECRET": SECRET})
    assert config.smtp.hostname == socket.getfqdn()


def test_an_empty_hostname_written_out_is_refused() -> None:
    """Only the default is filled in; `hostname: ""` in the file is a mistake."""
    message = problems_of(MINIMAL + 'smtp: {hostname: ""}')
    assert "smtp.hostname: must be this host's name" in message


def test_a_relative_spool_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """delivery.spool_dir: spool puts the spool next to the config file, not in the cwd."""
    config = parse(MINIMAL + "delivery: {spool_dir: spool}", tmp_path)
    assert config.delivery.spool_dir == tmp_path / "spool"  # type: ignore[attr-defined]


def test_file_problems_are_reported_with_the_schema_problems(tmp_path: Path) -> None:
    """One run names every mistake: a typo elsewhere does not hide a missing secret file or
    a missing TLS certificate."""
    text = (
        MINIMAL.replace("client_secret_env: RELAY_SECRET", "client_secret_file: nope.txt")
        + "smtp: {max_recipients: many, tls: {cert_file: gone.crt, key_file: gone.key}}"
    )
    message = problems_of(text, tmp_path)
    assert "smtp.max_recipients:" in message
    assert "nope.txt does not exist" in message
    assert "gone.crt does not exist" in message


def test_file_problems_are_reported_with_the_cross_references(tmp_path: Path) -> None:
    """A route naming an unknown auth object and an unreadable secret: both in one report."""
    text = MINIMAL.replace(
        "client_secret_env: RELAY_SECRET", "client_secret_file: nope.txt"
    ).replace("auth_object: contoso", "auth_object: contosso")
    message = problems_of(text, tmp_path)
    assert "routes[0].auth_object:" in message
    assert "nope.txt does not exist" in message


def test_a_missing_ca_file_names_the_auth_object(tmp_path: Path) -> None:
    """ca_file is checked when the file is loaded, relative to the config file."""
    message = problems_of(
        MINIMAL.replace("client_secret_env:", "ca_file: proxy-ca.pem\n    client_secret_env:"),
        tmp_path,
    )
    assert f"auth_objects.contoso: ca_file {tmp_path}/proxy-ca.pem does not exist" in message


def test_one_auth_object_loads_as_parse_config_would(tmp_path: Path) -> None:
    """parse_auth_object reads one app registration's credential like a whole file does, and
    reports its problems at `auth_objects.NAME`."""
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    data = {"tenant_id": TENANT, "client_id": APP, "client_secret_file": "secret.txt"}
    auth = parse_auth_object(data, base_dir=tmp_path, environ={})
    assert auth.credential == ClientSecret(SECRET)
    with pytest.raises(ConfigError, match=r"auth_objects\.app: client_secret_file .* not exist"):
        parse_auth_object({**data, "client_secret_file": "x"}, name="app", base_dir=tmp_path)


@pytest.mark.parametrize(
    "routes",
    [
        # two explicit names
        "  - {name: main, senders: ['a@contoso.com'], auth_object: contoso}\n"
        "  - {name: main, senders: ['*@contoso.com'], auth_object: contoso}\n",
        # a name equal to another route's first sender pattern, its default name
        "  - {senders: ['*@contoso.com'], auth_object: contoso}\n"
        "  - {name: '*@contoso.com', senders: ['b@contoso.com'], auth_object: contoso}\n",
    ],
)
def test_two_routes_may_not_share_a_name(routes: str) -> None:
    """Logs and metrics name routes by `RouteConfig.label`; two equal labels are refused."""
    text = MINIMAL.replace(
        'routes:\n  - senders: ["*@contoso.com"]\n    auth_object: contoso\n', "routes:\n" + routes
    )
    assert text != MINIMAL
    message = problems_of(text)
    assert "routes[1].name: this route is called" in message
    assert "like routes[0]" in message
