"""Read the YAML file and make it a validated `Config`, or a `ConfigError` naming each problem.

Why this module exists: the YAML text, duplicate keys, the checks that span sections and every
read of the world around the file are the loading step's business, not the models'.
`relay.config.schema` holds what a valid configuration *is*; this module is how a file becomes
one (DESIGN §3), in this order:

1. YAML with duplicate keys refused;
2. `${CREDENTIALS_DIRECTORY}/` expanded in credential paths (`relay.config.credentials`);
3. the pure models validated;
4. the I/O: credentials read, TLS files and CA bundles loaded (`relay.config.tls`), relative
   paths made absolute against the config file's folder, the default `smtp.hostname` taken from
   this host's name;
5. the cross references checked.

Problems from every step are reported together, each at its key path. When the models are
invalid, the auth objects and TLS files that are valid on their own are still read, so one run
of `check-config` shows every mistake.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from relay.config.credentials import expand_credential_paths, resolve_auth_object
from relay.config.problems import problem_from_pydantic
from relay.config.schema import AuthObjectConfig, Config, TlsFilesConfig
from relay.config.tls import absolute, check_server_certificate
from relay.core.errors import ConfigError, ConfigProblem

__all__ = ["load_config", "parse_auth_object", "parse_config"]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen[key] = True
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the YAML file; raise ConfigError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem("", f"cannot read {path}: {exc.strerror}", "check the -c path")],
            str(path),
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            [ConfigProblem("", "the file is not UTF-8", "save it as UTF-8")]
        ) from None
    return parse_config(text, source=str(path), base_dir=path.parent, environ=environ)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate YAML text. Relative file paths resolve against `base_dir`."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc, text)], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigProblem("", "the file must be a YAML mapping (key: value)", "")], source
        )
    environ = os.environ if environ is None else environ
    base_dir = base_dir or Path.cwd()
    data, problems, unexpanded = expand_credential_paths(data, environ)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems += [problem_from_pydantic(err) for err in exc.errors(include_input=False)]
        problems += _files_of_valid_parts(data, unexpanded, environ, base_dir)
        raise ConfigError(problems, source) from None
    config, file_problems = _read_files(config, unexpanded, environ, base_dir)
    problems += file_problems + _cross_references(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def _yaml_problem(exc: yaml.YAMLError, text: str) -> ConfigProblem:
    """The YAML mistake at its line and column, with the line quoted and a caret under the
    column; a tab gets its own message (YAML 1.1 §5.5: tabs never indent)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return ConfigProblem("", f"YAML syntax: {problem}", "fix the indentation or quoting")
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    column = min(mark.column, len(line))
    where = f"line {mark.line + 1}, column {column + 1}"
    if "\t" in line[: column + 1] or "'\\t'" in problem:
        problem, fix = "YAML does not allow tabs; indent with spaces", ""
    else:
        problem, fix = f"YAML syntax: {problem}", "fix the indentation or quoting"
    number = str(mark.line + 1)
    # A tab is shown as one visible character, so the caret stays under the column.
    shown = line.replace("\t", "\u2192")
    quote = f"\n      {number} | {shown}\n      {' ' * len(number)} | {' ' * column}^"
    return ConfigProblem(where, problem + (f" ({fix})" if fix else "") + quote)


def parse_auth_object(
    data: Mapping[str, Any],
    *,
    name: str = "auth",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> AuthObjectConfig:
    """One auth object, read exactly as `parse_config` reads `auth_objects.NAME`: for tools and
    tests that need one app registration without a whole file. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    base_dir = base_dir or Path.cwd()
    expanded, problems, _ = expand_credential_paths({"auth_objects": {name: data}}, environ)
    if problems:
        raise ConfigError(problems)
    try:
        auth = AuthObjectConfig.model_validate(expanded["auth_objects"][name])
    except ValidationError as exc:
        raise ConfigError(
            [problem_from_pydantic(err) for err in exc.errors(include_input=False)]
        ) from None
    auth, problems = resolve_auth_object(name, auth, environ=environ, base_dir=base_dir)
    if problems:
        raise ConfigError(problems)
    return auth


def _read_files(
    config: Config, skip: set[str], environ: Mapping[str, str], base_dir: Path
) -> tuple[Config, list[ConfigProblem]]:
    """`config` with its credentials read, its files checked and its paths absolute."""
    problems: list[ConfigProblem] = []
    auth_objects: dict[str, AuthObjectConfig] = {}
    for name, auth in config.auth_objects.items():
        if name not in skip:
            auth, found = resolve_auth_object(name, auth, environ=environ, base_dir=base_dir)
            problems += found
        auth_objects[name] = auth
    smtp = config.smtp
    if smtp.tls is not None:
        try:
            smtp = smtp.model_copy(update={"tls": check_server_certificate(smtp.tls, base_dir)})
        except ValueError as exc:
            problems.append(ConfigProblem("smtp.tls", str(exc)))
    if not smtp.hostname:
        smtp = smtp.model_copy(update={"hostname": socket.getfqdn()})
    delivery = config.delivery.model_copy(
        update={"spool_dir": absolute(config.delivery.spool_dir, base_dir)}
    )
    logs = config.logging
    if logs.file is not None:
        logs = logs.model_copy(update={"file": absolute(logs.file, base_dir)})
    resolved = config.model_copy(
        update={"auth_objects": auth_objects, "smtp": smtp, "delivery": delivery, "logging": logs}
    )
    return resolved, problems


def _files_of_valid_parts(
    data: Mapping[str, Any], skip: set[str], environ: Mapping[str, str], base_dir: Path
) -> list[ConfigProblem]:
    """The file problems of the auth objects and TLS files that are valid on their own, for a
    configuration whose models are not: one run then reports every mistake."""
    problems: list[ConfigProblem] = []
    auth_objects = data.get("auth_objects")
    if isinstance(auth_objects, Mapping):
        for name, raw in auth_objects.items():
            if str(name) in skip:
                continue
            try:
                auth = AuthObjectConfig.model_validate(raw)
            except ValidationError:
                continue  # already reported at its keys
            problems += resolve_auth_object(str(name), auth, environ=environ, base_dir=base_dir)[1]
    smtp = data.get("smtp")
    raw_tls = smtp.get("tls") if isinstance(smtp, Mapping) else None
    if raw_tls is not None:
        try:
            check_server_certificate(TlsFilesConfig.model_validate(raw_tls), base_dir)
        except ValidationError:
            pass  # already reported at its keys
        except ValueError as exc:
            problems.append(ConfigProblem("smtp.tls", str(exc)))
    return problems


def _cross_references(config: Config) -> list[ConfigProblem]:
    """Checks that span sections, each reported at the key that must change."""
    problems: list[ConfigProblem] = []
    known = ", ".join(sorted(config.auth_objects))
    for i, route in enumerate(config.routes):
        if route.auth_object not in config.auth_objects:
            problems.append(
                ConfigProblem(
                    f"routes[{i}].auth_object",
                    f"{route.auth_object!r} is not defined under auth_objects",
                    f"use one of: {known}",
                )
            )
    names = [client.name for client in config.clients]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.append(
                ConfigProblem(
                    f"clients[{i}].name", f"{name!r} is used twice", "names must be unique"
                )
            )
    labels = [route.label for route in config.routes]
    for i, route in enumerate(config.routes):
        if route.label in labels[:i]:
            first = labels.index(route.label)
            problems.append(
                ConfigProblem(
                    f"routes[{i}].name",
                    f"this route is called {route.label!r} like routes[{first}], so logs and "
                    "metrics could not tell them apart",
                    "give each route its own name:",
                )
            )
    usernames = [client.username for client in config.clients]
    for i, username in enumerate(usernames):
        if username is not None and username in usernames[:i]:
            problems.append(
                ConfigProblem(
                    f"clients[{i}].username",
                    f"{username!r} is used twice",
                    "usernames must be unique",
                )
            )
    problems.extend(_auth_problems(config))
    return problems


def _auth_problems(config: Config) -> list[ConfigProblem]:
    """SMTP AUTH settings that could never work: credentials that no listener accepts, or a
    listener that requires AUTH when no client has credentials."""
    problems: list[ConfigProblem] = []
    with_credentials = [i for i, client in enumerate(config.clients) if client.has_credentials]
    if with_credentials and all(li.auth == "none" for li in config.smtp.listeners):
        problems.extend(
            ConfigProblem(
                f"clients[{i}].username",
                "no listener offers AUTH, so this client could never log in",
                "set auth: optional or auth: required on a TLS listener",
            )
            for i in with_credentials
        )
    if not with_credentials:
        problems.extend(
            ConfigProblem(
                f"smtp.listeners[{i}].auth",
                "is required, but no client has a username and password_hash, so nobody "
                "could send here",
                "give a client credentials (smtp-graph-relay hash-password), or set auth: "
                "optional or none",
            )
            for i, listener in enumerate(config.smtp.listeners)
            if listener.auth == "required"
        )
    return problems
