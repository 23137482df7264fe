"""The one-shot path of a search: its space's choices as levels, the level database built for
them, and a candidate's model stitched from it.

A search's ``LayerChoice`` (pattern, sparsity, bits) of a layer is one ``Level`` of that layer
(bits 32 = the dense dtype, 16 = F16; the criterion plays no part: the config's
``oneshot.sparsity_method`` chooses the weights). The database lives under
``runs/<search>/levels``, is built once (resumable; every worker and ``export`` opens it), and a
candidate's model is a copy of the dense model with each searched layer's weight read from it:
no compression work per candidate. Its size is what GGUF stores: each searched layer at its
level's type, every other tensor at F32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autosparse.compress.oneshot.database import (
    DatabaseInfo,
    LevelDatabase,
    build_level_database,
)
from autosparse.compress.oneshot.layer_weights import is_conv1d, is_oneshot_layer, layer_weight
from autosparse.compress.oneshot.level_files import DatabaseMismatch
from autosparse.compress.oneshot.fitness import DenseReference, kl_fitness
from autosparse.compress.oneshot.levels import Level
from autosparse.compress.oneshot.streaming import streamed
from autosparse.config.sections import OneShotConfig
from autosparse.config.validation import ConfigError
from autosparse.space.candidate import DENSE, FLOAT_BITS, Candidate, LayerChoice

Progress = Callable[[int, int, str, str, float], None]


def level_of(choice: LayerChoice, cfg: OneShotConfig) -> Level:
    """The level a search choice names, compressed by the config's methods."""
    bits = None if choice.bits >= FLOAT_BITS else int(choice.bits)
    bits_method = "rtn" if bits == 16 else cfg.bits_method  # F16 has no error to feed back
    if choice.pattern == DENSE or choice.sparsity == 0:
        return Level(bits=bits, method=bits_method) if bits else Level()
    return Level(sparsity=choice.sparsity, pattern=choice.pattern, bits=bits,
                 method=f"{cfg.sparsity_method}+{bits_method}")


def levels_for(choices: Mapping[str, set[LayerChoice]], cfg: OneShotConfig) -> dict[str, list[Level]]:
    """Each layer's distinct levels (dense first), from its decision's distinct choices."""
    out: dict[str, list[Level]] = {}
    for layer, layer_choices in choices.items():
        levels = {level_of(c, cfg) for c in layer_choices} | {Level()}
        out[layer] = sorted(levels, key=lambda lv: (lv != Level(), lv.key))
    return out


def check_linear(model: nn.Module, layers: list[str]) -> None:
    """One-shot compressors work on ``nn.Linear`` weights (and transformers' ``Conv1D``, read
    as ``[out, in]`` by ``layer_weights``): name the first layer that is neither."""
    modules = dict(model.named_modules())
    for name in layers:
        if not is_oneshot_layer(modules.get(name)):
            kind = type(modules.get(name)).__name__
            raise ConfigError(f"oneshot: layer {name} is a {kind}, not a Linear (or transformers "
                              "Conv1D); exclude it (space.exclude) or search it with the "
                              "fine-tune path")


def open_or_build(model: nn.Module, levels: Mapping[str, list[Level]], windows: torch.Tensor,
                  root: Path, cfg: OneShotConfig, device: str = "cpu",
                  progress: Progress | None = None) -> tuple[LevelDatabase, DatabaseInfo]:
    """The search's level database: entries missing from ``root`` are built (a killed build
    resumes), then it is opened against this model and these calibration windows."""
    check_linear(model, list(levels))
    try:
        info = build_level_database(model, list(levels), dict(levels), windows, root,
                                    layers_at_once=cfg.layers_at_once, blocksize=cfg.blocksize,
                                    percdamp=cfg.percdamp, device=device, progress=progress,
                                    stream=cfg.offload)
        db = LevelDatabase(root, model=model, calibration_windows=windows)
    except (ValueError, DatabaseMismatch) as err:  # a layer's shape, or another model's database
        raise ConfigError(f"oneshot: {err}") from None
    return db, info


def stitched(dense: nn.Module, db: LevelDatabase,
             assignment: Mapping[str, Level]) -> nn.Module:
    """A copy of ``dense`` whose assigned layers hold their level's stored weights."""
    model = copy.deepcopy(dense)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, level in assignment.items():
            if level != Level():
                weight = layer_weight(modules[layer])  # [out, in], a view of the parameter
                weight.copy_(db.weight(layer, level).to(weight.device, weight.dtype))
    return model


def f32_bytes(model: nn.Module) -> int:
    """Bytes of every parameter at F32: the dense model's GGUF tensor data, the size scale a
    one-shot candidate is compared with."""
    return sum(parameter.numel() * 4 for parameter in model.parameters())


def stored_bytes(model: nn.Module, db: LevelDatabase, assignment: Mapping[str, Level]) -> int:
    """Bytes of tensor data a GGUF file of this candidate holds: each assigned layer's weight
    at its level's type, every other parameter tensor at F32 (4 bytes a value)."""
    total = 0
    assigned = {f"{layer}.weight" for layer in assignment}
    for name, parameter in model.named_parameters():
        if name not in assigned:
            total += parameter.numel() * 4
    for layer, level in assignment.items():
        total += db.stored_bytes(layer, level)
    return total


def stored_bits_per_weight(db: LevelDatabase, assignment: Mapping[str, Level]) -> float:
    """Average stored bits per weight of the searched layers (GGUF block scales included)."""
    weights = sum(db.shape(layer)[0] * db.shape(layer)[1] for layer in assignment)
    stored = sum(db.stored_bytes(layer, level) for layer, level in assignment.items())
    return 8.0 * stored / max(weights, 1)


@dataclass
class OneShotScoring:
    """What a one-shot search scores candidates with: the level database, the dense model's
    next-token distributions on the calibration windows (for the KL), and the config."""

    db: LevelDatabase
    config: OneShotConfig
    reference: DenseReference
    info: DatabaseInfo
    stream_device: str | None = None  # oneshot.offload: where models run, block by block

    def running(self, model: nn.Module):
        """Context in which ``model`` (weights on the CPU with offload) runs on the device."""
        return streamed(model, self.stream_device)

    def assignment(self, candidate: Candidate) -> dict[str, Level]:
        """The candidate's level of every layer of the database (unlisted layers: dense)."""
        return {layer: level_of(candidate.get_choice(layer), self.config)
                for layer in self.db.layers}

    def model(self, dense: nn.Module, candidate: Candidate) -> nn.Module:
        return stitched(dense, self.db, self.assignment(candidate))

    def layer_tensors(self, layers: list[str] | tuple[str, ...],
                      choice: LayerChoice) -> dict[str, dict[str, torch.Tensor]]:
        """The stored weights of ``layers`` at ``choice``'s level, as the sensitivity swaps
        them in: each layer alone, exactly what a candidate holding that level computes."""
        level = level_of(choice, self.config)
        modules = dict(self.db.model.named_modules()) if self.db.model is not None else {}
        weights = {name: self.db.weight(name, level) for name in layers}  # [out, in]
        # in the module's own layout: a Conv1D holds [in, out]
        return {name: {"weight": w.t() if is_conv1d(modules.get(name)) else w}
                for name, w in weights.items()}

    def weight_bytes(self, layer: str, choice: LayerChoice) -> int:
        """Bytes of ``layer``'s weight at ``choice`` in the exported file (its GGUF type)."""
        return self.db.stored_bytes(layer, level_of(choice, self.config))

    def weight_numel(self) -> dict[str, int]:
        """Weight elements of every searched layer (what ``bits_per_weight`` averages over)."""
        return {layer: self.db.shape(layer)[0] * self.db.shape(layer)[1]
                for layer in self.db.layers}

    def metrics(self, model: nn.Module, dense_bytes: int, candidate: Candidate,
                n_windows: int | None = None) -> dict[str, float]:
        """KL to dense on the calibration windows (the first ``n_windows``; all by default),
        stored size and bits per searched weight."""
        assignment = self.assignment(candidate)
        size = stored_bytes(model, self.db, assignment)
        numel = self.weight_numel()
        pruned = sum(level.sparsity * numel[layer] for layer, level in assignment.items())
        return {"kl": kl_fitness(model, self.reference, n_windows),
                "sparsity": pruned / sum(numel.values()),
                "size_kb": size / 1000.0, "compression": dense_bytes / size,
                "bits_per_weight": stored_bits_per_weight(self.db, assignment)}
