"""What every user-written YAML (search configs, hardware profiles) shares: strict models and
errors that name the field, the bad value and what is allowed."""

from __future__ import annotations

import difflib
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem a user can fix; the message says where and how."""


class Strict(BaseModel):
    """Unknown fields are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_type_tag(part: Any) -> bool:
    """pydantic's union branches in a location (``list[float]``, ``SparsityRange``)."""
    text = str(part)
    return ("[" in text or text in {"str", "int", "float", "bool", "list", "dict", "none"}
            or (text[:1].isupper() and text.isidentifier()))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed where an unknown one was found (for a close-match hint)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(str(part))
        current = _model_in(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _hint(word: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def did_you_mean(word: str, allowed: list[str]) -> str:
    """``; did you mean 'x'?`` for the closest allowed word, or "" (for command-line values)."""
    return _hint(word, allowed)


def format_error(err: ValidationError, what: str, source: str,
                 model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``source: field.path: message (got value)``."""
    lines = []
    for problem in err.errors():
        loc = tuple(p for p in problem["loc"] if not _is_type_tag(p))
        # list positions as a user writes them (rules[0].layers), not pydantic's rules.0.layers
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") \
            or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        if problem["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc) if model is not None else []
            message = (f"unknown field{_hint(str(loc[-1]), allowed)}"
                       + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
            value = None
        elif problem["type"] == "literal_error" and isinstance(value, str):
            expected = re.findall(r"'([^']+)'", str(problem.get("ctx", {}).get("expected", "")))
            message += _hint(value, expected)
        shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
        lines.append((loc, f"{where}: {message}{shown}"))
    # a union reports one error per branch (a list, or a range mapping): the first is the one
    kept = [text for i, (loc, text) in enumerate(lines)
            if not any(loc[:len(other)] == other[:len(loc)] and loc != other
                       for other, _ in lines[:i])]
    return f"{what} {source}: " + "; ".join(dict.fromkeys(kept))


def validate(model: type[M], data: Any, what: str, source: str) -> M:
    """Parsed YAML -> a validated model, or one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {what} {source}: the top level must be a mapping of fields")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_error(err, what, source, model)) from None
