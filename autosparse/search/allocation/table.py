"""The sensitivity table: for every decision (a layer or tied group) and each of its choices,
what the choice alone (every other layer dense fp32) does to validation loss and accuracy.

Plain data that round-trips through JSON, so it can live with the study (every worker and every
resume reads the same table) and be logged as a CSV.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

from autosparse.space.candidate import LayerChoice


def choice_id(choice: LayerChoice) -> str:
    """Stable text id of a canonical choice, e.g. ``unstructured:0.75:4:magnitude``."""
    return f"{choice.pattern}:{choice.sparsity:g}:{choice.bits}:{choice.criterion}"


def parse_choice_id(text: str) -> LayerChoice:
    pattern, sparsity, bits, criterion = text.rsplit(":", 3)  # N:M patterns hold a colon
    return LayerChoice.make(pattern, float(sparsity), int(bits), criterion)


@dataclass(frozen=True)
class ChoiceSensitivity:
    """Change from the dense model when only this decision takes ``choice``.

    ``loss_delta`` is in nats of validation cross-entropy (positive = worse), ``accuracy_delta``
    in points (negative = worse).
    """

    decision: str
    choice: str  # choice_id
    loss_delta: float
    accuracy_delta: float


@dataclass(frozen=True)
class SensitivityTable:
    """All measured entries plus how they were measured (method, subset size, wall time)."""

    entries: tuple[ChoiceSensitivity, ...]
    dense_loss: float
    dense_accuracy: float
    samples: int
    method: str = "zero-shot"
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def get(self, decision: str, choice: LayerChoice | str) -> ChoiceSensitivity | None:
        key = choice if isinstance(choice, str) else choice_id(choice)
        return self._index().get((decision, key))

    def _index(self) -> dict[tuple[str, str], ChoiceSensitivity]:
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {(e.decision, e.choice): e for e in self.entries}
            object.__setattr__(self, "_index_cache", index)
        return index

    def decisions(self) -> list[str]:
        return list(dict.fromkeys(e.decision for e in self.entries))

    def covers(self, decisions: Mapping[str, Iterable[LayerChoice]]) -> bool:
        """True when every (decision, choice) asked for has an entry (dense fp32 is implicit)."""
        index = self._index()
        return all((name, choice_id(c)) in index or _is_dense_fp32(c)
                   for name, choices in decisions.items() for c in choices)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "entries"}
        data["entries"] = [[e.decision, e.choice, e.loss_delta, e.accuracy_delta]
                           for e in self.entries]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SensitivityTable":
        data = json.loads(text)
        entries = tuple(ChoiceSensitivity(d, c, float(l), float(a)) for d, c, l, a in data.pop("entries"))
        return cls(entries=entries, **data)

    def rows(self) -> list[dict]:
        """One dict per entry, with the choice spelled out (for a CSV or a DataFrame)."""
        out = []
        for e in self.entries:
            choice = parse_choice_id(e.choice)
            out.append({"decision": e.decision, "choice": choice.describe(),
                        "pattern": choice.pattern, "sparsity": choice.sparsity,
                        "bits": choice.bits, "criterion": choice.criterion,
                        "loss_delta": e.loss_delta, "accuracy_delta": e.accuracy_delta})
        return out


def _is_dense_fp32(choice: LayerChoice) -> bool:
    return choice.pattern == "dense" and choice.bits == 32
