"""User code named in a config: ``package.module:function`` resolved, then called with kwargs.

``model.factory``, ``data.factory`` and a task's ``loss``/``metric`` all name user code the same
way; one resolver and one caller give them the same errors (a ConfigError naming the field).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable

from autosparse.config.validation import ConfigError


def import_factory(spec: str, field: str = "model.factory") -> Callable[..., Any]:
    """Resolve ``package.module:function`` (the function part may be dotted, e.g. ``Class.make``).

    The CWD is put on ``sys.path`` (and stays there, so the module can import its siblings
    later) because a model file next to the config is the common case for a quick experiment.
    """
    module_name, attr_path = spec.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a file written moments ago must be found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigError(
                f"{field}: cannot import module {module_name!r} (looked on sys.path, "
                f"including the current directory {cwd})"
            ) from None
        raise ConfigError(
            f"{field}: importing {module_name!r} failed: {err} (a dependency is missing)"
        ) from err
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"{field}: {module_name!r} ({getattr(module, '__file__', '?')}) "
                f"has no attribute {attr_path!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{field}: {spec!r} is not callable")
    return target


def call_factory(make: Callable[..., Any], spec: str, kwargs: Mapping[str, Any],
                  section: str, called: str) -> Any:
    """``make(**kwargs)`` for ``<section>.factory``: kwargs that do not fit its signature, and
    an exception the user's code raised, become one ConfigError line (``called`` names the
    call in it)."""
    try:
        inspect.signature(make).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{section}.kwargs do not fit {spec}: {err}") from None
    except ValueError:  # no signature available (some builtins): let the call decide
        pass
    try:
        return make(**kwargs)
    except Exception as err:  # the user's code failed: name it and the error, not our frames
        raise ConfigError(f"{section}.factory: {called} raised {type(err).__name__}: "
                          f"{first_line(err)}") from None



def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"
