"""The sections of a search config that say what is compressed and how the search spends its
budget: model, data and its split, strategy, sensitivity, fidelity, budget and fine-tune.

Split out of ``schema`` so that the top-level ``SearchConfig`` and its cross-section rules read
on their own; each model here checks only its own fields.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from autosparse.config.validation import Strict

STRATEGIES = ("ga", "bo", "knapsack", "hybrid", "random", "grid-uniform", "grid-global")
BUILTIN_MODELS = ("digits-cnn", "digits-mlp", "digits-resnet", "digits-resnet18",
                  "digits-mobilenet", "digits-vit", "digits-conv1d", "regression-mlp", "tiny-lm")
DATA_SOURCES = ("sklearn-digits", "npz", "torchvision", "image-folder", "sklearn-diabetes",
                "synthetic-tokens", "text")
_IMPORT_RE = re.compile(r"^[\w.]+:[\w.]+$")  # 'package.module:function'

# Upper bounds of the counts a config gives: far beyond any real search on one machine, low
# enough that a typo (1e20, an extra digit or ten) is a one-line error and not an overflow, a
# day-long loop or "~326549036678297668m left" (docs/configuration.md lists them)
MAX_TRIALS = 1_000_000
MAX_STEPS = 10_000_000          # fine-tune steps of one candidate, and warm-up steps
MAX_EPOCHS = 10_000             # dense training and fine-tune epochs
MAX_BATCH = 1_048_576           # samples a batch (2**20)
MAX_SAMPLES = 100_000_000       # sensitivity samples, windows of text data
MAX_WORK = 10**15               # budget.finetune_steps and budget.tokens (the whole search)
MAX_MINUTES = 1_000_000         # about two years
MAX_SMALL = 10_000              # population, screening, Taylor batches, ranks, blocks

# A search's name is its folder under the runs folder (runs/<name>/study.db, trials.csv, ...).
# These are what autosparse itself writes directly there: the dense-model cache, measured
# hardware profiles, the MLflow database (and SQLite's -journal/-wal/-shm files beside it), its
# artifacts, and the configs the Python API was given as dicts. Compared ignoring case (macOS
# and Windows folders do).
RESERVED_NAMES = ("dense", "calibration", "mlflow.db", "mlartifacts", "python-api-configs")
NAME_MAX = 100  # a folder name, and part of MLflow run names and file paths; 255 is the OS limit
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_run_name(name: str) -> str:
    """A name that stays one folder inside the runs folder and collides with nothing
    autosparse keeps there: ``..`` would write a study into the folder above it."""
    allowed = (f"allowed: 1 to {NAME_MAX} letters, digits, '_', '.' or '-', starting with a "
               "letter, digit or '_'")
    if len(name) > NAME_MAX:
        raise ValueError(f"{len(name)} characters is too long; {allowed}")
    if not _NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))})
        why = (f"characters {' '.join(map(repr, bad))} not allowed" if bad
               else "empty" if not name else f"cannot start with {name[0]!r}")
        raise ValueError(f"{why}; {allowed}")
    lower = name.lower()
    clash = next((r for r in RESERVED_NAMES if lower == r or lower.startswith("mlflow.db")), None)
    if clash:
        raise ValueError(f"{name!r} is what autosparse itself keeps in the runs folder "
                         f"(reserved: {', '.join(RESERVED_NAMES)}, mlflow.db-*); pick another")
    return name


class ModelConfig(Strict):
    """A built-in name; or ``factory: "pkg.module:function"`` plus kwargs and a checkpoint; or
    ``pretrained:`` a local ``transformers`` folder (a causal language model)."""

    builtin: Literal["digits-cnn", "digits-mlp", "digits-resnet", "digits-resnet18",
                     "digits-mobilenet", "digits-vit", "digits-conv1d", "regression-mlp",
                     "tiny-lm"] | None = None
    factory: str | None = None
    pretrained: str | None = Field(None, description="a local folder saved by transformers' "
                                   "save_pretrained (config.json + weights): loaded with "
                                   "AutoModelForCausalLM.from_pretrained, nothing downloaded")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    train_epochs: int = Field(30, ge=1, le=MAX_EPOCHS,
                              description="epochs to train a built-in model on first use")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        given = [self.builtin, self.factory, self.pretrained]
        if sum(value is not None for value in given) != 1:
            raise ValueError(f"give exactly one of 'builtin' ({', '.join(BUILTIN_MODELS)}), "
                             "'factory' or 'pretrained'")
        if self.factory is not None and not _IMPORT_RE.match(self.factory):
            raise ValueError(
                f"factory {self.factory!r} must look like 'package.module:function'"
            )
        if self.pretrained is not None and (self.kwargs or self.checkpoint):
            raise ValueError("'pretrained' loads the folder's own config and weights; remove "
                             "'kwargs' and 'checkpoint'")
        return self


class SplitConfig(Strict):
    """Train/validation/test of a source without a fixed split: three fractions (a stratified
    split), or three index ranges ``[start, end)`` into the one array (``train: [0, 7000]``),
    for data whose order matters (time series, a split made elsewhere)."""

    train: float | tuple[int, int] = 0.6
    validation: float | tuple[int, int] = 0.2
    test: float | tuple[int, int] = 0.2

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _range_as_tuple(cls, value: Any) -> Any:
        """YAML writes ``[start, end]`` as a list; the strict check wants the pair as a tuple."""
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _fractions_or_ranges(self) -> "SplitConfig":
        values = {"train": self.train, "validation": self.validation, "test": self.test}
        ranges = {k: v for k, v in values.items() if isinstance(v, tuple)}
        if ranges and len(ranges) != 3:
            raise ValueError(f"give all three splits as fractions or all three as index ranges "
                             f"[start, end), got {values}")
        if ranges:
            for name, (start, end) in ranges.items():
                if not 0 <= start < end:
                    raise ValueError(f"{name}: index range [{start}, {end}) must have "
                                     "0 <= start < end")
            ordered = sorted(ranges.items(), key=lambda item: item[1])
            for (a, (_, end)), (b, (start, _)) in zip(ordered, ordered[1:]):
                if start < end:
                    raise ValueError(f"index ranges {a} {list(ranges[a])} and {b} "
                                     f"{list(ranges[b])} overlap")
            return self
        for name, value in values.items():
            if not 0 < value < 1:
                raise ValueError(f"{name}: fraction {value:g} must be between 0 and 1")
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must sum to 1, got {total:g}")
        return self

    def ranges(self) -> dict[str, tuple[int, int]] | None:
        """The index ranges per split, or None when the split is given as fractions."""
        if isinstance(self.train, tuple):
            return {"train": self.train, "validation": self.validation,  # type: ignore[dict-item]
                    "test": self.test}
        return None


class TextConfig(Strict):
    """Token windows of ``source: text``: whole files go to one split each (a stable hash of
    their path), so the test text is never seen in calibration or validation."""

    seq_len: int = Field(256, ge=2, le=MAX_BATCH, description="tokens a window")
    calibration: int = Field(64, ge=1, le=MAX_SAMPLES,
                             description="windows for the level database and the "
                             "fitness (the 'train' split)")
    validation: int = Field(32, ge=1, le=MAX_SAMPLES,
                            description="windows scored per candidate (perplexity)")
    test: int = Field(32, ge=1, le=MAX_SAMPLES, description="windows of the final report only")
    tokenizer: str = Field("bytes", description="'bytes' (token = byte value, vocabulary 256) "
                           "or a local folder with a transformers tokenizer")


class DataConfig(Strict):
    """Where the data comes from. Search scores on ``validation``; ``test`` is for final reports."""

    source: Literal["sklearn-digits", "npz", "torchvision", "image-folder", "sklearn-diabetes",
                    "synthetic-tokens", "text"] = "sklearn-digits"
    path: str | None = Field(None, description="npz file, torchvision root, or image folder; "
                             "for text: 'stdlib' (the Python standard library's source), a "
                             "folder of text files or a glob")
    text: TextConfig = Field(default_factory=TextConfig, description="with source: text")
    name: str | None = Field(None, description="torchvision dataset class, e.g. MNIST")
    x_key: str = "x"
    y_key: str = "y"
    layout: Literal["NCHW", "NHWC", "NCL", "NLC", "flat"] = "NCHW"
    mean: list[float] | None = None
    std: list[float] | None = None
    image_size: list[int] | None = Field(None, description="[height, width] for image folders")
    grayscale: bool = False
    split: SplitConfig = Field(default_factory=SplitConfig)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    split_seed: int = 0
    factory: str | None = Field(None, description="'pkg.module:make_loaders' returning (train, "
                                "validation, test) iterables of (x, y) batches, or a dict with "
                                "those keys; replaces 'source'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of "
                                   "the factory")

    @model_validator(mode="after")
    def _factory_alone(self) -> "DataConfig":
        if self.factory is None:
            if self.kwargs:
                raise ValueError("'kwargs' are the arguments of 'factory'; give 'factory' too")
            return self
        if not _IMPORT_RE.match(self.factory):
            raise ValueError(f"factory {self.factory!r} must look like 'package.module:function'")
        extra = sorted(self.model_fields_set - {"factory", "kwargs"})
        if extra:
            raise ValueError(f"'factory' brings its own loaders (batching, splits, "
                             f"normalisation); remove {', '.join(extra)}")
        return self

    @model_validator(mode="after")
    def _needs_path(self) -> "DataConfig":
        if self.source in ("npz", "torchvision", "image-folder", "text") and not self.path:
            raise ValueError(f"source {self.source!r} needs 'path'")
        if self.source == "torchvision" and not self.name:
            raise ValueError("source 'torchvision' needs 'name' (e.g. MNIST, CIFAR10)")
        return self


class StrategyConfig(Strict):
    name: Literal["ga", "bo", "knapsack", "hybrid", "random", "grid-uniform",
                  "grid-global"] = Field(
        "hybrid", description="how candidates are proposed; the default hybrid won the search "
        "quality benchmark (docs: Strategies, Benchmarks)")
    population_size: int = Field(16, ge=4, le=MAX_SMALL,
                                 description="GA: NSGA-II population (keep well under budget)")
    knapsack_trials: int | None = Field(None, ge=0, le=MAX_TRIALS,
                                        description="hybrid: trials the knapsack planner "
                                        "proposes before the GA takes over; default "
                                        "population_size")
    crossover_prob: float = Field(0.9, ge=0, le=1)
    mutation_prob: float | None = Field(None, ge=0, le=1, description="GA: per-gene; default 1/genes")
    bo_kind: Literal["tpe", "gp"] = "tpe"
    startup_trials: int = Field(10, ge=1, le=MAX_TRIALS,
                                description="BO: random trials before modelling")
    warm_start: bool = Field(
        True, description="GA/BO: first evaluate budgeted allocations (with sensitivity) or "
        "uniform and global-magnitude allocations (without)"
    )
    screen: int = Field(8, ge=1, le=MAX_SMALL,
                        description="GA/BO: proposals per trial ranked by the predictor; "
                        "only the most promising is fine-tuned (1 = no screening)")
    use_sensitivity: bool = Field(True, description="GA/BO: measure per-layer sensitivity first "
                                  "and use it for seeds, screening and mutation (knapsack and "
                                  "hybrid always do)")
    level_switch: float | None = Field(None, ge=0, le=1, description="GA: probability that a "
                                       "child is mutated by one cost-keeping level switch "
                                       "(EvoPress) instead of gene resets; needs "
                                       "use_sensitivity; default 0.5 with oneshot, else 0")

    def switch_prob(self) -> float:
        return self.level_switch or 0.0

    def breeds_on_planner(self) -> bool:
        """Whether a GA breeds with the sensitivity planner's costs (where EvoPress's level
        switch applies): ``ga`` with ``use_sensitivity``, or ``hybrid``."""
        return self.name == "hybrid" or (self.name == "ga" and self.use_sensitivity)

    def handoff(self) -> int:
        """hybrid: the trial number from which the GA proposes."""
        return self.population_size if self.knapsack_trials is None else self.knapsack_trials

    @model_validator(mode="after")
    def _hybrid_uses_sensitivity(self) -> "StrategyConfig":
        if self.name == "hybrid" and not self.use_sensitivity:
            raise ValueError("use_sensitivity false: strategy 'hybrid' (the default) always "
                             "measures per-layer sensitivity; set name: ga (or bo) to search "
                             "without it")
        return self

    @model_validator(mode="after")
    def _handoff_for_hybrid(self) -> "StrategyConfig":
        if self.knapsack_trials is not None and self.name != "hybrid":
            raise ValueError(f"knapsack_trials {self.knapsack_trials} is the hand-over of "
                             f"strategy 'hybrid' (got name {self.name!r}): set name: hybrid, "
                             "or remove knapsack_trials")
        return self


class SensitivityConfig(Strict):
    """Per-layer sensitivity: each choice of each decision alone, every other layer dense."""

    method: Literal["zero-shot", "fisher"] = Field(
        "zero-shot", description="zero-shot: evaluate each choice on a validation subset; "
        "fisher: 0.5 * sum(F * dw^2) from one empirical-Fisher pass (no forward per choice)")
    samples: int = Field(512, ge=1, le=MAX_SAMPLES,
                         description="validation samples used (a fixed subset)")
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)


class FidelityConfig(Strict):
    """Multi-fidelity screening (with ``budget.finetune_steps`` and ``low_steps``): a short
    fine-tune first, the full one only for candidates whose short result could still reach the
    front. With oneshot
    and ``budget.tokens``: a score on a few windows first (successive halving by tokens)."""

    low_steps: int | None = Field(None, ge=0, le=MAX_STEPS,
                                  description="steps of the short fine-tune (with "
                                  "budget.finetune_steps); default off: at equal steps it "
                                  "did not beat full-fidelity search here (a quarter of "
                                  "finetune.steps is a start)")
    promote_rank: int = Field(0, ge=0, le=MAX_SMALL,
                              description="promote when the short result's non-dominated "
                              "rank among all short results is at most this (0 = first front)")
    low_windows: int | None = Field(None, ge=0, le=MAX_SAMPLES,
                                    description="oneshot with budget.tokens: "
                                    "validation windows of the short score (the KL takes the "
                                    "same share of calibration windows); default a quarter; "
                                    "0 turns screening off")
    tolerance: float = Field(0.5, ge=0, description="accuracy points added to a short result "
                             "before ranking it (short fine-tunes are noisy and pessimistic); "
                             "for another task metric, its units, in its better direction")


class BudgetConfig(Strict):
    trials: int | None = Field(40, ge=1, le=MAX_TRIALS, description="total trials in the study")
    minutes: float | None = Field(None, gt=0, le=MAX_MINUTES,
                                  description="wall time of this invocation")
    finetune_steps: int | None = Field(None, ge=1, le=MAX_WORK,
                                       description="total fine-tune steps of the "
                                       "search (all fidelities); an alternative to 'trials'")
    tokens: int | None = Field(None, ge=1, le=MAX_WORK,
                               description="oneshot: total tokens the search scores "
                               "(validation and calibration windows x their length, all "
                               "fidelities); an alternative to 'trials'")

    @model_validator(mode="after")
    def _some_budget(self) -> "BudgetConfig":
        if self.finetune_steps is not None and self.tokens is not None:
            raise ValueError("give 'finetune_steps' (fine-tune path) or 'tokens' (oneshot), "
                             "not both")
        if self.work() is not None and "trials" not in self.model_fields_set:
            # an alternative to the default trial count, not an addition to it
            object.__setattr__(self, "trials", None)
        if self.trials is None and self.minutes is None and self.work() is None:
            raise ValueError("give 'trials', 'minutes', 'finetune_steps', 'tokens' or a "
                             "combination")
        return self

    def work(self) -> int | None:
        """The compute budget in work units: fine-tune steps, or oneshot's scored tokens."""
        return self.finetune_steps if self.finetune_steps is not None else self.tokens

    def work_unit(self) -> str:
        return "tokens scored" if self.tokens is not None else "fine-tune steps"


AUTO_LR = "auto"  # finetune.lr: probed once per study (search.lr_choice)
NOMINAL_LR = 1e-3  # the default lr, and auto's stand-in where nothing is fine-tuned


class FinetuneConfig(Strict):
    """Fast fine-tuning of each candidate with distillation from the dense model."""

    steps: int = Field(150, ge=0, le=MAX_STEPS)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    lr: float | Literal["auto"] = Field(
        NOMINAL_LR, description="fine-tune learning rate, or 'auto': picked once per study by a "
        "short probe on a few candidates (search.lr_choice), its steps charged to the budget")
    temperature: float = Field(4.0, gt=0)
    distill_weight: float = Field(0.7, ge=0, le=1, description="weight of the KD term vs. labels")
    taylor_batches: int = Field(4, ge=1, le=MAX_SMALL,
                                description="batches for gradient (Taylor) scores")
    seed: int = 0
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="learning rate over the fine-tune: constant, cosine decay to 0, "
        "or linear decay to 0; each after warmup_steps of linear warm-up")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="linear warm-up from 0 to lr")
    epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS,
                                 description="fine-tune length in passes over the "
                                 "train split instead of 'steps'")
    reeval_seeds: int = Field(2, ge=0, le=100,
                              description="extra fine-tune seeds for the final front's "
                              "points; the front and export use the mean")
    amp: bool = Field(False, description="mixed precision for the fine-tune's forward and "
                      "backward: bfloat16 autocast (float16 with loss scaling on GPUs without "
                      "bfloat16); evaluation stays float32")

    @field_validator("lr", mode="before")
    @classmethod
    def _number_or_auto(cls, value):
        if isinstance(value, str) and value != AUTO_LR:
            try:
                float(value)
                hint = "; write numbers without quotes"
            except ValueError:
                hint = ""
            raise ValueError(f"must be a number above 0, or '{AUTO_LR}'{hint}")
        return value

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value):
        if value != AUTO_LR and not value > 0:
            raise ValueError(f"must be above 0, or '{AUTO_LR}'")
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "FinetuneConfig":
        if self.epochs is not None and "steps" in self.model_fields_set:
            raise ValueError("give 'steps' or 'epochs', not both")
        return self


class OneShotConfig(Strict):
    """Scoring without a fine-tune per candidate (language models): every searched layer is
    compressed once per level of its choices on calibration windows (the level database under
    ``runs/<name>/levels``), a candidate is stitched from it and scored on validation windows;
    its KL divergence to the dense model is recorded beside."""

    sparsity_method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "sparsegpt", description="how a level's weights are pruned")
    bits_method: Literal["rtn", "gptq"] = Field(
        "gptq", description="how a level's weights are rounded onto their GGUF type")
    blocksize: int = Field(128, ge=1, le=MAX_SMALL,
                           description="GPTQ/SparseGPT lazy-update block (columns)")
    percdamp: float = Field(0.01, gt=0, lt=1, description="Hessian dampening (share of its "
                            "mean diagonal)")
    offload: bool = Field(False, description="keep the model's weights on the CPU and run it "
                          "on the device one block at a time (database build, dense reference, "
                          "scoring): for a model larger than the GPU's memory; slower otherwise")
    layers_at_once: int = Field(4, ge=1, le=MAX_SMALL,
                                description="layers whose calibration statistics are "
                                "collected in one pass (memory: in_features^2 floats each)")
