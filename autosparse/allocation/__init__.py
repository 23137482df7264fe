"""Per-layer models of what each choice costs in accuracy, and budgeted allocation over them.

Pure (numpy, scipy; never torch, optuna or mlflow): the sensitivity *table* is plain data that
the torch side (:mod:`autosparse.sensitivity`) measures and the samplers read.
"""

from .table import ChoiceSensitivity, SensitivityTable, choice_id

__all__ = ["ChoiceSensitivity", "SensitivityTable", "choice_id"]
