"""Credential paths under systemd's $CREDENTIALS_DIRECTORY (DESIGN §9, `LoadCredential=`).

`LoadCredential=contoso:/etc/smtp-graph-relay/contoso.secret` makes systemd copy the secret to
`$CREDENTIALS_DIRECTORY/contoso`, readable only by the service; the config names it as
`${CREDENTIALS_DIRECTORY}/contoso`. The directory comes from the environment handed to the
loader, never from a hidden global.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from relay.config.load import load_config, parse_config
from relay.config.schema import ClientCertificate, ClientSecret
from relay.core.errors import ConfigError
from tests.certificates import self_signed

TENANT = "11111111-2222-3333-4444-555555555555"
APP = "66666666-7777-8888-9999-000000000000"
SECRET = "Zq8Q~not-a-real-secret-value~abc"


def config_with(credential: str) -> str:
    return textwrap.dedent(
        f"""
        clients:
          - name: printers
            networks: [10.0.5.0/24]
            senders: ["scanner@contoso.com"]
        auth_objects:
          contoso:
            tenant_id: {TENANT}
            client_id: {APP}
        {textwrap.indent(credential.strip(), " " * 4)}
        routes:
          - senders: ["*@contoso.com"]
            auth_object: contoso
        """
    )


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """What systemd prepares: /run/credentials/<unit>/ holding one file per credential."""
    directory = tmp_path / "run-credentials"
    directory.mkdir()
    (directory / "contoso").write_text(SECRET + "\n")
    return directory


@pytest.mark.parametrize("prefix", ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"])
def test_client_secret_file_is_read_from_the_credentials_directory(
    credentials: Path, prefix: str
) -> None:
    text = config_with(f"client_secret_file: {prefix}/contoso")
    config = parse_config(text, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    auth = config.auth_objects["contoso"]
    assert auth.credential == ClientSecret(SECRET)
    assert auth.client_secret_file == credentials / "contoso"


def test_a_trailing_slash_on_the_directory_is_harmless(credentials: Path) -> None:
    text = config_with("client_secret_file: ${CREDENTIALS_DIRECTORY}/contoso")
    config = parse_config(text, environ={"CREDENTIALS_DIRECTORY": f"{credentials}/"})
    assert config.auth_objects["contoso"].client_secret_file == credentials / "contoso"


def test_load_config_expands_it_too(credentials: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_with("client_secret_file: ${CREDENTIALS_DIRECTORY}/contoso"))
    config = load_config(config_file, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.auth_objects["contoso"].credential == ClientSecret(SECRET)


def test_certificate_and_key_are_read_from_the_credentials_directory(tmp_path: Path) -> None:
    """LoadCredential=contoso.crt:... and contoso.key:... for a certificate credential."""
    directory = tmp_path / "creds"
    directory.mkdir()
    cert_file, key_file = self_signed("relay-app").write(directory, "contoso")
    text = config_with(
        f"""
        certificate_file: ${{CREDENTIALS_DIRECTORY}}/{cert_file.name}
        private_key_file: ${{CREDENTIALS_DIRECTORY}}/{key_file.name}
        """
    )
    config = parse_config(text, environ={"CREDENTIALS_DIRECTORY": str(directory)})
    auth = config.auth_objects["contoso"]
    assert isinstance(auth.credential, ClientCertificate)
    assert auth.certificate_file == cert_file
    assert auth.private_key_file == key_file


@pytest.mark.parametrize("environ", [{}, {"CREDENTIALS_DIRECTORY": ""}])
def test_unset_credentials_directory_names_the_key_and_the_fix(
    environ: dict[str, str],
) -> None:
    """Outside systemd (say `check-config` from a shell) the error says what to do."""
    text = config_with("client_secret_file: ${CREDENTIALS_DIRECTORY}/contoso")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ=environ)
    message = str(caught.value)
    assert "auth_objects.contoso.client_secret_file" in message
    assert "CREDENTIALS_DIRECTORY" in message
    assert "run under systemd with LoadCredential=" in message
    assert "or use an absolute path" in message


@pytest.mark.parametrize("key", ["certificate_file", "private_key_file"])
def test_unset_credentials_directory_is_reported_for_certificate_keys(key: str) -> None:
    other = "private_key_file" if key == "certificate_file" else "certificate_file"
    text = config_with(
        f"""
        {key}: ${{CREDENTIALS_DIRECTORY}}/contoso
        {other}: /etc/smtp-graph-relay/contoso.pem
        """
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    assert f"auth_objects.contoso.{key}" in str(caught.value)
    assert "run under systemd with LoadCredential=" in str(caught.value)


def test_a_missing_credential_names_the_expanded_path(credentials: Path) -> None:
    """LoadCredential= line missing for this name: the error shows where we looked."""
    text = config_with("client_secret_file: ${CREDENTIALS_DIRECTORY}/fabrikam")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert f"{credentials}/fabrikam does not exist" in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        "${CREDENTIALS_DIRECTORY}contoso",
        "/etc/${CREDENTIALS_DIRECTORY}/contoso",
        "${CREDENTIALS_DIRECTORY}/",
    ],
)
def test_other_uses_of_the_variable_are_refused(credentials: Path, value: str) -> None:
    """Only a leading `${CREDENTIALS_DIRECTORY}/name` is expanded; anything else is a typo."""
    text = config_with(f"client_secret_file: {value}")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert "auth_objects.contoso.client_secret_file" in str(caught.value)


def test_other_environment_variables_are_not_expanded(tmp_path: Path) -> None:
    """General $VAR expansion would let the environment pick which file holds the secret."""
    text = config_with("client_secret_file: $HOME/contoso")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, base_dir=tmp_path, environ={"HOME": str(tmp_path)})
    assert f"{tmp_path}/$HOME/contoso does not exist" in str(caught.value)


def test_plain_paths_are_unchanged_without_the_variable(tmp_path: Path) -> None:
    (tmp_path / "contoso.secret").write_text(SECRET)
    text = config_with("client_secret_file: contoso.secret")
    config = parse_config(text, base_dir=tmp_path, environ={})
    assert config.auth_objects["contoso"].client_secret_file == Path("contoso.secret")
    assert config.auth_objects["contoso"].credential == ClientSecret(SECRET)


def test_the_relay_does_not_export_the_secret(
    credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading reads the credential; it never puts it (or its path) into os.environ."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    before = dict(os.environ)
    parse_config(config_with("client_secret_file: ${CREDENTIALS_DIRECTORY}/contoso"))
    assert dict(os.environ) == before
    assert all(SECRET not in value for value in os.environ.values())


# --- a secret value pasted where a file path belongs (issue #13 item 3) ---------------------------


@pytest.mark.parametrize("pasted", [SECRET, "Abc8Q~x1y2z3", "k3LmN0pQrStUvWxYz1234567890AbCdEfGh"])
def test_a_secret_pasted_into_client_secret_file_is_named_and_never_echoed(
    tmp_path: Path, pasted: str
) -> None:
    """The error says it looks like a secret, not a path, and shows neither the value nor a
    path built from it."""
    with pytest.raises(ConfigError) as refused:
        parse_config(config_with(f'client_secret_file: "{pasted}"'), base_dir=tmp_path, environ={})
    text = str(refused.value)
    assert "this looks like a secret value, not a file path" in text
    assert pasted not in text


@pytest.mark.parametrize("path", ["secret.txt", "/etc/smtp-graph-relay/contoso.secret"])
def test_a_missing_secret_file_that_looks_like_a_path_is_named(tmp_path: Path, path: str) -> None:
    """A real path that is missing keeps the ordinary message, with the path."""
    with pytest.raises(ConfigError) as refused:
        parse_config(config_with(f"client_secret_file: {path}"), base_dir=tmp_path, environ={})
    assert "does not exist; create it or fix the path" in str(refused.value)
    assert "looks like a secret value" not in str(refused.value)
