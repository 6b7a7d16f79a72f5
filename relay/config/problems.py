"""Pydantic's validation errors as our `ConfigProblem`s: the key path, what is wrong, the fix.

Why this module exists: an administrator reads these lines, not pydantic's. Every problem names
its path as it is written in the YAML (`routes[2].mailbox`) and, for an unknown key, lists the
keys that are valid at that place (STYLE habit 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from relay.config.schema import Config
from relay.core.errors import ConfigProblem

__all__ = ["problem_from_pydantic"]


def _format_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def problem_from_pydantic(err: Mapping[str, Any]) -> ConfigProblem:
    loc = tuple(
        part
        for part in err["loc"]
        # pydantic adds the union member and validator names to loc; they are not keys.
        if not (isinstance(part, str) and ("[" in part or part.startswith("function-")))
    )
    path = _format_path(loc)
    kind = err["type"]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        valid = ", ".join(_valid_keys(loc[:-1]))
        return ConfigProblem(
            path, "unknown key", f"remove it or fix its spelling; valid keys here: {valid}"
        )
    if kind == "missing":
        return ConfigProblem(path, "required key is missing", "add it (see config.example.yaml)")
    return ConfigProblem(path, msg)


def _valid_keys(loc: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None:
            break
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        if info is not None:
            model = _model_of(info.annotation)
        # else: a dict key such as an auth object's name; the value model is already current
    return sorted(model.model_fields) if model is not None else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
