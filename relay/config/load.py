"""Read the YAML file and make it a validated `Config`, or a `ConfigError` naming each problem.

Why this module exists: the YAML text, duplicate keys and the checks that span sections are the
loading step's business, not the models'. `relay.config.schema` holds what a valid configuration
*is*; this module is how a file becomes one (DESIGN §3).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from relay.config.problems import problem_from_pydantic
from relay.config.schema import Config
from relay.core.errors import ConfigError, ConfigProblem

__all__ = ["load_config", "parse_config"]


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
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [ConfigProblem(where, f"YAML syntax: {problem}", "fix the indentation or quoting")],
            source,
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigProblem("", "the file must be a YAML mapping (key: value)", "")], source
        )
    context = {
        "environ": os.environ if environ is None else environ,
        "base_dir": base_dir or Path.cwd(),
    }
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(
            [problem_from_pydantic(err) for err in exc.errors(include_input=False)], source
        ) from None
    problems = _cross_references(config)
    if problems:
        raise ConfigError(problems, source)
    return config


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
