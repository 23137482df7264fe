"""Per-layer models of what each choice costs in accuracy, and budgeted allocation over them.

Pure (numpy, scipy; never torch, optuna or mlflow): the sensitivity *table* is plain data that
the torch side (:mod:`autosparse.search.sensitivity`) measures and the samplers read.
"""

from autosparse.search.allocation.table import (
    ChoiceSensitivity,
    SensitivityTable,
    choice_id,
)

__all__ = ["ChoiceSensitivity", "SensitivityTable", "choice_id"]
