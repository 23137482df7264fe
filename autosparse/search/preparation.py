"""Preparing a search: config -> data -> dense model (trained and cached on first use) -> layer
table -> space, plus the candidate timer of ``hardware: measure`` (ONNX in onnxruntime; with
``oneshot``, the candidate's GGUF in llama.cpp) and grid-global's points.

Split out of ``runner``: every worker process, ``autosparse export`` and the other commands
prepare the same ``SearchContext``, without running any trial.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from autosparse.compress.oneshot.fitness import DenseReference
from autosparse.compress.oneshot.search_levels import (
    OneShotScoring,
    f32_bytes,
    levels_for,
    open_or_build,
)
from autosparse.compress.oneshot.streaming import streamed
from autosparse.config.hardware import load_profile
from autosparse.config.runtime import MEASURE
from autosparse.config.schema import SearchConfig, load_config
from autosparse.config.sections import OneShotConfig
from autosparse.config.validation import ConfigError
from autosparse.cost.calibration.machine import this_machine, warn_if_other_machine
from autosparse.cost.deploy_file import FILE_TARGETS, DeployFileBuilder
from autosparse.cost.gguf_latency import GGUFTimer, require_llama_cpp
from autosparse.cost.latency_table import find_latency_table
from autosparse.cost.measured_latency import CandidateTimer
from autosparse.cost.onnx_files import input_array
from autosparse.search.context import SearchContext
from autosparse.search.objective import cost_metrics
from autosparse.search.sqlite_tuning import use_fast_sqlite
from autosparse.space.candidate import Candidate
from autosparse.space.discovery import (
    discover,
    find_layers,
    global_magnitude_allocation,
    token_embedding,
    with_searchable,
)
from autosparse.space.graph import ChannelGraph
from autosparse.space.layers import LayerTable
from autosparse.space.search_space import GridSpace, SearchSpace
from autosparse.tracking.progress import dense_training, oneshot_progress
from autosparse.workload.data import load_data
from autosparse.workload.data_checks import check_data
from autosparse.workload.dense import cache_path, prepare_dense
from autosparse.workload.devices import amp_mode, place_workers, present_devices
from autosparse.workload.models import build_model
from autosparse.workload.splits import DataSplits
from autosparse.workload.task import build_task


def prepare(config_path: str | os.PathLike, runs_dir: Path,
            device: str | None = None) -> SearchContext:
    """Everything a worker needs; ``device`` is this worker's (default: the config's, checked
    against the devices present before anything heavy)."""
    use_fast_sqlite()
    config = load_config(config_path)
    if config.oneshot is not None and config.hardware == MEASURE:
        require_llama_cpp()  # one line now, not after the dense model and the level database
    if device is None:
        device = place_workers(1, config.device, config.devices, present_devices())[0]
    amp_mode(torch.device(device).type, config.finetune.amp)  # refused here, not mid-search
    if device.startswith("cuda"):  # this process's default GPU: nothing lands on GPU 0 by default
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    data = load_data(config.data)
    check_data(data, config.task.kind)  # before the dense model trains on it
    data.pin_memory = device.startswith("cuda") and not data.user_loaders
    profile = load_profile(config.cost_profile()) if config.hardware else None
    if profile is not None:  # a measured profile from another CPU: say so before minutes of work
        warn_if_other_machine(profile, config.cost_profile())
    _check_space_before_training(config, data, runs_dir / "dense")
    dense, dense_metrics = prepare_dense(config.model, data, runs_dir / "dense", config.seed,
                                         device, task=build_task(config.task),
                                         announce=dense_training)
    table, graph = discover(dense, data.input_shape, channels=config.oneshot is None)
    space = SearchSpace.build(config.space, table)
    if space.excluded:  # global magnitude allocations only over the searched layers
        table = with_searchable(table, dense, space.layer_names)
    latency_table, table_note = find_latency_table(runs_dir / config.name, table, profile,
                                                   this_machine()["cpu"])
    dense_metrics = {**dense_metrics, **cost_metrics(table, Candidate({}), profile,
                                                     latency_table=latency_table)}
    timer: CandidateTimer | GGUFTimer | None = None
    if config.oneshot is None:
        timer = _candidate_timer(config, dense, table, graph, data)
    deploy = _deploy_builder(config, dense, table, graph, data)
    if deploy is not None:  # the size axis against the dense model's own fp32 ONNX file
        dense_metrics["size_kb_packed"] = dense_metrics["size_kb"]
        dense_metrics["size_kb"] = deploy.dense_bytes / 1000
    if timer is not None:  # the latency axis is normalised by the dense model, measured alike
        dense_metrics["latency_ms"] = timer.dense_ms()
    gguf_timer = _gguf_timer(config, dense, runs_dir / config.name)
    if gguf_timer is not None:  # the dense F32 GGUF per token, before the database is built
        dense_metrics.update(gguf_timer.dense_metrics())
    grid = _global_grid(dense, space) if config.strategy.name == "grid-global" else None
    offload = config.oneshot is not None and config.oneshot.offload
    if not offload:  # offload: the weights stay on the CPU, blocks visit the device in turn
        dense.to(device)  # discovery, grids and timing above ran on the CPU copy
    oneshot = None
    if config.oneshot is not None:  # the level database: built once, opened by every process
        oneshot = prepare_oneshot(config.oneshot, dense, space, data,
                                  runs_dir / config.name / "levels", device)
        dense_metrics = {**dense_metrics, "kl": 0.0, "compression": 1.0, "bits_per_weight": 32.0,
                         "sparsity": 0.0,
                         "size_kb": f32_bytes(dense) / 1000.0}
        if gguf_timer is not None:
            gguf_timer.db = oneshot.db
            timer = gguf_timer
    return SearchContext(config, Path(config_path).read_text(), runs_dir, data, dense,
                         dense_metrics, table, space, profile, grid, graph=graph,
                         latency_table=latency_table, latency_table_note=table_note,
                         timer=timer, device=device, placement=(device,), oneshot=oneshot,
                         deploy=deploy)


def _deploy_builder(config: SearchConfig, dense: torch.nn.Module, table: LayerTable,
                    graph: ChannelGraph, data: DataSplits) -> DeployFileBuilder | None:
    """With ``deploy: onnx`` or ``onnx-int8``, what builds each candidate's file (else None);
    int8 is calibrated on the train split in order, with export's batches."""
    if config.deploy not in FILE_TARGETS:
        return None

    def calibration():
        for x, _ in data.loader("train", data.batch_size):
            yield input_array(x.numpy())

    return DeployFileBuilder(config.deploy, dense, table, graph, data.input_shape, calibration,
                             tokens=token_embedding(dense) is not None)


def prepare_oneshot(cfg: OneShotConfig, dense: torch.nn.Module, space: SearchSpace,
                    data: DataSplits, root: Path, device: str) -> OneShotScoring:
    """The level database of the space's choices on the calibration windows (the ``train``
    split's inputs), built where missing, and the dense reference the KL is measured against."""
    choices = {layer: decision.distinct_choices() for decision in space.decisions
               for layer in decision.layers}
    windows = data.train.tensors[0]
    with oneshot_progress(root) as progress:
        db, info = open_or_build(dense, levels_for(choices, cfg), windows, root, cfg, device,
                                 progress)
    stream = device if cfg.offload else None
    with streamed(dense, stream):
        reference = DenseReference(dense, windows)
    return OneShotScoring(db, cfg, reference, info, stream_device=stream)


MEASURE_CALIBRATION_BATCHES = 4  # train batches for the int8 ranges of measured candidates


def _candidate_timer(config: SearchConfig, dense: torch.nn.Module, table: LayerTable,
                     graph: ChannelGraph, data: DataSplits) -> CandidateTimer | None:
    """With ``hardware: measure``, the timer every trial's latency comes from (else None)."""
    if config.hardware != MEASURE or config.measure is None:
        return None
    batches = []
    for x, _ in data.loader("train", config.data.batch_size):
        batches.append(x.numpy())
        if len(batches) == MEASURE_CALIBRATION_BATCHES:
            break
    settings = config.measure
    return CandidateTimer(dense, table, graph, data.input_shape, rounds=settings.rounds,
                          calls=settings.calls, warmup=settings.warmup, calibration=batches,
                          seed=config.seed)


def _gguf_timer(config: SearchConfig, dense: torch.nn.Module, folder: Path) -> GGUFTimer | None:
    """oneshot with ``hardware: measure``: each candidate's GGUF timed in llama.cpp (its files
    in a private folder under ``runs/<name>/``, removed when the process ends). The dense F32
    GGUF is written and timed here, so a model the GGUF writer or llama.cpp cannot run is a
    one-line error before the level database is built."""
    if config.oneshot is None or config.hardware != MEASURE or config.measure is None:
        return None
    settings = config.measure
    timer = GGUFTimer(dense, None, rounds=settings.rounds, calls=settings.calls,
                      warmup=settings.warmup, prompt_tokens=settings.prompt_tokens,
                      parent=folder, seed=config.seed)
    try:
        timer.dense_latency()
    except ValueError as err:  # an architecture the writer does not know, a file llama.cpp refuses
        timer.close()
        raise ConfigError(f"hardware: measure with oneshot times each candidate's GGUF in "
                          f"llama.cpp, and this model's cannot be: {err}; set 'hardware' to a "
                          "profile to predict latency instead") from None
    return timer


def _check_space_before_training(config: SearchConfig, data: DataSplits, cache_dir: Path) -> None:
    """Rules, include/exclude and patterns need only the layers, not trained weights: check them
    on an untrained copy before minutes of dense training, so a typo costs a second."""
    model_cfg = config.model
    if model_cfg.builtin is None or model_cfg.checkpoint or \
            cache_path(model_cfg, data, cache_dir, config.seed, build_task(config.task)).is_file():
        return  # the model is ready at once: the normal check comes right away
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as without it
        untrained = build_model(model_cfg, data.input_shape, data.num_classes).eval()
        table, _ = discover(untrained, data.input_shape)
    SearchSpace.build(config.space, table)


def _global_grid(dense: torch.nn.Module, space: SearchSpace) -> GridSpace:
    """grid-global's points: exact one-threshold allocations at each of the space's sparsities."""
    targets = sorted({s for d in space.decisions for s in d.sparsities if s > 0})
    layers = find_layers(dense)
    weights = {name: layers[name].weight for name in space.layer_names}
    allocations = global_magnitude_allocation(weights, targets, digits=None)
    return GridSpace(tuple(space.global_grid_candidates(allocations)))
