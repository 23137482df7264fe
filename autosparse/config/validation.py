"""What every user-written YAML (search configs, hardware profiles) shares: strict models and
errors that name the field, the bad value and what is allowed."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem a user can fix; the message says where and how."""


# what numpy's and torch's seeding take
SEED_MAX = 2**32 - 1
# the largest whole number a float64 holds exactly (and far inside SQLite's and numpy's int64):
# no count, size or seed of a config comes near it; each count has a tighter bound of its own
INT_MAX = 2**53


def _is_seed(field: str) -> bool:
    return field == "seed" or field.endswith("_seed")


def _bad_number(value: Any, infinite_ok: bool, item: str = "", capped: bool = False) -> str | None:
    """Why a number read from YAML cannot be used (NaN, infinity, an absurd integer unless the
    field has an upper bound of its own: ``capped``), or None; lists, tuples and plain mappings
    are searched item by item (``item`` names the one)."""
    if isinstance(value, (list, tuple, dict)):
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for key, part in pairs:
            why = _bad_number(part, infinite_ok, f"{item}[{key!r}]", capped)
            if why:
                return why
        return None
    got = f"item {item} is {value}; " if item else ""
    if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not infinite_ok)):
        return f"{got}must be a finite number" + (", not NaN" if math.isnan(value) else "")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX \
            and not capped:
        return f"{got}too large (at most 2**53 = {INT_MAX})"
    return None


class Strict(BaseModel):
    """Unknown fields are errors (a typo must not silently fall back to a default).

    Rules every field of every config and profile model shares, so that no field has to repeat
    them: NaN is never a number (it would turn every trial's loss into NaN), infinity only where
    the field's own default is infinite (``max_speedup``: unbounded), no integer beyond 2**53,
    and a seed (``seed``, ``*_seed``) is a whole number from 0 to 2**32 - 1. Numbers written as
    quoted text are refused by ``validate`` (strict mode): a user's ``"3"`` is a typo to show.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _sane_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or _model_in(field.annotation) is not None \
                or _free_form(field.annotation):
            return value  # a nested model checks its own fields; free kwargs are user code's
        if _is_seed(info.field_name or "") and isinstance(value, int) \
                and not isinstance(value, bool) and not 0 <= value <= SEED_MAX:
            raise ValueError(f"a seed must be a whole number from 0 to {SEED_MAX} (2**32 - 1, "
                             "what numpy and torch seeding take)")
        default = field.default
        capped = any(getattr(item, bound, None) is not None
                     for item in field.metadata for bound in ("le", "lt"))
        why = _bad_number(value, isinstance(default, float) and math.isinf(default), capped=capped)
        if why:
            raise ValueError(why)
        return value


def _free_form(annotation: Any) -> bool:
    """``dict[str, Any]`` and the like: values passed on to a user's own code, not read here."""
    return annotation is Any or any(_free_form(arg) for arg in getattr(annotation, "__args__", ()))


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


# pydantic's type errors as the kind of value wanted (its own words name internal classes)
_WANTED = {"int_type": "a whole number", "int_parsing": "a whole number",
           "int_from_float": "a whole number", "float_type": "a number",
           "float_parsing": "a number", "string_type": "text", "bool_type": "true or false",
           "bool_parsing": "true or false", "list_type": "a list", "tuple_type": "a list",
           "dict_type": "a mapping", "model_type": "a mapping of fields",
           "model_attributes_type": "a mapping of fields", "literal_error": None}
_WANTED_TEXTS = {text for text in _WANTED.values() if text}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _field_at(model: type[BaseModel] | None, loc: tuple) -> Any:
    """The field a location names (``budget.trials``), or None for a list item or unknown."""
    current, field = model, None
    for part in loc:
        if isinstance(part, int) or current is None:
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _model_in(field.annotation)
    return field


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _shown(value: Any) -> str:
    """`` (got 'x')`` for a scalar a user wrote, shortened past 60 characters; "" otherwise."""
    if isinstance(value, (dict, list)) or value is None:
        return ""
    text = repr(value)
    return f" (got {text[:57] + '...' if len(text) > 60 else text})"


def _range(field: Any) -> str:
    """``from 1 to 1000000``, ``at least 0``, ... from a field's bounds; "" without any."""
    bounds = {name: getattr(item, name) for item in getattr(field, "metadata", ())
              for name in _BOUNDS if getattr(item, name, None) is not None}
    low = next((f"{'above' if k == 'gt' else 'at least'} {_number(bounds[k])}"
                for k in ("gt", "ge") if k in bounds), "")
    high = next((f"{'below' if k == 'lt' else 'at most'} {_number(bounds[k])}"
                 for k in ("lt", "le") if k in bounds), "")
    if "ge" in bounds and "le" in bounds:
        return f"from {_number(bounds['ge'])} to {_number(bounds['le'])}"
    return " and ".join(part for part in (low, high) if part)


def _message(problem: dict, field: Any) -> str:
    """A pydantic problem in a user's words: what is wanted, with the field's range."""
    kind, value = problem["type"], problem.get("input")
    message = problem["msg"].removeprefix("Value error, ")
    wanted = _WANTED.get(kind)
    limits = _range(field)
    if not limits and problem["loc"] and _is_seed(str(problem["loc"][-1])):
        limits = f"from 0 to {SEED_MAX}"
    if kind in ("int_type", "int_parsing", "int_from_float", "float_type", "float_parsing"):
        message = f"must be {wanted}" + (f", {limits}" if limits else "")
        if isinstance(value, str):
            message += "; write numbers without quotes"
        elif isinstance(value, bool):
            message += f", not {str(value).lower()}"
    elif wanted is not None:
        message = f"must be {wanted}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") \
            and limits:
        message = f"must be {limits}"
    return message


def format_error(err: ValidationError, what: str, source: str,
                 model: type[BaseModel] | None = None) -> str:
    """One line for all problems: ``source: field.path: message (got value); ...``."""
    lines = []
    for problem in err.errors():
        loc = tuple(p for p in problem["loc"] if not _is_type_tag(p))
        # list positions as a user writes them (rules[0].layers), not pydantic's rules.0.layers
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") \
            or "(top level)"
        message = _message(problem, _field_at(model, loc))
        value = problem.get("input")
        if problem["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc) if model is not None else []
            message = (f"unknown field{_hint(str(loc[-1]), allowed)}"
                       + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
            value = None
        elif problem["type"] == "literal_error" and isinstance(value, str):
            expected = re.findall(r"'([^']+)'", str(problem.get("ctx", {}).get("expected", "")))
            message += _hint(value, expected)
        lines.append((loc, where, message, _shown(value)))
    # a union reports one error per branch (a list, or a range mapping). A branch that took the
    # value's kind and failed inside it says more than "must be a list" from another branch;
    # else one line names every kind of value allowed there
    lines = [line for line in lines
             if not (line[2].startswith("must be ") and _WANTED_TEXTS & {line[2][8:]}
                     and any(other[0][:len(line[0])] == line[0] and len(other[0]) > len(line[0])
                             for other in lines))]
    merged: dict[tuple, list] = {}
    for loc, where, message, shown in lines:
        if loc in merged and message.startswith("must be ") \
                and merged[loc][1].startswith("must be "):
            if message not in merged[loc][1]:
                merged[loc][1] += " or " + message.removeprefix("must be ")
            continue
        merged.setdefault(loc, [where, message, shown])
    kept = [f"{where}: {message}{shown}" for i, (loc, (where, message, shown))
            in enumerate(merged.items())
            if not any(loc[:len(other)] == other[:len(loc)] and loc != other
                       for other in list(merged)[:i])]
    return f"{what} {source}: " + "; ".join(dict.fromkeys(kept))


def validate(model: type[M], data: Any, what: str, source: str) -> M:
    """Parsed YAML -> a validated model, or one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {what} {source}: the top level must be a mapping of fields")
    try:
        # strict: a number written as quoted text ("3"), or true for a count, is refused, not
        # converted; YAML already gives numbers and booleans their own types
        return model.model_validate(data, strict=True)
    except ValidationError as err:
        raise ConfigError(format_error(err, what, source, model)) from None
