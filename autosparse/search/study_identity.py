"""A study belongs to one configuration: what must not change between runs of one study, the
check made before anything heavy runs, and ``--fresh``, which sets an earlier study aside.

The signature stored in the study (user attr ``autosparse.signature``) is a JSON object of parts:

    objectives, space, task, deploy, hardware (a digest of the profile and timing settings),
    model, data, finetune (its recipe; reeval_seeds only re-scores the front), oneshot

A config whose part differs from the stored one is refused (``study.check_matching_study``),
naming the fields that differ and the two ways on: a new ``name``, or ``--fresh``
(``study.set_aside``). The budget, strategy, storage and tracking may
change: they say how long and how to search, not what a trial's score means.

Studies created before the model/data/finetune parts existed stored only the first five
(``task`` and ``hardware`` only when set); they are compared on what they stored and then carry
the full signature.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from autosparse.config.hardware import load_profile
from autosparse.config.schema import ConfigError, SearchConfig

SIGNATURE_ATTR = "autosparse.signature"
_VERSION = 2
_LEGACY_PARTS = ("objectives", "space", "task", "hardware")
MAX_SHOWN = 4  # differing fields named in the refusal


def hardware_digest(config: SearchConfig) -> str | None:
    """The device as a digest of its profile's content (and the timing settings when measured):
    editing or recalibrating a profile makes stored latencies stale."""
    if config.hardware is None:
        return None
    profile = load_profile(config.cost_profile()).model_dump(mode="json")
    if config.measure is not None:
        profile = {"profile": profile, "measure": config.measure.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:16]


def signature_parts(config: SearchConfig) -> dict[str, Any]:
    return {
        "version": _VERSION,
        "objectives": list(config.objectives),
        "space": config.space.model_dump(mode="json"),
        "task": config.task.model_dump(mode="json"),
        "deploy": config.deploy or "packed",
        "hardware": hardware_digest(config),
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "finetune": config.finetune.model_dump(mode="json", exclude={"reeval_seeds", "amp"}),
        "oneshot": None if config.oneshot is None else config.oneshot.model_dump(mode="json"),
    }


def signature(config: SearchConfig) -> str:
    return json.dumps(signature_parts(config), sort_keys=True)


def _comparable(config: SearchConfig, stored: dict[str, Any]) -> dict[str, Any]:
    """The config's parts in the stored signature's form (a study of the first version kept
    ``task`` only when it was not the default, ``hardware`` only with a device)."""
    parts = signature_parts(config)
    if stored.get("version") == _VERSION:
        return parts
    legacy = {"objectives": parts["objectives"], "space": parts["space"]}
    if not config.task.is_default:
        legacy["task"] = parts["task"]
    if parts["hardware"] is not None:
        legacy["hardware"] = parts["hardware"]
    if parts["deploy"] not in ("packed", "gguf"):
        legacy["deploy"] = parts["deploy"]
    return legacy


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(_leaves(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(config: SearchConfig, stored_json: str) -> list[str]:
    """``field: stored -> config`` for every field where the config is not the stored study's;
    empty when they match."""
    try:
        stored = json.loads(stored_json)
    except json.JSONDecodeError:
        return ["the stored signature is unreadable"]
    mine = _comparable(config, stored)
    old, new = _leaves(stored, ""), _leaves(mine, "")
    shown = []
    for key in sorted(set(old) | set(new)):
        if key == "version" or old.get(key, "(unset)") == new.get(key, "(unset)"):
            continue
        label = "hardware profile (a digest of its content)" if key == "hardware" else key
        shown.append(f"{label}: {_short(old.get(key, '(unset)'))} -> "
                     f"{_short(new.get(key, '(unset)'))}")
    return shown


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refusal(config: SearchConfig, url: str, diffs: list[str]) -> ConfigError:
    more = f" (and {len(diffs) - MAX_SHOWN} more)" if len(diffs) > MAX_SHOWN else ""
    return ConfigError(
        f"the study {config.name!r} in {url} was made for another configuration: "
        f"{'; '.join(diffs[:MAX_SHOWN])}{more}. Give the search a new 'name', or run it with "
        "--fresh to start this name afresh (the earlier study is kept as "
        f"'{config.name}.previous-N')")


__all__ = ["SIGNATURE_ATTR", "differences", "hardware_digest", "refusal", "signature",
           "signature_parts"]
