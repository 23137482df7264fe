"""Layer discovery: model -> LayerTable, the plain data every pure part of the search reads.

One forward pass with hooks measures what static shapes cannot tell: how many positions a conv
or a Linear is applied to (MACs), and the activation sizes the cost model charges for memory.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Collection, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from autosparse.space.graph import ChannelGraph, trace_channel_groups
from autosparse.space.layers import LayerInfo, LayerTable, OpInfo
from autosparse.workload.devices import eval_mode

SEARCHABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)
DEFAULT_TARGETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """``transformers``' ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def layer_kind(module: nn.Module) -> str:
    """The base type's name (``Conv1d``, ``Conv2d``, ``Linear``, ``Embedding``, or
    ``Conv1D`` for transformers' transposed Linear), also for subclasses."""
    if _is_hf_conv1d(module):
        return "Conv1D"
    return next(t.__name__ for t in SEARCHABLE_TYPES if isinstance(module, t))


def find_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv1d/Conv2d/Linear/Embedding (and transformers' Conv1D) with a 2-d or larger
    weight, by ``named_modules`` name, in module order."""
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, SEARCHABLE_TYPES) or _is_hf_conv1d(module))
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() >= 2
    }


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call: every output element costs one dot product of the reduction length.

    The probe batch has one sample, so ``numel`` is per sample wherever the batch axis sits
    (e.g. sequence-first inputs to a Linear).
    """
    outputs = output.numel()
    if isinstance(module, nn.Embedding):
        return 0  # a lookup: no multiply-accumulates
    if _is_hf_conv1d(module):
        return outputs * module.weight.shape[0]
    if isinstance(module, nn.Linear):
        return outputs * module.in_features
    return outputs * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def example_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """One random sample (batch 1) on the model's device and dtype, from a private generator."""
    parameter = next(model.parameters(), None)
    floating = parameter is not None and parameter.is_floating_point()
    dtype = parameter.dtype if floating else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)  # a private generator: global RNG untouched
    embedding = token_embedding(model)
    if embedding is not None:  # a language model: token ids, not floats
        return torch.randint(0, embedding.num_embeddings, (1, *input_shape),
                             generator=generator).to(device)
    return torch.randn((1, *input_shape), generator=generator).to(device=device, dtype=dtype)


def token_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's first module with a ``weight`` when it is an ``nn.Embedding`` (its input is
    then token ids, as for a language model), else None."""
    for module in model.modules():
        if isinstance(module._parameters.get("weight"), torch.Tensor):
            return module if isinstance(module, nn.Embedding) else None
    return None


def measure(
    model: nn.Module, layers: dict[str, nn.Module], input_shape: tuple[int, ...]
) -> dict[str, dict[str, int]]:
    """Per-sample MACs and activation sizes of each layer from one forward pass on batch size 1.

    A layer called more than once (shared weights) adds up over its calls; a layer never called
    keeps zeros.
    """
    stats = {name: {"macs": 0, "input_elements": 0, "output_elements": 0} for name in layers}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            entry = stats[name]
            entry["macs"] += _layer_macs(module, output)
            entry["input_elements"] += inputs[0].numel()
            entry["output_elements"] += output.numel()

        return hook

    x = example_input(model, input_shape)
    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _op_kinds() -> dict:
    """Torch functions and tensor methods recorded as ops between weight layers, by kind.

    Element-wise ops count only between two tensors of the activation's size (a residual add,
    a gate), not a tensor and a scalar or a broadcast bias (fused or negligible). ReLU-like
    activations are left out: runtimes fuse them into the layer before.
    """
    kinds = {}
    for kind, functions in {
        "add": (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
                torch.Tensor.add_, torch.Tensor.__iadd__, operator.add, torch.sub,
                torch.Tensor.__sub__),
        "mul": (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__),
        "pool": (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                 F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                 torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
                 torch._C._nn.avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
                 torch.Tensor.mean),
        "concat": (torch.cat, torch.concat, torch.stack),
        "transpose": (torch.transpose, torch.Tensor.transpose, torch.Tensor.permute,
                      torch.permute),
        "softmax": (F.softmax, torch.softmax, torch.Tensor.softmax),
        "norm": (F.layer_norm, torch.layer_norm, F.group_norm),
        "activation": (F.gelu, F.silu, torch.tanh, torch.sigmoid, F.hardswish),
        "matmul": (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm),
    }.items():
        for function in functions:
            kinds[function] = kind
    return kinds


class _OpRecorder(TorchFunctionMode):
    """Records the ops between weight layers of one forward pass (see ``OpInfo``).

    Calls made inside a weight layer's own forward (its conv, linear, bias add) are skipped:
    the layer's cost already covers them.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        self.kinds = _op_kinds()
        self.ops: list[OpInfo] = []
        self.last: str | None = None
        self.inside = 0
        self.handles = []
        for name, module in layers.items():
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave(name)))

    def _enter(self, module, inputs) -> None:
        self.inside += 1

    def _leave(self, name: str):
        def hook(module, inputs, output) -> None:
            self.inside -= 1
            self.last = name
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        kind = self.kinds.get(func)
        if kind is None or self.inside or not isinstance(result, torch.Tensor):
            return result
        if not result.is_floating_point():
            return result
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a
                    if isinstance(t, torch.Tensor)]
        if kind in ("add", "mul") and (len(tensors) < 2
                                       or min(t.numel() for t in tensors) < result.numel()):
            return result
        if kind == "transpose" and result.numel() <= 1:
            return result
        elements = sum(t.numel() for t in tensors) + result.numel()
        macs = 0
        if kind == "matmul" and len(tensors) == 2:
            macs = result.numel() * tensors[0].shape[-1]
        self.ops.append(OpInfo(kind, int(elements), self.last, int(macs)))
        return result


def measure_ops(model: nn.Module, layers: dict[str, nn.Module],
                input_shape: tuple[int, ...]) -> tuple[OpInfo, ...]:
    """The ops between weight layers of one batch-1 forward pass, in forward order."""
    recorder = _OpRecorder(layers)
    x = example_input(model, input_shape)
    try:
        with eval_mode(model), torch.no_grad(), recorder:
            model(x)
    finally:
        recorder.remove()
    return tuple(recorder.ops)


def count_other_params(model: nn.Module, layers: dict[str, nn.Module]) -> int:
    """Parameters outside the discovered layers (batch norm, embeddings, ...), shared ones once."""
    owned = {id(p) for module in layers.values() for p in module.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in owned and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def global_magnitude_allocation(
    weights: dict[str, torch.Tensor], targets: Sequence[float], digits: int | None = 4
) -> dict[float, dict[str, float]]:
    """Per-layer sparsity that one global |w| threshold gives, for each global target.

    ``digits=None`` keeps the exact fractions (pruned / weights), so a candidate built from them
    prunes exactly the weights ``torch.nn.utils.prune.global_unstructured`` would.

    Exactly ``round(t * total)`` weights are pruned: those strictly below the k-th smallest
    magnitude, plus as many ties at it as needed, shared in proportion to each layer's ties
    (ties are common when a model is already partly pruned and the threshold is zero).
    """
    for t in targets:
        if not 0.0 <= float(t) < 1.0:
            raise ValueError(f"global magnitude target {t!r} must be in [0, 1)")
    if not weights:
        return {}
    names = list(weights)
    mags = [weights[n].detach().abs().flatten().float().cpu() for n in names]
    counts = [m.numel() for m in mags]
    everything = torch.cat(mags)
    out: dict[float, dict[str, float]] = {}
    for t in targets:
        k = int(round(float(t) * everything.numel()))
        if k == 0:
            out[float(t)] = {n: 0.0 for n in names}
            continue
        threshold = torch.kthvalue(everything, k).values
        below = [int((m < threshold).sum()) for m in mags]
        ties = [int((m == threshold).sum()) for m in mags]
        pruned = _share_ties(below, ties, k - sum(below))
        out[float(t)] = {n: p / c if digits is None else round(p / c, digits)
                         for n, p, c in zip(names, pruned, counts)}
    return out


def _share_ties(below: list[int], ties: list[int], need: int) -> list[int]:
    """Add ``need`` tied weights to the counts, in proportion to ties (largest remainder)."""
    total_ties = sum(ties)
    if need <= 0 or total_ties == 0:
        return below
    exact = [need * t / total_ties for t in ties]
    extra = [int(e) for e in exact]
    order = sorted(range(len(ties)), key=lambda i: (exact[i] - extra[i]), reverse=True)
    for i in order[: need - sum(extra)]:
        extra[i] += 1
    return [b + e for b, e in zip(below, extra)]


def discover_layers(
    model: nn.Module,
    input_shape: tuple[int, ...],
    global_targets: Sequence[float] = DEFAULT_TARGETS,
    searchable: Collection[str] | None = None,
) -> LayerTable:
    """Build the layer table of ``model`` for per-sample inputs of ``input_shape``."""
    return discover(model, input_shape, global_targets, searchable)[0]


def _allocation(layers: dict[str, nn.Module], searchable: Collection[str] | None,
                targets: Sequence[float]) -> dict[float, dict[str, float]]:
    """Global magnitude allocation over the searchable layers (all when None)."""
    if searchable is not None:
        unknown = sorted(set(searchable) - set(layers))
        if unknown:
            raise ValueError(
                f"searchable names {unknown} are not discovered layers ({', '.join(layers)})"
            )
    allocated = [n for n in layers if searchable is None or n in searchable]
    return global_magnitude_allocation({n: layers[n].weight for n in allocated}, targets)


def with_searchable(table: LayerTable, model: nn.Module, searchable: Collection[str],
                    global_targets: Sequence[float] = DEFAULT_TARGETS) -> LayerTable:
    """``table`` with its global magnitude allocation over ``searchable`` only: what
    ``discover(..., searchable=)`` gives, without tracing the model again."""
    return dataclasses.replace(
        table, global_magnitude=_allocation(find_layers(model), searchable, global_targets))


def discover(
    model: nn.Module,
    input_shape: tuple[int, ...],
    global_targets: Sequence[float] = DEFAULT_TARGETS,
    searchable: Collection[str] | None = None,
    channels: bool = True,
) -> tuple[LayerTable, ChannelGraph]:
    """The layer table of ``model`` and its channel graph (the indices masks and export need).

    ``searchable`` limits the global magnitude allocation to those layer names (the others are
    kept dense, so their weights must not pull the threshold); all layers stay in the table.
    ``channels=False`` skips tracing channel groups (minutes on a large transformer's graph):
    for searches that never remove channels (one-shot levels), the graph has no groups.
    """
    input_shape = tuple(int(d) for d in input_shape)
    layers = find_layers(model)
    stats = measure(model, layers, input_shape)
    infos = tuple(
        LayerInfo(
            name=name,
            kind=layer_kind(module),
            weight_shape=tuple(int(d) for d in module.weight.shape),
            has_bias=getattr(module, "bias", None) is not None,
            macs=stats[name]["macs"],
            input_elements=stats[name]["input_elements"],
            output_elements=stats[name]["output_elements"],
            groups=int(getattr(module, "groups", 1)),
            bias_length=int(module.bias.numel()) if _is_hf_conv1d(module)
            and getattr(module, "bias", None) is not None else None,
        )
        for name, module in layers.items()
    )
    graph = (trace_channel_groups(model, layers, example_input(model, input_shape)) if channels
             else ChannelGraph(groups=(), error="not traced: this search removes no channels"))
    table = LayerTable(
        layers=infos,
        other_params=count_other_params(model, layers),
        input_shape=input_shape,
        global_magnitude=_allocation(layers, searchable, global_targets),
        channel_groups=graph.groups,
        graph_error=graph.error,
        ops=measure_ops(model, layers, input_shape),
    )
    return table, graph


def unused_layers(table: LayerTable) -> list[str]:
    """Layers the forward pass never called: worth a warning, e.g. an unused head."""
    return [layer.name for layer in table.layers if layer.input_elements == 0]
