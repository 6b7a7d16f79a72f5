"""The shipped systemd unit keeps its promises (DESIGN §9; operations are code).

The unit is read the way systemd reads it (every assignment of a key counts, an empty one
resets the list), each hardening setting is checked, `systemd-analyze verify` and `security`
judge it when they can run here, and MemoryDenyWriteExecute=yes is shown to be safe by running
the relay end to end under a seccomp filter with the same rules systemd installs for it.
"""

from __future__ import annotations

import configparser
import inspect
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from relay.config.schema import DeliveryConfig, SmtpConfig
from relay.service import RelayService
from relay.smtp.connections import OUTSIDER_CONNECTIONS

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "smtp-graph-relay.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


class _Assignments(dict[str, Any]):
    """Section storage for configparser that keeps every assignment of a key, as systemd does.

    configparser (strict=False) stores a parsed option as a one-element list and would replace
    it on a repeated key; systemd appends list settings (Environment=, LoadCredential=) and an
    empty assignment resets them.
    """

    def __setitem__(self, key: str, value: Any) -> None:
        current = self.get(key)
        if isinstance(value, list) and isinstance(current, list):
            if value == [""]:
                current.clear()
            else:
                current.extend(value)
            return
        super().__setitem__(key, value)


def read_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every effective assignment, in order."""
    parser = configparser.RawConfigParser(
        strict=False, dict_type=_Assignments, interpolation=None, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return {
        name: {key: value.split("\n") if value else [] for key, value in parser[name].items()}
        for name in parser.sections()
    }


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return read_unit(UNIT.read_text())


def setting(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    """The effective (last) value of a single-valued setting."""
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def test_repeated_keys_accumulate_and_an_empty_assignment_resets() -> None:
    """The reader itself: the semantics the assertions below depend on."""
    parsed = read_unit(
        textwrap.dedent(
            """\
            [Service]
            Environment=A=1
            Environment=B=2
            LoadCredential=x:/a
            LoadCredential=
            LoadCredential=y:/b
            Type=simple
            Type=notify
            """
        )
    )
    assert parsed["Service"]["Environment"] == ["A=1", "B=2"]
    assert parsed["Service"]["LoadCredential"] == ["y:/b"]
    assert parsed["Service"]["Type"] == ["simple", "notify"]


HARDENING = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "RestartSec": "5",
    "WatchdogSec": "30",
    "TimeoutStopSec": "60",
    "DynamicUser": "yes",
    "StateDirectory": "smtp-graph-relay",
    "StateDirectoryMode": "0700",
    "ConfigurationDirectory": "smtp-graph-relay",
    "UMask": "0077",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "NoNewPrivileges": "yes",
    "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallFilter": "@system-service",
    "SystemCallArchitectures": "native",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
}


@pytest.mark.parametrize(("key", "value"), HARDENING.items())
def test_service_setting(unit: dict[str, dict[str, list[str]]], key: str, value: str) -> None:
    assert unit["Service"][key] == [value], f"{key}= must be set once, to {value}"


def test_exec_start_is_absolute_and_serves_the_etc_config(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    program, *args = setting(unit, "Service", "ExecStart").split()
    assert program == "/usr/local/bin/smtp-graph-relay"
    assert args == ["serve", "-c", "/etc/smtp-graph-relay/config.yaml"]


def test_the_state_directory_is_the_default_spool(unit: dict[str, dict[str, list[str]]]) -> None:
    """StateDirectory= creates /var/lib/<name> for the dynamic user: the relay's spool_dir."""
    state = Path("/var/lib") / setting(unit, "Service", "StateDirectory")
    assert state == DeliveryConfig().spool_dir


def test_the_config_lives_in_the_configuration_directory(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    config_dir = Path("/etc") / setting(unit, "Service", "ConfigurationDirectory")
    assert Path(setting(unit, "Service", "ExecStart").split()[-1]).parent == config_dir


def test_the_secret_comes_through_load_credential(unit: dict[str, dict[str, list[str]]]) -> None:
    """Secrets through LoadCredential=, never through Environment=."""
    assert unit["Service"]["LoadCredential"] == ["contoso:/etc/smtp-graph-relay/contoso.secret"]
    assert unit["Service"].get("EnvironmentFile") is None
    for assignment in unit["Service"].get("Environment", []):
        assert "SECRET" not in assignment.upper()


def test_python_output_is_unbuffered(unit: dict[str, dict[str, list[str]]]) -> None:
    assert "PYTHONUNBUFFERED=1" in unit["Service"]["Environment"]


def test_the_stop_timeout_leaves_room_for_the_graceful_stop(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    """SIGTERM lets deliveries finish for `grace` seconds; systemd must not SIGKILL sooner."""
    grace = inspect.signature(RelayService.stop).parameters["grace"].default
    assert float(setting(unit, "Service", "TimeoutStopSec")) > grace


GIB = 1024**3


def _bytes(value: str) -> int:
    """A systemd size (K, M, G, T suffixes are powers of 1024)."""
    units = {"K": 1, "M": 2, "G": 3, "T": 4}
    if value[-1:].upper() in units:
        return int(value[:-1]) * int(1024 ** units[value[-1].upper()])
    return int(value)


def test_memory_max_leaves_room_above_the_data_memory_budget(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    """MemoryMax= is the hard stop above smtp.max_data_memory (issue #11 item 3): at least
    1 GiB more than the default budget, and the comment tells the operator to raise both."""
    memory_max = _bytes(setting(unit, "Service", "MemoryMax"))
    assert memory_max >= int(SmtpConfig().max_data_memory) + GIB
    assert "max_data_memory" in UNIT.read_text().split("MemoryMax=")[0].rsplit("\n\n", 1)[-1]


def test_limit_nofile_covers_every_connection_the_relay_admits(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    """One descriptor per SMTP connection (clients and outsiders being refused), with room
    for Graph connections and spool files."""
    nofile = int(setting(unit, "Service", "LimitNOFILE"))
    assert nofile >= 4 * (SmtpConfig().max_connections + OUTSIDER_CONNECTIONS)


def test_the_unit_starts_at_boot(unit: dict[str, dict[str, list[str]]]) -> None:
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_no_other_user_or_privilege_settings(unit: dict[str, dict[str, list[str]]]) -> None:
    """DynamicUser= owns the identity: a fixed User= or extra capabilities would undo it."""
    service = unit["Service"]
    for key in ("User", "Group", "SupplementaryGroups", "PermissionsStartOnly"):
        assert key not in service, f"{key}= weakens the sandbox"


# --- systemd-analyze -----------------------------------------------------------------------


def _relay_executable() -> Path:
    """The venv's console script, so the verified copy's ExecStart= exists on this machine."""
    script = Path(sys.executable).with_name("smtp-graph-relay")
    if script.exists():
        return script
    found = shutil.which("smtp-graph-relay")
    if found is None:
        pytest.skip("smtp-graph-relay is not installed (pip install -e .)")
    return Path(found)


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def analyzable(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless systemd-analyze can verify a trivially valid unit in this environment."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed")
    probe = tmp_path_factory.mktemp("probe") / "probe.service"
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    result = _analyze("verify", str(probe))
    if result.returncode != 0 or result.stdout.strip() or result.stderr.strip():
        output = (result.stdout + result.stderr).strip()
        pytest.skip(f"systemd-analyze cannot verify units here: {output}")


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """A copy of the unit (same file name: it is the unit's name) whose ExecStart= exists."""
    copy = tmp_path / UNIT.name
    copy.write_text(
        UNIT.read_text().replace("/usr/local/bin/smtp-graph-relay", str(_relay_executable()))
    )
    return copy


def verify(path: Path) -> str:
    """systemd-analyze verify: exit status and every warning (warnings exit 0) as one text."""
    result = _analyze("verify", str(path))
    output = (result.stdout + result.stderr).strip()
    return output if output or result.returncode == 0 else f"exit {result.returncode}"


@pytest.mark.usefixtures("analyzable")
def test_systemd_analyze_verify_accepts_the_unit(local_unit: Path) -> None:
    assert verify(local_unit) == ""


@pytest.mark.usefixtures("analyzable")
@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict"),
        ("RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictAddressFamilies=AF_INTE"),
        ("UMask=0077", "UMask=0999"),
    ],
)
def test_systemd_analyze_verify_would_notice_a_mistake(
    local_unit: Path, original: str, broken: str
) -> None:
    """The check above is not vacuous: a misspelt or invalid setting produces output."""
    text = local_unit.read_text()
    assert original in text
    local_unit.write_text(text.replace(original, broken))
    assert verify(local_unit) != ""


@pytest.mark.usefixtures("analyzable")
def test_systemd_analyze_security_rates_the_sandbox_ok(local_unit: Path) -> None:
    """`systemd-analyze security` exposure stays at 2.0 or below (0 best, 10 worst)."""
    result = _analyze("security", "--offline=yes", "--threshold=20", "--no-pager", str(local_unit))
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert result.returncode == 0, result.stdout + result.stderr


# --- MemoryDenyWriteExecute=yes ------------------------------------------------------------

# systemd implements MemoryDenyWriteExecute= as a seccomp filter that refuses mmap() with
# PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect() with PROT_EXEC and shmat() with SHM_EXEC
# (systemd.exec(5)). This child installs the same rules before importing anything else, checks
# that they bite, then imports every relay module, loads a certificate credential and relays
# one message end to end through the sandbox (TLS, MSAL, aiohttp, cryptography, pydantic).
MDWE_CHILD = r'''
import ctypes, errno, mmap, platform, sys

# machine -> (AUDIT_ARCH_*, mmap, mprotect, pkey_mprotect, shmat)
ARCHES = {"x86_64": (0xC000003E, 9, 10, 329, 30), "aarch64": (0xC00000B7, 222, 226, 288, 196)}
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_ALU|AND|K, BPF_RET
ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
ARG2 = 16 + 8 * 2  # offsetof(struct seccomp_data, args[2]), low 32 bits (little endian)


class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]


def install_filter():
    arch, mmap_nr, mprotect_nr, pkey_nr, shmat_nr = ARCHES[platform.machine()]
    source = [  # (label, code, jump-if-true label, jump-if-false label, k); BPF jumps forward
        ("", LD, None, None, 4), ("", JEQ, None, "allow", arch),  # foreign arch: not ours
        ("", LD, None, None, 0),
        ("", JEQ, "wx", None, mmap_nr), ("", JEQ, "x", None, mprotect_nr),
        ("", JEQ, "x", None, pkey_nr), ("", JEQ, "shm", "allow", shmat_nr),
        ("wx", LD, None, None, ARG2), ("", AND, None, None, PROT_WRITE | PROT_EXEC),
        ("", JEQ, "deny", "allow", PROT_WRITE | PROT_EXEC),
        ("x", LD, None, None, ARG2), ("", AND, None, None, PROT_EXEC),
        ("", JEQ, "deny", "allow", PROT_EXEC),
        ("shm", LD, None, None, ARG2), ("", AND, None, None, SHM_EXEC),
        ("", JEQ, "deny", "allow", SHM_EXEC),
        ("deny", RET, None, None, DENY),
        ("allow", RET, None, None, ALLOW),
    ]
    at = {label: i for i, (label, *_) in enumerate(source) if label}
    insns = (Insn * len(source))()
    for i, (_, code, jt, jf, k) in enumerate(source):
        hop = lambda label: 0 if label is None else at[label] - i - 1
        insns[i] = Insn(code, hop(jt), hop(jf), k)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    prog = Prog(len(source), insns)
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        sys.exit(f"SKIP seccomp unavailable: {errno.errorcode.get(ctypes.get_errno())}")


if platform.machine() not in ARCHES:
    sys.exit(f"SKIP no syscall table for {platform.machine()}")
install_filter()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("FAIL the filter let a writable+executable mapping through")

import asyncio, importlib, pkgutil, smtplib, tempfile, textwrap
from pathlib import Path

import relay
for module in pkgutil.walk_packages(relay.__path__, "relay."):
    if not module.name.endswith("__main__"):  # that one runs the CLI
        importlib.import_module(module.name)

from relay.config.schema import ClientCertificate
from relay.config.load import parse_config
from relay.cli.sandbox import SandboxRelay
from tests.certificates import self_signed


async def relay_one_message(state):
    pair = SandboxRelay(state_dir=state, mail_dir=state / "mail", smtp_port=0)
    await pair.start()
    try:
        port = pair.relay.listeners[0].port

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                client.sendmail(
                    "scanner@example.com",
                    ["you@example.com"],
                    b"Subject: under MemoryDenyWriteExecute\r\n\r\nIt works.\r\n",
                )

        await asyncio.to_thread(send)
    finally:
        await pair.stop()
    return sorted((state / "mail").glob("*.eml"))


with tempfile.TemporaryDirectory() as folder:
    state = Path(folder)
    cert_file, key_file = self_signed("mdwe").write(state, "app")
    config = parse_config(
        textwrap.dedent(f"""
            clients: [{{name: c, networks: [127.0.0.1/32], senders: ["*@example.com"]}}]
            auth_objects:
              a:
                tenant_id: contoso.onmicrosoft.com
                client_id: 66666666-7777-8888-9999-000000000000
                certificate_file: {cert_file}
                private_key_file: {key_file}
            routes: [{{senders: ["*"], auth_object: a}}]
        """),
        environ={},
    )
    assert isinstance(config.auth_objects["a"].credential, ClientCertificate)
    delivered = asyncio.run(relay_one_message(state))
    if len(delivered) != 1:
        sys.exit(f"FAIL expected one message at the sandbox's Graph, got {delivered}")
print("OK")
'''


def test_the_relay_runs_under_memory_deny_write_execute() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MDWE_CHILD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    if output.startswith("SKIP "):
        pytest.skip(output.removeprefix("SKIP "))
    assert result.returncode == 0, output
    assert result.stdout.strip().endswith("OK"), output
