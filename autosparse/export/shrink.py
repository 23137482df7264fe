"""Physical shrinking of channel-pruned layers, so that the pruned channels cost nothing deployed.

``compress``'s ``channel`` pattern only zeroes whole output rows (and their biases); the layer
keeps its shape. :func:`shrink_model` removes those rows from a *baked* model and adjusts every
layer that consumes them (fewer input channels or columns), following the data flow with
``torch.fx``. Only flows that are provably channel-wise are followed; anything else (a residual
add, a concatenation, a grouped conv, the model output, an op it does not know) makes that one
layer keep its zero channels, and the report says why. The model is never made wrong.

A pruned channel is exactly 0 after its layer, but a BatchNorm or an activation after it can turn
it into a nonzero *constant* (the BN shift, ``sigmoid(0)``...). That constant is folded into the
consumer's bias, which is exact for a Linear and for an unpadded conv; a zero-padded conv would
see the constant everywhere but on its border, so that case is refused. Equivalence holds in eval
mode (BatchNorm running statistics), which is what is deployed.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from ..candidate import CHANNEL, Candidate

__all__ = ["LayerShrink", "ShrinkReport", "shrink_model"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)
_IDENTITY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_MAX_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS: set[Callable] = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid, torch.clamp, torch.clip,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
    "clip_", "contiguous", "clone", "float",
}
_IDENTITY_FUNCTIONS: set[Callable] = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}
_MAX_POOL_FUNCTIONS: set[Callable] = {F.max_pool1d, F.max_pool2d, F.max_pool3d}
_AVG_POOL_FUNCTIONS: set[Callable] = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_ADAPTIVE_POOL_FUNCTIONS: set[Callable] = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_SCALAR_ARITHMETIC: dict[Any, Callable] = {
    operator.add: operator.add, torch.add: operator.add, "add": operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, "sub": operator.sub,
    operator.mul: operator.mul, torch.mul: operator.mul, "mul": operator.mul,
    operator.truediv: operator.truediv, torch.div: operator.truediv, "div": operator.truediv,
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
_MERGES = {
    "add": "an add (residual connection)", "sub": "a subtraction with another tensor",
    "mul": "a multiplication with another tensor (gating/attention)",
    "truediv": "a division by another tensor", "div": "a division by another tensor",
    "cat": "a concatenation (cat)", "concat": "a concatenation (cat)",
    "concatenate": "a concatenation (cat)", "stack": "a stack",
}
_FLATTENS: set[Any] = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}


# --------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class LayerShrink:
    """What happened to one channel-pruned layer; ``refused`` says why it kept its zeros."""

    name: str
    channels_before: int
    channels_after: int
    consumers: tuple[str, ...] = ()
    refused: str | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "consumers": list(self.consumers),
            "refused": self.refused,
        }


@dataclass(frozen=True)
class ShrinkReport:
    """Per-layer outcome plus parameter counts; ``error`` is set when nothing could be traced."""

    layers: tuple[LayerShrink, ...]
    parameters_before: int
    parameters_after: int
    error: str | None = None

    @property
    def shrunk(self) -> tuple[str, ...]:
        return tuple(l.name for l in self.layers
                     if l.refused is None and l.channels_after < l.channels_before)

    @property
    def refused(self) -> dict[str, str]:
        return {l.name: l.refused for l in self.layers if l.refused is not None}

    def layer(self, name: str) -> LayerShrink:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"layer {name!r} is not in the report")

    def to_dict(self) -> dict:
        return {
            "layers": [l.to_dict() for l in self.layers],
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "error": self.error,
        }

    def describe(self) -> str:
        """Human lines, e.g. ``conv2: 32 -> 16 channels (conv3)``."""
        lines = [f"parameters: {self.parameters_before} -> {self.parameters_after}"]
        if self.error:
            lines.append(f"nothing shrunk: {self.error}")
        for l in self.layers:
            if l.refused is not None:
                lines.append(l.refused)
            else:
                consumers = ", ".join(l.consumers) or "no consumer"
                lines.append(f"{l.name}: {l.channels_before} -> {l.channels_after} channels "
                             f"({consumers})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# data flow of one pruned layer


class _Refuse(Exception):
    """Raised while following a layer's output: the flow is not provably channel-wise."""


@dataclass(frozen=True)
class _Flow:
    """The pruned layer's channels as seen at one graph node.

    ``axis`` is the feature axis; ``keep``/``drop`` index features along it (a channel becomes a
    block of features after a flatten); every dropped feature holds the constant ``fill``.
    """

    axis: int
    keep: Tensor
    drop: Tensor
    fill: Tensor
    flattened: bool = False

    @property
    def nonzero(self) -> bool:
        return bool(self.fill.numel()) and bool(self.fill.abs().max() > 0)

    def with_fill(self, fill: Tensor) -> "_Flow":
        return _Flow(self.axis, self.keep, self.drop, fill.detach().reshape(-1), self.flattened)


@dataclass
class _Edits:
    """Planned changes, by module name; computed from the untouched weights, applied at the end."""

    rows: dict[str, Tensor] = field(default_factory=dict)
    cols: dict[str, Tensor] = field(default_factory=dict)
    bias: dict[str, Tensor] = field(default_factory=dict)
    norms: dict[str, Tensor] = field(default_factory=dict)

    def touched(self) -> set[str]:
        return set(self.cols) | set(self.norms)

    def merge(self, other: "_Edits") -> None:
        self.rows.update(other.rows)
        self.cols.update(other.cols)
        self.norms.update(other.norms)
        for name, delta in other.bias.items():
            self.bias[name] = self.bias.get(name, 0) + delta


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise _Refuse(f"the shape of {node.name} is unknown (not a single tensor)")
    return tuple(meta.shape)


def _nodes_in(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _only_input(user: fx.Node, node: fx.Node) -> None:
    """The user must take our tensor once, as its first argument, and no other tensor."""
    nodes = _nodes_in((user.args, user.kwargs))
    if not user.args or user.args[0] is not node or nodes.count(node) != 1 or any(
        _is_tensor(n) for n in nodes if n is not node
    ):
        raise _Refuse(f"output reaches {user.name} together with another tensor")


def _is_tensor(node: fx.Node) -> bool:
    return hasattr(node.meta.get("tensor_meta"), "shape")


def _op_name(user: fx.Node) -> str:
    target = user.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _apply_elementwise(fn: Callable[[Tensor], Tensor], flow: _Flow) -> _Flow:
    if not flow.fill.numel():
        return flow
    try:
        with torch.no_grad():
            return flow.with_fill(fn(flow.fill.clone()))
    except Exception as err:  # an op whose arguments do not fit a plain vector
        raise _Refuse(f"cannot evaluate the pruned channels' constant ({err})") from None


def _fill_function(user: fx.Node) -> Callable[[Tensor], Tensor]:
    """The user's own op applied to a fill tensor (its other arguments are constants)."""
    rest, kwargs = user.args[1:], dict(user.kwargs)
    kwargs.pop("inplace", None)
    if _nodes_in((rest, kwargs)):
        raise _Refuse(f"output reaches {user.name} with computed arguments")
    if user.op == "call_method":
        return lambda t: getattr(t, user.target)(*rest, **kwargs)
    if user.target in (F.relu_, torch.relu_):
        return torch.relu
    return lambda t: user.target(t, *rest, **kwargs)


def _pool_checks(flow: _Flow, node: fx.Node, what: str, padding: Any = 0) -> None:
    if flow.axis != 1 or flow.flattened or len(_shape(node)) < 3:
        raise _Refuse(f"output reaches {what} along its feature axis")
    padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else [padding]))
    if padded and flow.nonzero:
        raise _Refuse(f"pruned channels hold a nonzero constant and {what} pads with zeros")


def _flatten_flow(node: fx.Node, user: fx.Node, flow: _Flow) -> _Flow:
    """A flatten/view to ``(N, C*S)``: channel ``c`` becomes features ``[c*S, (c+1)*S)``."""
    before, after = _shape(node), _shape(user)
    if after == before:
        return flow
    if flow.axis != 1 or flow.flattened or len(after) != 2 or after[0] != before[0]:
        raise _Refuse(f"output is reshaped by {user.name} in a way that mixes channels")
    block = after[1] // before[1]
    offsets = torch.arange(block)

    def expand(index: Tensor) -> Tensor:
        return (index[:, None] * block + offsets).reshape(-1)

    return _Flow(1, expand(flow.keep), expand(flow.drop), flow.fill.repeat_interleave(block),
                 flattened=True)


class _Tracer:
    """Follows one pruned layer's output through the graph and collects the edits it needs."""

    def __init__(self, modules: dict[str, nn.Module], calls: dict[str, int]):
        self.modules = modules
        self.calls = calls

    def follow(self, start: fx.Node, flow: _Flow) -> tuple[_Edits, list[str]]:
        edits, consumers = _Edits(), []
        stack = [(start, flow)]
        while stack:
            node, flow = stack.pop()
            for user in list(node.users):
                nxt = self._visit(node, user, flow, edits, consumers)
                if nxt is not None:
                    stack.append((user, nxt))
        return edits, consumers

    def _visit(self, node: fx.Node, user: fx.Node, flow: _Flow, edits: _Edits,
               consumers: list[str]) -> _Flow | None:
        """Record the user's edit; return the flow at its output when data passes through."""
        if user.op == "output":
            raise _Refuse("output is a model output")
        if user.op == "call_module":
            return self._module(node, user, flow, edits, consumers)
        if user.op in ("call_function", "call_method"):
            return self._function(node, user, flow)
        raise _Refuse(f"output reaches {user.name} ({user.op}), which shrinking does not know")

    # modules ---------------------------------------------------------------------------------

    def _module(self, node: fx.Node, user: fx.Node, flow: _Flow, edits: _Edits,
                consumers: list[str]) -> _Flow | None:
        name, module = str(user.target), self.modules[str(user.target)]
        kind = type(module).__name__
        _only_input(user, node)
        if isinstance(module, (nn.Linear, *_CONVS, *_BATCHNORMS)) and self.calls[name] > 1:
            raise _Refuse(f"consumer {name} is called more than once (shared weights)")
        if isinstance(module, nn.Linear):
            self._linear(name, module, node, flow, edits)
            consumers.append(name)
            return None
        if isinstance(module, _CONVS):
            self._conv(name, module, node, flow, edits)
            consumers.append(name)
            return None
        if isinstance(module, _BATCHNORMS):
            consumers.append(name)
            return self._batchnorm(name, module, flow, edits)
        if isinstance(module, _IDENTITY_MODULES):
            return flow
        if isinstance(module, _ELEMENTWISE_MODULES):
            return _apply_elementwise(module, flow)
        if isinstance(module, _MAX_POOL_MODULES):
            if module.return_indices:
                raise _Refuse(f"output reaches {name} ({kind}) returning indices")
            _pool_checks(flow, node, f"{name} ({kind})")
            return flow
        if isinstance(module, _AVG_POOL_MODULES):
            _pool_checks(flow, node, f"{name} ({kind})", module.padding)
            return flow
        if isinstance(module, _ADAPTIVE_POOL_MODULES):
            if getattr(module, "return_indices", False):
                raise _Refuse(f"output reaches {name} ({kind}) returning indices")
            _pool_checks(flow, node, f"{name} ({kind})")
            return flow
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return _flatten_flow(node, user, flow)
        raise _Refuse(f"output reaches {name} ({kind}), which shrinking cannot see through")

    def _linear(self, name: str, module: nn.Linear, node: fx.Node, flow: _Flow,
                edits: _Edits) -> None:
        if flow.axis != len(_shape(node)) - 1:
            raise _Refuse(f"output reaches {name} (Linear) on a non-feature axis")
        edits.cols[name] = flow.keep
        if flow.nonzero:
            weight = module.weight.detach()
            edits.bias[name] = weight[:, flow.drop] @ flow.fill.to(weight.dtype)

    def _conv(self, name: str, module: nn.Module, node: fx.Node, flow: _Flow,
              edits: _Edits) -> None:
        kind = type(module).__name__
        if module.groups != 1:
            raise _Refuse(f"output reaches {name}, a grouped/depthwise {kind} "
                          f"(groups={module.groups})")
        if flow.axis != 1 or flow.flattened:
            raise _Refuse(f"output reaches {name} ({kind}) on a non-channel axis")
        edits.cols[name] = flow.keep
        if not flow.nonzero:
            return
        padding = module.padding
        padded = padding == "same" if isinstance(padding, str) else any(p != 0 for p in padding)
        if padded and module.padding_mode == "zeros":
            raise _Refuse(
                f"pruned channels hold a nonzero constant (a BatchNorm shift or activation) and "
                f"consumer {name} zero-pads its input, so the constant cannot be folded into its "
                "bias"
            )
        weight = module.weight.detach()
        summed = weight[:, flow.drop].sum(dim=tuple(range(2, weight.dim())))
        edits.bias[name] = summed @ flow.fill.to(weight.dtype)

    def _batchnorm(self, name: str, module: nn.Module, flow: _Flow, edits: _Edits) -> _Flow:
        if flow.axis != 1:
            raise _Refuse(f"output reaches {name} (BatchNorm) on a non-channel axis")
        if module.running_mean is None or module.running_var is None:
            raise _Refuse(f"consumer {name} (BatchNorm) keeps no running statistics")
        edits.norms[name] = flow.keep
        with torch.no_grad():
            drop = flow.drop
            scale = (module.running_var[drop] + module.eps).rsqrt()
            fill = (flow.fill - module.running_mean[drop]) * scale
            if module.weight is not None:
                fill = fill * module.weight[drop] + module.bias[drop]
        return flow.with_fill(fill)

    # functions and methods -------------------------------------------------------------------

    def _function(self, node: fx.Node, user: fx.Node, flow: _Flow) -> _Flow | None:
        target, name = user.target, _op_name(user)
        if target == "size" or (target is getattr and user.args[1:] == ("shape",)):
            self._shape_query(node, user, flow)
            return None
        if target in _SCALAR_ARITHMETIC:
            return self._scalar_arithmetic(node, user, flow)
        if target in (torch.cat, torch.concat, torch.stack):
            raise _Refuse(f"output feeds {_MERGES.get(name, name)}")
        _only_input(user, node)
        if target in _IDENTITY_FUNCTIONS:
            return flow
        if target in _ELEMENTWISE_FUNCTIONS or target in _ELEMENTWISE_METHODS:
            return _apply_elementwise(_fill_function(user), flow)
        if target in _FLATTENS:
            return _flatten_flow(node, user, flow)
        if target in _MAX_POOL_FUNCTIONS or target in _ADAPTIVE_POOL_FUNCTIONS:
            if user.kwargs.get("return_indices"):
                raise _Refuse(f"output reaches {name} returning indices")
            _pool_checks(flow, node, name)
            return flow
        if target in _AVG_POOL_FUNCTIONS:
            padding = user.args[3] if len(user.args) > 3 else user.kwargs.get("padding", 0)
            _pool_checks(flow, node, name, padding)
            return flow
        raise _Refuse(f"output reaches {name} ({user.op}), which shrinking does not know")

    def _shape_query(self, node: fx.Node, user: fx.Node, flow: _Flow) -> None:
        """``x.size(0)`` / ``x.shape[0]`` only read the batch size: harmless unless the axis."""
        if user.target == "size":
            dims = user.args[1:] or tuple(user.kwargs.values())
            if len(dims) == 1 and isinstance(dims[0], int) and dims[0] != flow.axis:
                return
            raise _Refuse(f"the size of the output is read ({user.name})")
        for item in user.users:
            index = item.args[1] if item.target is operator.getitem else None
            if not isinstance(index, int) or index in (flow.axis, flow.axis - len(_shape(node))):
                raise _Refuse(f"the shape of the output is read ({item.name})")

    def _scalar_arithmetic(self, node: fx.Node, user: fx.Node, flow: _Flow) -> _Flow:
        name = _op_name(user).removeprefix("i")
        if len(user.args) != 2 or user.kwargs:
            raise _Refuse(f"output feeds {_MERGES.get(name, name)}")
        left, right = user.args
        other = right if left is node else left
        if isinstance(other, fx.Node) or not isinstance(other, (int, float)):
            raise _Refuse(f"output feeds {_MERGES.get(name, name)}")
        fn = _SCALAR_ARITHMETIC[user.target]
        return _apply_elementwise(
            (lambda t: fn(t, other)) if left is node else (lambda t: fn(other, t)), flow
        )


# --------------------------------------------------------------------------------------------
# applying the edits


def _zero_rows(module: nn.Module) -> Tensor:
    """Output channels whose weight row and bias are exactly zero."""
    weight = module.weight.detach()
    zero = (weight.reshape(weight.shape[0], -1) == 0).all(dim=1)
    if module.bias is not None:
        zero &= module.bias.detach() == 0
    return zero


def _parameter(value: Tensor, like: Tensor | None) -> nn.Parameter:
    requires_grad = True if like is None else like.requires_grad
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=requires_grad)


def _apply_layer(module: nn.Module, rows: Tensor | None, cols: Tensor | None,
                 delta: Tensor | None) -> None:
    """Slice a Conv/Linear's weight rows and columns, fold ``delta`` into its bias."""
    with torch.no_grad():
        weight = module.weight
        new = weight.detach()
        if cols is not None:
            new = new[:, cols]
        bias = module.bias.detach() if module.bias is not None else None
        if delta is not None:
            bias = (bias if bias is not None else torch.zeros_like(delta)) + delta
        if rows is not None:
            new = new[rows]
            bias = bias[rows] if bias is not None else None
        module.weight = _parameter(new, weight)
        if bias is not None:
            module.bias = _parameter(bias, module.bias)
    out_attr, in_attr = ("out_features", "in_features") if isinstance(module, nn.Linear) \
        else ("out_channels", "in_channels")
    setattr(module, out_attr, new.shape[0])
    setattr(module, in_attr, new.shape[1])


def _apply_norm(module: nn.Module, keep: Tensor) -> None:
    with torch.no_grad():
        for attr in ("weight", "bias"):
            value = getattr(module, attr)
            if value is not None:
                setattr(module, attr, _parameter(value[keep], value))
        module.running_mean = module.running_mean[keep].clone()
        module.running_var = module.running_var[keep].clone()
    module.num_features = int(keep.numel())


def _apply(modules: dict[str, nn.Module], edits: _Edits) -> None:
    for name in sorted(set(edits.rows) | set(edits.cols) | set(edits.bias)):
        _apply_layer(modules[name], edits.rows.get(name), edits.cols.get(name),
                     edits.bias.get(name))
    for name, keep in edits.norms.items():
        _apply_norm(modules[name], keep)


# --------------------------------------------------------------------------------------------
# entry point


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trace(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Symbolic trace plus shapes from one eval-mode pass on a random batch of two.

    ShapeProp prints a traceback before re-raising; it is silenced, the cause is reported.
    """
    graph = fx.symbolic_trace(model)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(graph).propagate(torch.randn(2, *input_shape))
    except RuntimeError as err:
        cause = err.__cause__ or err
        raise RuntimeError(f"a batch of shape {(2, *input_shape)} does not run: {cause}") from None
    return graph


def _plan_layer(name: str, modules: dict[str, nn.Module], graph: fx.GraphModule,
                calls: dict[str, int], taken: set[str]) -> tuple[LayerShrink, _Edits]:
    """The edits that shrink one layer, or a refusal (with no edits) saying why."""
    module = modules.get(name)
    if module is None:
        return LayerShrink(name, 0, 0, refused=f"{name}: not a module of the model"), _Edits()
    channels = int(module.weight.shape[0]) if hasattr(module, "weight") else 0

    def refuse(reason: str) -> tuple[LayerShrink, _Edits]:
        refused = f"{name}: {reason}: channels kept as zeros"
        return LayerShrink(name, channels, channels, refused=refused), _Edits()

    if not isinstance(module, (nn.Linear, *_CONVS)) or getattr(module, "groups", 1) != 1:
        return refuse(f"{type(module).__name__} is not a Linear or an ungrouped Conv1d/2d/3d")
    if calls.get(name, 0) != 1:
        return refuse(f"called {calls.get(name, 0)} times in the traced graph, not once")
    zero = _zero_rows(module)
    if not zero.any():
        return LayerShrink(name, channels, channels), _Edits()
    if zero.all():
        return refuse("every output channel is zero; one must stay")
    node = next(n for n in graph.graph.nodes if n.op == "call_module" and n.target == name)
    keep, drop = (~zero).nonzero().reshape(-1), zero.nonzero().reshape(-1)
    axis = 1 if isinstance(module, _CONVS) else len(_shape(node)) - 1
    flow = _Flow(axis, keep, drop, torch.zeros(drop.numel(), dtype=module.weight.dtype))
    try:
        edits, consumers = _Tracer(modules, calls).follow(node, flow)
    except _Refuse as err:
        return refuse(str(err))
    if edits.touched() & taken:
        return refuse("a consumer is already adjusted for another layer")
    edits.rows[name] = keep
    return LayerShrink(name, channels, int(keep.numel()), tuple(consumers)), edits


def shrink_model(model: nn.Module, candidate: Candidate,
                 input_shape: tuple[int, ...]) -> tuple[nn.Module, "ShrinkReport"]:
    """A physically smaller copy of a *baked* model: channel-pruned rows and their inputs removed.

    ``input_shape`` is one sample's shape (no batch dimension), used to trace shapes. Layers
    whose flow cannot be proved channel-wise keep their zero channels and are reported as
    refused; if the model cannot be traced at all, the copy is returned unchanged with
    ``report.error`` set. The copy gives the same eval-mode outputs as ``model``.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("shrink_model needs a baked model: call compress.bake(model) first")
    shrunk = copy.deepcopy(model)
    before = _count(shrunk)
    names = [n for n, c in candidate.items() if c.pattern == CHANNEL and c.sparsity > 0]
    modules = dict(shrunk.named_modules())
    was_training = shrunk.training
    shrunk.eval()
    try:
        graph = _trace(shrunk, tuple(input_shape))
    except Exception as err:  # tracing fails in many ways (control flow, unsupported ops...)
        shrunk.train(was_training)
        reason = f"symbolic tracing failed ({type(err).__name__}: {err})"
        layers = tuple(_untouched(n, modules, reason) for n in names)
        return shrunk, ShrinkReport(layers, before, before, error=reason)
    calls: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    layers, edits = [], _Edits()
    for name in names:
        layer, layer_edits = _plan_layer(name, modules, graph, calls, edits.touched())
        layers.append(layer)
        edits.merge(layer_edits)
    _apply(modules, edits)
    shrunk.train(was_training)
    return shrunk, ShrinkReport(tuple(layers), before, _count(shrunk))


def _untouched(name: str, modules: dict[str, nn.Module], reason: str) -> LayerShrink:
    weight = getattr(modules.get(name), "weight", None)
    channels = int(weight.shape[0]) if isinstance(weight, Tensor) else 0
    refused = f"{name}: {reason}: channels kept as zeros"
    return LayerShrink(name, channels, channels, refused=refused)
