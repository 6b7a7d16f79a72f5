"""check-config on configurations that load but would fail (issue 13 item 4), and on mistakes
in the file that it must explain at the line or key: tenant ids, YAML syntax, tabs.

No network: each file is checked offline through `main(argv)`, as an administrator runs it.
Warnings keep exit code 0 and are counted in the summary line; a value the relay can never use
is an error (exit 1) with its own message naming the key and the fix.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from relay.cli.main import main

CONFIG = """\
smtp: {{listeners: [{{address: 127.0.0.1, port: 0}}]}}
admin: {{port: 0}}
delivery: {{spool_dir: spool}}
clients:
  - name: scanners
    networks: [10.0.5.0/24]
    senders: {senders}
auth_objects:
  contoso:
    tenant_id: {tenant}
    client_id: {client}
    client_secret_file: secret.txt
routes:
  - {{senders: ['*@contoso.com'], auth_object: contoso}}
"""
TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "66666666-7777-8888-9999-000000000000"
ZEROS = "00000000-0000-0000-0000-000000000000"


def check(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    senders: str = "[scanner@contoso.com]",
    tenant: str = TENANT,
    client: str = CLIENT,
    text: str | None = None,
) -> tuple[int, str, str]:
    """Exit code, standard output and standard error of `check-config` on this file."""
    (tmp_path / "secret.txt").write_text("Zq8Q~a-secret-value-for-tests\n")
    (tmp_path / "secret.txt").chmod(0o600)
    path = tmp_path / "relay.yaml"
    path.write_text(
        text if text is not None else CONFIG.format(senders=senders, tenant=tenant, client=client)
    )
    out = io.StringIO()
    code = main(["check-config", "-c", str(path)], out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_the_placeholder_guids_are_two_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example's all-zero tenant and client ids: valid syntax, but no token would ever come.
    Each is a warning at its own key saying where the real value is."""
    code, out, _ = check(tmp_path, capsys, tenant=ZEROS, client=ZEROS)
    assert code == 0
    assert (
        "  auth_objects.contoso.tenant_id: is the example's all-zero placeholder; Entra knows "
        "no such tenant, so every token request would fail\n"
        "      fix: copy the Directory (tenant) ID from the app registration's Overview page"
    ) in out
    assert "  auth_objects.contoso.client_id: is the example's all-zero placeholder" in out
    assert "fix: copy the Application (client) ID" in out
    assert out.rstrip().endswith("check-config: valid, 2 warnings")


def test_a_sender_pattern_no_route_serves_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client may send as scanner@fabrikam.com, but only *@contoso.com has a route: its mail
    would be refused at DATA. The pattern that some route serves is not warned about."""
    code, out, _ = check(tmp_path, capsys, senders="[scanner@contoso.com, scanner@fabrikam.com]")
    assert code == 0
    assert (
        "  clients[0].senders[1]: no route serves 'scanner@fabrikam.com': the client may use it "
        "in MAIL FROM, but its mail would be refused at the end of DATA with 550 5.7.1"
    ) in out
    assert "fix: add a route whose senders match 'scanner@fabrikam.com'" in out
    assert "clients[0].senders[0]" not in out
    assert out.rstrip().endswith("check-config: valid, 1 warning")


@pytest.mark.parametrize(
    "senders",
    ["['*@contoso.com']", "['Scanner@CONTOSO.com']", "['scan-[0-9]@contoso.com']", "['*@*.com']"],
)
def test_patterns_that_overlap_a_route_are_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], senders: str
) -> None:
    """Overlap is decided on the globs themselves, case-insensitively as the policy matches:
    a pattern some address of which a route serves is not warned about as unserved."""
    code, out, _ = check(tmp_path, capsys, senders=senders)
    assert code == 0
    assert "no route serves" not in out


def test_a_tenant_domain_is_accepted_without_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Entra takes a verified domain name as the tenant in the authority, like the GUID."""
    code, out, _ = check(tmp_path, capsys, tenant="contoso.onmicrosoft.com")
    assert code == 0
    assert "tenant contoso.onmicrosoft.com," in out
    assert out.rstrip().endswith("check-config: valid, no warnings")


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ("common", "'common' names no tenant, and an app-only token (client credentials)"),
        ("organizations", "'organizations' names no tenant"),
        ("consumers", "'consumers' names no tenant"),
        (
            f"https://login.microsoftonline.com/{TENANT}/v2.0",
            "is a URL; put only the tenant id, the GUID (or domain) after the host",
        ),
        (f'" {TENANT} "', f"' {TENANT} ' has spaces around it; remove them"),
        ("my tenant", "must be the Directory (tenant) ID GUID"),
    ],
)
def test_a_tenant_id_that_can_never_work_has_its_own_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tenant: str, message: str
) -> None:
    """Each mistake says what is wrong with this value and what to put instead, at the key."""
    code, out, err = check(tmp_path, capsys, tenant=tenant)
    assert code == 1
    assert out == ""
    assert f"auth_objects.contoso.tenant_id: {message}" in err


def test_a_yaml_error_quotes_the_line_with_a_caret_under_the_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = CONFIG.format(senders="[scanner@contoso.com", tenant=TENANT, client=CLIENT)
    code, _, err = check(tmp_path, capsys, text=text)
    assert code == 1
    assert err.splitlines()[1:] == [
        "  - line 8, column 13: YAML syntax: expected ',' or ']', but got ':' "
        "(fix the indentation or quoting)",
        "      8 | auth_objects:",
        "        |             ^",
    ]


def test_a_tab_gets_its_own_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = CONFIG.format(senders="[a@contoso.com]", tenant=TENANT, client=CLIENT).replace(
        "    client_id:", "\tclient_id:"
    )
    code, _, err = check(tmp_path, capsys, text=text)
    assert code == 1
    assert err.splitlines()[1:] == [
        "  - line 11, column 1: YAML does not allow tabs; indent with spaces",
        "      11 | \u2192client_id: 66666666-7777-8888-9999-000000000000",
        "         | ^",
    ]
