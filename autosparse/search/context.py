"""The search context: everything a worker needs, rebuilt identically in every process.

``runner.prepare`` builds it from a config; the objective, the study with its sampler, the
sensitivity study, re-evaluation and export all read it. It lives apart from the runner so that
those modules can name it without importing the runner.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import torch

from autosparse.compress.oneshot.search_levels import OneShotScoring, f32_bytes
from autosparse.config.hardware import HardwareProfile
from autosparse.config.schema import SearchConfig
from autosparse.config.sections import FinetuneConfig
from autosparse.cost.calibration.model_table import TableModel
from autosparse.cost.deploy_file import DeployFileBuilder
from autosparse.cost.gguf_latency import GGUFTimer
from autosparse.cost.latency_table import LatencyTable
from autosparse.cost.measured_latency import CandidateTimer
from autosparse.search.allocation.planner import BudgetPlanner, planner_for
from autosparse.search.allocation.problem import StoredSizes
from autosparse.search.allocation.table import SensitivityTable
from autosparse.search.fidelity import FidelityPlan
from autosparse.search.lr_choice import resolve_finetune_lr
from autosparse.search.objective import CandidateEvaluator, SearchObjective
from autosparse.search.samplers import make_sampler
from autosparse.search.sensitivity_study import ensure_sensitivity
from autosparse.search.study import open_study, storage_url
from autosparse.space.graph import ChannelGraph
from autosparse.space.layers import LayerTable
from autosparse.space.search_space import GridSpace, SearchSpace
from autosparse.tracking.mlflow_tracker import Tracker
from autosparse.tracking.ui import resolve_tracking_uri
from autosparse.workload.splits import DataSplits
from autosparse.workload.task import Task, build_task

Printer = Callable[[str], None]


@dataclass
class SearchContext:
    """Everything a worker needs, rebuilt identically in every process from the config."""

    config: SearchConfig
    config_text: str
    runs_dir: Path
    data: DataSplits
    dense: torch.nn.Module
    dense_metrics: dict[str, float]
    table: LayerTable
    space: SearchSpace
    profile: HardwareProfile | None = None
    grid: GridSpace | None = None  # grid-global's points (exact global-magnitude allocations)
    sensitivity: SensitivityTable | None = None  # set by open_study where the strategy uses it
    planner: BudgetPlanner | None = None
    graph: ChannelGraph | None = None  # channel groups' row/column indices (masks, export)
    latency_table: LatencyTable | None = None  # measured on this machine (calibrate --config)
    latency_table_note: str | None = None  # whether runs/<name>/latency-table.json is used
    timer: CandidateTimer | GGUFTimer | None = None  # hardware: measure: ONNX / oneshot GGUF
    device: str = "cpu"  # where this process trains and evaluates (the dense model lives there)
    placement: tuple[str, ...] = ()  # every worker's device, in worker order (MLflow params)
    oneshot: OneShotScoring | None = None  # oneshot: the level database candidates come from
    deploy: DeployFileBuilder | None = None  # deploy onnx / onnx-int8: each candidate's file
    finetune_lr: float | None = None  # finetune.lr auto: the study's probed lr (lr_choice)
    lr_probe: dict | None = None  # that probe's stored record (None: the lr is fixed)

    @property
    def finetune(self) -> FinetuneConfig:
        """The fine-tune recipe every candidate runs: the config's, with ``lr: auto`` replaced
        by the study's probed lr once ``open_study`` has it."""
        if self.finetune_lr is None:
            return self.config.finetune
        return self.config.finetune.model_copy(update={"lr": self.finetune_lr})

    @functools.cached_property
    def task(self) -> Task:
        """The task's loss, metric, name and direction (classification by default); built
        once (a user's loss and metric are imported then)."""
        return build_task(self.config.task)

    @property
    def storage_url(self) -> str:
        return storage_url(self.config, self.runs_dir)

    def tracker(self) -> Tracker:
        uri = resolve_tracking_uri(self.config.tracking.uri, self.runs_dir)
        return Tracker(tracking_uri=uri, experiment=self.config.tracking.experiment or self.config.name,
                       runs_dir=self.runs_dir)

    def objective(self) -> SearchObjective:
        evaluator = CandidateEvaluator(self.dense, self.data, self.table, self.finetune,
                                       self.dense_metrics["accuracy"], self.profile, self.graph,
                                       latency_table=self.latency_table, timer=self.timer,
                                       task=self.task, oneshot=self.oneshot,
                                       deploy=self.deploy)
        low = (None if self.oneshot is None
               else evaluator.oneshot_low_tokens(self.config.fidelity.low_windows))
        fidelity = FidelityPlan.from_config(self.config, evaluator.finetune_steps(), low)
        return SearchObjective(self.grid or self.space, evaluator, self.config.objectives,
                               list(self.config.constraints), fidelity)

    def table_model(self) -> TableModel:
        """The dense model with the choices its space searches: what ``calibrate --config``
        measures a latency table on."""
        allowed = {name: (d.patterns, d.sparsities, d.bits)
                   for d in self.space.decisions for name in d.layers}
        return TableModel(self.dense, self.table, self.graph, tuple(self.data.input_shape),
                          allowed, self.config.name)

    def stored_sizes(self) -> StoredSizes | None:
        """A one-shot search's exact per-level sizes for the planner (None otherwise)."""
        if self.oneshot is None:
            return None
        return StoredSizes(self.oneshot.weight_bytes, self.oneshot.weight_numel(),
                           f32_bytes(self.dense))

    def uses_sensitivity(self) -> bool:
        strategy = self.config.strategy
        return strategy.name in ("knapsack", "hybrid") or (strategy.name in ("ga", "bo")
                                               and strategy.use_sensitivity)

    def open_study(self, printer: Printer = lambda line: None,
                   probe_lr: bool = False) -> optuna.Study:
        """The study with the strategy's sampler. A strategy that uses per-layer sensitivity
        gets it from the study (measured first when missing: a resume or another worker
        reuses it), and its sampler is built on the budget planner. With ``finetune.lr:
        auto`` the study's probed lr is read (``probe_lr``: probed first when missing)."""
        if not self.uses_sensitivity():
            sampler = make_sampler(self.config.strategy, self.space, self.config.seed,
                                   grid=self.grid)
            study = open_study(self.config, self.storage_url, sampler)
            self.lr_probe = resolve_finetune_lr(self, study, printer, probe_lr)
            return study
        study = open_study(self.config, self.storage_url,
                           optuna.samplers.RandomSampler(seed=self.config.seed))
        self.sensitivity = ensure_sensitivity(self, study, printer)
        self.planner = planner_for(self.space, self.table, self.sensitivity,
                                   self.config.objectives, self.config.constraints, self.profile,
                                   stored=self.stored_sizes())
        study.sampler = make_sampler(self.config.strategy, self.space, self.config.seed,
                                     planner=self.planner, objectives=self.config.objectives,
                                     dense_accuracy=self.dense_metrics["accuracy"],
                                     maximize=self.task.maximize)
        self.lr_probe = resolve_finetune_lr(self, study, printer, probe_lr)
        return study

    def grid_size(self) -> int | None:
        """Points of a grid baseline (its budget is capped there), None for the other strategies."""
        if self.config.strategy.name == "grid-uniform":
            return len(self.space.uniform_candidates())
        return self.grid.size() if self.grid is not None else None

    def budget_trials(self, extend: int) -> int | None:
        """Total trials the study should hold; the grid baselines stop when their grid is done."""
        if self.config.budget.trials is None:
            return None
        total = self.config.budget.trials + extend
        grid = self.grid_size()
        return total if grid is None else min(total, grid)
