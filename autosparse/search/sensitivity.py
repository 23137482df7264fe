"""Per-layer sensitivity: what each choice of each decision alone does to validation loss.

For every decision of the space and each of its choices (dense fp32 excluded), with every other
layer dense fp32, on a fixed validation subset (the first ``samples`` samples):

- ``zero-shot``: compress only that decision's layers, evaluate (eval mode, no gradients) and
  take the change in cross-entropy (nats) and top-1 accuracy (points). No fine-tune.
- ``fisher``: one pass accumulating the empirical Fisher diagonal ``F`` of the searched weights
  (per-sample squared gradients), then ``loss_delta = 0.5 * sum(F * (w_c - w)^2)`` per choice with
  no forward pass per choice; accuracy is not measured (NaN).

Fast by construction: the model is copied once and each choice swaps its layers' compressed
tensors in and out under ``no_grad``; the compressed tensors come from ``compress_model`` applied
to a copy of just those layers, so they are exactly what a trial's compressed model computes.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Collection, ContextManager, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from autosparse.compress.apply import compress_model, taylor_scores
from autosparse.config.sections import FinetuneConfig, SensitivityConfig
from autosparse.search.allocation.table import ChoiceSensitivity, choice_id
from autosparse.space.candidate import CHANNEL, DENSE, FLOAT_BITS, LayerChoice
from autosparse.space.graph import ChannelGraph
from autosparse.space.search_space import Decision, SearchSpace
from autosparse.workload.devices import device_of, eval_mode
from autosparse.workload.splits import DataSplits
from autosparse.workload.task import Task

__all__ = ["validation_subset", "dense_baseline", "measure_sensitivity", "fisher_diagonal",
           "compressed_tensors", "scores_for_space", "measured_choices"]

Batches = list[tuple[Tensor, Tensor]]
OnDecision = Callable[[str, list[ChoiceSensitivity]], None]
# (layers, choice) -> {layer: {"weight": tensor}}: where a choice's compressed weights come from
# when not from ``compress_model`` (a one-shot search reads them from its level database)
TensorSource = Callable[[tuple[str, ...], LayerChoice], dict[str, dict[str, Tensor]]]
_PER_SAMPLE_FLOATS = 2 ** 26


def validation_subset(data: DataSplits, cfg: SensitivityConfig,
                      device: torch.device | str = "cpu") -> Batches:
    """The first ``cfg.samples`` validation samples (fewer if the split is smaller), batched once
    and moved to ``device``, so every choice is scored on the very same tensors."""
    batches: Batches = []
    taken = 0
    for x, y in data.loader("validation", cfg.batch_size):
        if taken >= cfg.samples:
            break
        keep = min(len(y), cfg.samples - taken)
        batches.append((x[:keep].to(device), torch.as_tensor(y[:keep]).to(device)))
        taken += keep
    if not batches:
        raise ValueError("sensitivity: the validation split is empty")
    return batches


def _loss_and_accuracy(model: nn.Module, batches: Batches,
                       task: Task | None = None) -> tuple[float, float]:
    """Mean cross-entropy (nats) and top-1 accuracy (percent) over the batches.

    With a ``task``: its mean loss, and its metric signed so that negative is worse (the metric
    for a maximised one, minus it for a minimised one; NaN for a user's whole-loader metric).
    """
    if task is not None and not task.is_default:
        loss_sum = 0.0
        count = 0
        with eval_mode(model), torch.no_grad():
            for x, y in batches:
                s, n = task.loss_sum(model(x), y)
                loss_sum, count = loss_sum + s, count + n
            metric = math.nan
            if task.metric_fn is None:
                value = task.metric_of_batches(model, batches)
                metric = value if task.maximize else -value
        return loss_sum / count, metric
    loss_sum = 0.0
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += int(y.numel())
    return loss_sum / total, 100.0 * correct / total


def dense_baseline(dense: nn.Module, data: DataSplits, cfg: SensitivityConfig,
                   task: Task | None = None) -> tuple[float, float]:
    """(loss, accuracy) of the dense model on the sensitivity subset."""
    return _loss_and_accuracy(dense, validation_subset(data, cfg, device_of(dense)), task)


def measured_choices(decision: Decision) -> list[LayerChoice]:
    """The decision's canonical choices other than dense fp32, in a fixed order."""
    return sorted(c for c in decision.distinct_choices()
                  if not (c.pattern == DENSE and c.bits == FLOAT_BITS))


def scores_for_space(dense: nn.Module, data: DataSplits, space: SearchSpace,
                     finetune_cfg: FinetuneConfig,
                     task: Task | None = None) -> dict[str, Tensor] | None:
    """Taylor scores when some decision offers the taylor criterion, else None.

    Same loader, seed and batch count as ``CandidateEvaluator._scores``, so the masks measured
    here are the masks a trial uses (a layer's score does not depend on which others are scored).
    """
    if not any("taylor" in d.criteria for d in space.decisions):
        return None
    loader = data.loader("train", finetune_cfg.batch_size, shuffle=True, seed=finetune_cfg.seed)
    loss = None if task is None or task.is_default else task.loss  # as the trial's scores
    return taylor_scores(dense, loader, space.layer_names, finetune_cfg.taylor_batches, loss)


def compressed_tensors(modules: Mapping[str, nn.Module], layers: Collection[str],
                       choice: LayerChoice, scores: Mapping[str, Tensor] | None,
                       graph: ChannelGraph | None = None) -> dict[str, dict[str, Tensor]]:
    """``{layer: {"weight": w_c[, "bias": b_c]}}``: the effective tensors of ``choice``.

    Built by ``compress_model`` on a copy of only these layers (not the whole model), so masks,
    fake-quant and channel bias masking are exactly those of a trial's compressed model. A
    channel choice prunes whole groups, so it also returns the other producers' and the
    consumers' tensors (built on a copy of the whole model, ``modules[""]``).
    """
    layers = list(layers)
    if choice.pattern == CHANNEL and graph is not None:
        return _group_tensors(modules, layers, choice, scores, graph)
    if choice.criterion == "taylor" and choice.pattern != DENSE:
        missing = [name for name in layers if scores is None or name not in scores]
        if missing:
            raise ValueError(f"choice {choice.describe()} uses the taylor criterion but no Taylor "
                             f"scores were given for {', '.join(missing)}; pass scores=")
    keys = [str(i) for i in range(len(layers))]
    holder = nn.ModuleDict({key: modules[name] for key, name in zip(keys, layers)})
    local_scores = None if scores is None else {
        key: scores[name] for key, name in zip(keys, layers) if name in scores}
    try:
        compressed = compress_model(holder, {key: choice for key in keys}, local_scores)
    except ValueError as err:
        raise ValueError(f"{', '.join(layers)}: {choice.describe()}: {err}") from None
    out: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for key, name in zip(keys, layers):
            module = compressed[key]
            tensors = {"weight": module.weight.detach()}
            if parametrize.is_parametrized(module, "bias"):
                tensors["bias"] = module.bias.detach()
            out[name] = tensors
    return out


def _group_tensors(modules: Mapping[str, nn.Module], layers: list[str], choice: LayerChoice,
                   scores: Mapping[str, Tensor] | None,
                   graph: ChannelGraph) -> dict[str, dict[str, Tensor]]:
    try:
        compressed = compress_model(modules[""], {name: choice for name in layers}, scores, graph)
    except ValueError as err:
        raise ValueError(f"{', '.join(layers)}: {choice.describe()}: {err}") from None
    touched = dict.fromkeys(layers)
    for group in graph.groups:
        if group.producers[0] in layers:
            touched.update(dict.fromkeys([*group.producers, *(n for n, _ in group.consumers)]))
    compressed_modules = dict(compressed.named_modules())
    out: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for name in touched:
            module = compressed_modules[name]
            out[name] = {"weight": module.weight.detach()}
            if parametrize.is_parametrized(module, "bias"):
                out[name]["bias"] = module.bias.detach()
    return out


@contextmanager
def _swapped(modules: Mapping[str, nn.Module],
             tensors: Mapping[str, Mapping[str, Tensor]]) -> Iterator[None]:
    """Copy the given tensors into the modules' parameters, restoring the originals after."""
    saved = []
    with torch.no_grad():
        try:
            for name, by_attr in tensors.items():
                for attr, value in by_attr.items():
                    param = getattr(modules[name], attr)
                    saved.append((param, param.detach().clone()))
                    param.copy_(value)
            yield
        finally:
            for param, original in saved:
                param.copy_(original)


def fisher_diagonal(model: nn.Module, batches: Batches, layer_names: Collection[str],
                    task: Task | None = None) -> dict[str, Tensor]:
    """Empirical Fisher diagonal ``mean_i (d loss_i / d w)^2`` of the named layers' weights.

    Per-sample gradients (``torch.func.vmap`` over the batch), so ``0.5 * sum(F * dw^2)`` is a
    second-order estimate of the mean loss change in nats whatever the batch size. Eval mode;
    the model is not modified and no ``.grad`` is left on it.
    """
    from torch.func import functional_call, grad, vmap

    names = list(layer_names)
    modules = dict(model.named_modules())
    keys = [f"{name}.weight" for name in names]
    state = {k: v.detach() for k, v in model.named_parameters()}
    state.update({k: v.detach() for k, v in model.named_buffers()})
    searched = {k: state.pop(k) for k in keys}
    for name in names:
        if not isinstance(getattr(modules[name], "weight", None), Tensor):
            raise ValueError(f"layer {name!r} has no weight")

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, {**state, **params}, (x.unsqueeze(0),))
        if task is not None and not task.is_default:
            return task.loss(logits, y.unsqueeze(0))
        return F.cross_entropy(logits.float(), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    sums = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in searched.items()}
    # per-sample gradients hold chunk x weights floats: keep that under ~256 MB
    chunk = max(1, _PER_SAMPLE_FLOATS // max(1, sum(v.numel() for v in searched.values())))
    total = 0
    with eval_mode(model):
        for x, y in batches:
            for start in range(0, len(y), chunk):
                grads = per_sample(searched, x[start:start + chunk], y[start:start + chunk])
                for k in keys:
                    sums[k].add_(grads[k].float().pow(2).sum(dim=0))
            total += int(y.numel())
    return {name: sums[key] / total for name, key in zip(names, keys)}


def measure_sensitivity(
    dense: nn.Module,
    data: DataSplits,
    space: SearchSpace,
    cfg: SensitivityConfig,
    *,
    scores: Mapping[str, Tensor] | None = None,
    skip: Collection[str] = frozenset(),
    on_decision: OnDecision | None = None,
    baseline: tuple[float, float] | None = None,
    graph: ChannelGraph | None = None,
    task: Task | None = None,
    tensors_for: TensorSource | None = None,
    running: Callable[[nn.Module], ContextManager[Any]] | None = None,
) -> list[ChoiceSensitivity]:
    """Entries of every decision not in ``skip``, decision by decision (see the module doc).

    ``tensors_for(layers, choice)`` gives a choice's compressed weights instead of
    ``compress_model`` (one-shot: the level database's stored levels); ``running(model)`` is
    the context the zero-shot evaluations run in (one-shot offload: block by block on the GPU).

    ``on_decision(name, entries)`` runs after each decision, so a caller can store it at once
    and a kill loses at most the decision in progress. ``baseline`` is the dense (loss,
    accuracy) on the same subset when the caller already has it. ``dense`` is not modified.
    """
    if cfg.method not in ("zero-shot", "fisher"):
        raise ValueError(f"sensitivity method {cfg.method!r} is not zero-shot or fisher")
    todo = [d for d in space.decisions if d.name not in skip]
    if not todo:
        return []
    device = device_of(dense)
    batches = validation_subset(data, cfg, device)
    dense_modules = dict(dense.named_modules())
    if tensors_for is None:
        def tensors_for(layers, choice):
            return compressed_tensors(dense_modules, layers, choice, scores, graph)
    out: list[ChoiceSensitivity] = []
    if cfg.method == "fisher":
        fisher = fisher_diagonal(dense, batches, [n for d in todo for n in d.layers], task)
        for decision in todo:
            entries = []
            for choice in measured_choices(decision):
                tensors = tensors_for(tuple(decision.layers), choice)
                # a channel group's consumers have no Fisher here: their removed columns read
                # channels whose own change is already counted
                delta = sum(float((fisher[name] * (by["weight"].float()
                                                   - dense_modules[name].weight.detach().float())
                                   .pow(2)).sum()) for name, by in tensors.items()
                            if name in fisher)
                entries.append(ChoiceSensitivity(decision.name, choice_id(choice), 0.5 * delta,
                                                 math.nan))
            out.extend(entries)
            if on_decision is not None:
                on_decision(decision.name, entries)
        return out

    run = running or (lambda model: nullcontext(model))
    if baseline is None:
        with run(dense):
            baseline = _loss_and_accuracy(dense, batches, task)
    dense_loss, dense_accuracy = baseline
    work = copy.deepcopy(dense)  # the one copy: layers are swapped in and out of it
    work_modules = dict(work.named_modules())
    for decision in todo:
        entries = []
        for choice in measured_choices(decision):
            tensors = tensors_for(tuple(decision.layers), choice)
            with _swapped(work_modules, tensors), run(work):
                loss, accuracy = _loss_and_accuracy(work, batches, task)
            entries.append(ChoiceSensitivity(decision.name, choice_id(choice),
                                             loss - dense_loss, accuracy - dense_accuracy))
        out.extend(entries)
        if on_decision is not None:
            on_decision(decision.name, entries)
    return out
