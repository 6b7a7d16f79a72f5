"""The container image's promises (DESIGN §9), checked statically.

No Docker engine runs where the tests run, so the image is never built here. Instead a small
Dockerfile parser (comment lines dropped, line continuations joined, JSON-array and shell forms
told apart) reads the Dockerfile and each test states one promise the image makes: a builder
stage, a final stage that holds only /opt/venv, a fixed non-root user, the spool on a volume,
high ports, a health check against /healthz, a graceful stop. `.dockerignore` is checked by
emulating Docker's matching rules, and docker/config.docker.yaml is validated by the relay's own
config parser.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest

from relay.config.load import parse_config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_CONFIG = REPO / "docker" / "config.docker.yaml"
DOCKER_README = REPO / "docker" / "README.md"

VENV = "/opt/venv"
SPOOL = "/var/lib/smtp-graph-relay"
CONFIG_PATH = "/etc/smtp-graph-relay/config.yaml"
SECRET_PATH = "/run/secrets/contoso"
SMTP_PORT = 2525
HEALTHZ = "http://127.0.0.1:9025/healthz"

# Instructions whose leading `--name[=value]` words are options, not arguments.
_FLAGGED = {"FROM", "COPY", "ADD", "RUN", "HEALTHCHECK"}
_FLAG_RE = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(\S*))?\s*")


# --- a tiny Dockerfile parser ------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword, leading options, the rest as written."""

    keyword: str
    flags: dict[str, str]
    args: str
    line: int

    def json_words(self) -> list[str] | None:
        """The JSON-array (exec) form's words, or None for the shell form.

        Like Docker, a malformed array is not an error: it is run as a shell command line.
        """
        if not self.args.startswith("["):
            return None
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        return None

    def is_exec_form(self) -> bool:
        """True when the arguments are a JSON array of strings (no shell in between)."""
        return self.json_words() is not None

    def words(self) -> list[str]:
        """The arguments: the JSON array when written as one, else shell words."""
        words = self.json_words()
        return shlex.split(self.args) if words is None else words

    def pairs(self) -> dict[str, str]:
        """`KEY=value ...` (ENV, LABEL) -> {KEY: value}."""
        out: dict[str, str] = {}
        for word in shlex.split(self.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {self.line}: {word!r} is not KEY=value"
            out[key] = value
        return out

    def commands(self) -> list[str]:
        """A shell-form RUN split into its `&&` / `;` separated commands."""
        return [part.strip() for part in re.split(r"&&|;|\|\|", self.args) if part.strip()]


@dataclass
class Stage:
    """The instructions from one FROM up to the next."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.base}, found {len(found)}"
        return found[0]

    def index(self, instruction: Instruction) -> int:
        return self.instructions.index(instruction)


def parse_instructions(text: str) -> list[Instruction]:
    """Comment and blank lines dropped (also inside continuations), `\\` lines joined."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        pending += raw
        instructions.append(_instruction(pending.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def _instruction(text: str, line: int) -> Instruction:
    keyword, _, rest = text.partition(" ")
    keyword = keyword.upper()
    rest = rest.strip()
    flags: dict[str, str] = {}
    if keyword in _FLAGGED:
        while match := _FLAG_RE.match(rest):
            flags[match.group(1)] = match.group(2) or ""
            rest = rest[match.end() :]
    return Instruction(keyword, flags, rest, line)


def parse_stages(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in parse_instructions(text):
        if instruction.keyword == "FROM":
            words = instruction.words()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages or instruction.keyword == "ARG", "only ARG may come before FROM"
            if stages:
                stages[-1].instructions.append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def builder(stages: list[Stage]) -> Stage:
    named = [stage for stage in stages if stage.name == "builder"]
    assert len(named) == 1, "expected exactly one stage named builder"
    return named[0]


def _healthcheck_argv(final: Stage) -> list[str]:
    check = final.one("HEALTHCHECK")
    assert check.args.startswith("CMD "), "HEALTHCHECK must be `HEALTHCHECK [options] CMD ...`"
    command = Instruction("CMD", {}, check.args.removeprefix("CMD ").strip(), check.line)
    assert command.is_exec_form(), "HEALTHCHECK CMD should be a JSON array (no shell needed)"
    return command.words()


def _exposed_ports(final: Stage) -> set[int]:
    return {int(word.split("/")[0]) for expose in final.all("EXPOSE") for word in expose.words()}


def test_parser_reads_continuations_comments_and_both_forms() -> None:
    """The parser itself: what the other tests rely on it to get right."""
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11-slim AS builder\n"
        "RUN a \\\n"
        "    # a comment inside a continuation is dropped\n"
        " && b\n"
        "COPY --from=builder --chown=1:1 /x /y\n"
        'HEALTHCHECK --interval=5s CMD ["python", "-c", "print(1)"]\n'
        "CMD serve -c 'my config.yaml'\n"
    )
    (stage,) = parse_stages(text)
    assert (stage.base, stage.name) == ("python:3.11-slim", "builder")
    run, copy, check, cmd = stage.instructions
    assert run.commands() == ["a", "b"]
    assert copy.flags == {"from": "builder", "chown": "1:1"}
    assert copy.words() == ["/x", "/y"]
    assert check.flags == {"interval": "5s"}
    assert check.args == 'CMD ["python", "-c", "print(1)"]'
    assert not cmd.is_exec_form()
    assert cmd.words() == ["serve", "-c", "my config.yaml"]


# --- the Dockerfile's promises -----------------------------------------------------------------


def test_builder_stage_builds_a_wheel_into_the_venv(builder: Stage, stages: list[Stage]) -> None:
    """A python:3.11-slim builder makes a wheel and installs it into /opt/venv, without caching."""
    assert len(stages) >= 2, "the image must be multi-stage"
    assert builder.base == "python:3.11-slim"
    commands = [c for run in builder.all("RUN") for c in run.commands()]
    assert any(re.search(r"\bpip wheel\b", c) for c in commands), "no `pip wheel` in the builder"
    assert any(re.search(r"-m venv\b", c) and c.endswith(VENV) for c in commands)
    installs = [c for c in commands if re.search(r"\bpip\b.*\binstall\b", c)]
    assert installs, "nothing is installed in the builder"
    wheel_into_venv = [c for c in installs if VENV in c and ".whl" in c]
    assert wheel_into_venv, f"the wheel is not installed into {VENV}"
    for command in commands:
        if re.search(r"\bpip\b.*\b(install|wheel)\b", command):
            assert "--no-cache-dir" in command, f"pip keeps a cache: {command}"


def test_final_stage_gets_only_the_venv(final: Stage, builder: Stage) -> None:
    """The final image starts from python:3.11-slim and takes /opt/venv from the builder only."""
    assert final is not builder
    assert final.base == "python:3.11-slim"
    assert not final.all("ADD"), "ADD would bring files from outside the builder"
    copies = final.all("COPY")
    assert copies, "the final stage copies nothing"
    for copy in copies:
        assert copy.flags.get("from") == builder.name, f"line {copy.line} copies the source tree"
        assert copy.words() == [VENV, VENV], f"line {copy.line} copies more than {VENV}"


def test_final_stage_installs_no_build_tools(final: Stage) -> None:
    """No compiler, package manager install or pip in the final stage: what runs is /opt/venv."""
    forbidden = re.compile(
        r"apt-get\s+install|apt\s+install|apk\s+add|build-essential|\bgcc\b|\bcc\b|"
        r"\bmake\b|\bpip\b|python\S*\s+-m\s+pip"
    )
    for run in final.all("RUN"):
        assert not forbidden.search(run.args), f"line {run.line}: {run.args}"


def test_runs_as_a_fixed_numeric_non_root_user(final: Stage) -> None:
    """USER is a numeric UID:GID other than root, created in the image, set before ENTRYPOINT."""
    user = final.all("USER")[-1]
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit(), f"USER {user.args}: use a numeric UID so volumes can be chowned to it"
    assert gid.isdigit(), f"USER {user.args}: give a numeric GID too"
    assert int(uid) != 0
    assert int(gid) != 0
    assert final.index(user) < final.index(final.one("ENTRYPOINT"))
    created = " ".join(run.args for run in final.all("RUN") if final.index(run) < final.index(user))
    assert re.search(rf"useradd\b.*--uid {uid}\b", created), "the user is not created with UID"
    assert re.search(rf"groupadd\b.*--gid {gid}\b", created), "the group is not created with GID"
    assert "nologin" in created, "the relay user needs no login shell"


def test_environment(final: Stage) -> None:
    """The venv comes first on PATH; output is unbuffered; no .pyc files are written at run time."""
    env: dict[str, str] = {}
    for instruction in final.all("ENV"):
        env.update(instruction.pairs())
    assert env["PATH"].startswith(f"{VENV}/bin:")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_spool_is_a_volume_owned_by_the_relay_user(final: Stage) -> None:
    """The spool is a VOLUME, created before it with owner UID:GID and mode 0700."""
    volume = final.one("VOLUME")
    assert volume.is_exec_form()
    assert SPOOL in volume.words()
    uid, _, gid = final.all("USER")[-1].args.partition(":")
    before = [r for r in final.all("RUN") if final.index(r) < final.index(volume)]
    made = [shlex.split(c) for r in before for c in r.commands() if c.split()[-1] == SPOOL]
    assert made, f"no RUN before VOLUME creates {SPOOL}"
    words = made[-1]
    assert words[:2] == ["install", "-d"], "create it with `install -d -m 0700 -o UID -g GID`"
    options = dict(zip(words[2:-1:2], words[3:-1:2], strict=True))
    assert options == {"-m": "0700", "-o": uid, "-g": gid}
    after = [r for r in final.all("RUN") if final.index(r) > final.index(volume)]
    assert not any(SPOOL in r.args for r in after), "changes after VOLUME are discarded"


def test_exposes_high_ports_only(final: Stage) -> None:
    """EXPOSE lists SMTP 2525, implicit TLS 4650 and admin 9025; a non-root user needs > 1023."""
    ports = _exposed_ports(final)
    assert {SMTP_PORT, 4650, 9025} <= ports
    assert all(port >= 1024 for port in ports), f"privileged port exposed: {sorted(ports)}"


def test_healthcheck_asks_healthz_with_python(final: Stage) -> None:
    """HEALTHCHECK fetches /healthz with Python's urllib (no curl in slim), within its timeout."""
    check = final.one("HEALTHCHECK")
    assert {"interval", "timeout", "retries"} <= set(check.flags)
    argv = _healthcheck_argv(final)
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    compile(code, "<healthcheck>", "exec")
    assert HEALTHZ in code
    assert "urllib" in code
    assert not re.search(r"\b(curl|wget)\b", " ".join(argv))
    timeout = re.search(r"timeout=(\d+(?:\.\d+)?)", code)
    assert timeout, "the request needs a timeout"
    assert float(timeout.group(1)) < float(check.flags["timeout"].removesuffix("s"))
    assert int(check.flags["retries"]) >= 2


def test_stops_with_sigterm(final: Stage) -> None:
    """SIGTERM is the graceful stop: finish or requeue what is in flight, exit 0."""
    assert final.one("STOPSIGNAL").args == "SIGTERM"


def test_entrypoint_serves_the_mounted_config(final: Stage) -> None:
    """ENTRYPOINT is the console script pyproject.toml installs; CMD serves the mounted config."""
    entrypoint = final.one("ENTRYPOINT")
    cmd = final.one("CMD")
    assert entrypoint.is_exec_form(), "exec form, so SIGTERM reaches the relay, not a shell"
    assert cmd.is_exec_form()
    assert entrypoint.words() == ["smtp-graph-relay"]
    assert cmd.words() == ["serve", "-c", CONFIG_PATH]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert entrypoint.words()[0] in pyproject["project"]["scripts"]


def test_oci_labels(final: Stage) -> None:
    """OCI labels name the image, describe it and carry the licence. No label holds a
    placeholder URL: the source label is left to whoever publishes the image (issue 13)."""
    labels: dict[str, str] = {}
    for instruction in final.all("LABEL"):
        labels.update(instruction.pairs())
    prefix = "org.opencontainers.image."
    for key in ("title", "description", "licenses"):
        assert labels.get(prefix + key), f"missing label {prefix}{key}"
    assert prefix + "source" not in labels
    assert not any("OWNER" in value or "example" in value for value in labels.values())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert labels[prefix + "title"] == pyproject["project"]["name"]
    assert labels[prefix + "licenses"] == pyproject["project"]["license"] == "MIT"


# --- .dockerignore -----------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `**` spans directories, `*` and `?` stay within one."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("^", r"\^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    rules: list[tuple[re.Pattern[str], bool]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = str(PurePosixPath(line.removeprefix("!").strip())).lstrip("/")
        rules.append((_ignore_regex(pattern), include))
    return rules


def excluded(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching rule wins,
    and a rule matches a path when it matches the path or one of its parent directories."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for regex, include in _ignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not include
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "sandbox-mail/index.html",
        "tests/unit/test_config.py",
        "config.yaml",
        "contoso.secret",
        "docker/config.docker.yaml",
        "relay/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/relay/cli.meta.json",
    ],
)
def test_dockerignore_keeps_local_files_out(path: str) -> None:
    """Git history, the venv, sandbox mail, secrets and caches never reach the builder."""
    assert excluded(path), f"{path} would be sent to the Docker daemon"


def test_dockerignore_keeps_what_the_build_copies(builder: Stage) -> None:
    """Everything the builder COPYs, and every file of the package, is in the build context."""
    sources = [
        w for copy in builder.all("COPY") if "from" not in copy.flags for w in copy.words()[:-1]
    ]
    assert sources, "the builder copies nothing from the context"
    for source in sources:
        assert not excluded(source.rstrip("/")), f"{source} is copied but .dockerignore drops it"
    package = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "relay").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert "relay/py.typed" in package
    dropped = [p for p in package if excluded(p)]
    assert not dropped, f"package files left out of the build context: {dropped}"


# --- the example container config --------------------------------------------------------------


def test_docker_config_validates_and_matches_the_image(tmp_path: Path, final: Stage) -> None:
    """docker/config.docker.yaml is valid and uses the image's ports, spool, secret and admin."""
    text = DOCKER_CONFIG.read_text(encoding="utf-8")
    assert SECRET_PATH in text
    secret = tmp_path / "contoso"
    secret.write_text("Zq8Q~not-a-real-secret-value~abc\n", encoding="utf-8")
    config = parse_config(
        text.replace(SECRET_PATH, str(secret)),
        source=str(DOCKER_CONFIG),
        base_dir=tmp_path,
        environ={},
    )
    listeners = {(listener.address, listener.port) for listener in config.smtp.listeners}
    assert ("0.0.0.0", SMTP_PORT) in listeners, "devices outside the container must reach 2525"
    assert {port for _, port in listeners} <= _exposed_ports(final)
    assert config.delivery.spool_dir == Path(SPOOL)
    assert str(config.delivery.spool_dir) in final.one("VOLUME").words()
    health = urlsplit(HEALTHZ)
    assert (config.admin.address, config.admin.port) == (health.hostname, health.port)


def test_docker_readme_shows_the_run_commands() -> None:
    """docker/README.md shows build, run with port 25 -> 2525, the stop timeout and secrets."""
    text = DOCKER_README.read_text(encoding="utf-8")
    for needle in (
        "docker build -t smtp-graph-relay .",
        "-p 25:2525",
        "--stop-timeout 60",
        "relay-spool:/var/lib/smtp-graph-relay",
        f"{SECRET_PATH}:ro",
        "secrets:",
        f"docker exec relay smtp-graph-relay queue -c {CONFIG_PATH} list",
        f"docker exec relay smtp-graph-relay test-auth -c {CONFIG_PATH}",
    ):
        assert needle in text, f"docker/README.md does not show {needle!r}"
