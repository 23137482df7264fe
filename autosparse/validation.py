"""What every user-written YAML (search configs, hardware profiles) shares: strict models and
errors that name the field, the bad value and what is allowed."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem a user can fix; the message says where and how."""


class Strict(BaseModel):
    """Unknown fields are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def format_error(err: ValidationError, what: str, source: str) -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = [f"invalid {what} {source}:"]
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the README for the allowed fields)"
        value = problem.get("input")
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append(f"  {where}: {message}{shown}")
    return "\n".join(lines)


def validate(model: type[M], data: Any, what: str, source: str) -> M:
    """Parsed YAML -> a validated model, or one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {what} {source}: the top level must be a mapping of fields")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_error(err, what, source)) from None
