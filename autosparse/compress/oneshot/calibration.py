"""Calibration statistics of a layer's inputs: the Hessian proxy and the per-feature norms.

For a linear layer ``y = W x`` and the layer-wise loss ``||W X - W' X||^2`` (``X``: the layer's
inputs on calibration tokens), the Hessian with respect to one row of ``W`` is ``H = 2 X^T X``
(rows of ``X`` are tokens). GPTQ and SparseGPT need ``H``; Wanda needs ``||X_j||_2`` for every
input feature ``j``, which is ``sqrt(diag(X^T X))`` - the same sum, so one pass gives both.

``H`` is kept as the running average ``2/n * sum_t x_t x_t^T`` over the ``n`` tokens seen
(GPTQ's ``add_batch``): rescale the old average by ``n_old / n_new``, add the new batch scaled by
``2 / n_new``. Averaging keeps the entries at the size of one token's outer product however many
tokens pass, so float32 accumulation does not grow large sums; the damping of the compressors
is relative to ``mean(diag(H))``, so the ``2/n`` scale changes nothing there.

Design: every layer is compressed on the DENSE model's inputs. The reference GPTQ/SparseGPT
scripts run the model block by block and feed each block the outputs of the already compressed
blocks before it; here the level database compresses each layer once per level, independently of
the levels the search later picks for the other layers, so there is no "previous compressed
model" to propagate through. One dense pass over the calibration set serves every layer and
every level (collected a subset of layers at a time when ``H`` for all of them does not fit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from autosparse.compress.oneshot.layer_weights import is_oneshot_layer, layer_weight


class LayerStats:
    """Input statistics of one ``nn.Linear`` (or transformers ``Conv1D``), accumulated batch by
    batch on the layer's device."""

    def __init__(
        self,
        in_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.tokens = 0  # n: input vectors (tokens) seen so far

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add a batch of layer inputs ``[..., in_features]`` (every leading index is a token)."""
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs end in {inputs.shape[-1]} features, the layer takes "
                             f"{self.in_features}")
        x = inputs.detach().reshape(-1, self.in_features)
        new = x.shape[0]
        if new == 0:
            return
        total = self.tokens + new
        x = x.to(device=self.hessian.device, dtype=self.hessian.dtype)
        self.hessian.mul_(self.tokens / total)
        x = x * (2.0 / total) ** 0.5
        self.hessian.addmm_(x.T, x)
        self.tokens = total

    @property
    def input_norm(self) -> torch.Tensor:
        """Wanda's ``||X_j||_2`` over all tokens seen, float32 ``[in_features]``:
        ``sqrt(n/2 * diag(H))``."""
        diag = torch.diagonal(self.hessian).float().clamp(min=0)
        return torch.sqrt(diag * (self.tokens / 2.0))

    def __repr__(self) -> str:
        return (f"LayerStats(in_features={self.in_features}, tokens={self.tokens}, "
                f"device={self.hessian.device}, dtype={self.hessian.dtype})")


def _default_forward(model: nn.Module, batch: torch.Tensor) -> Any:
    """``model(batch)`` with the batch moved to the device of the model's first parameter."""
    first = next(model.parameters(), None)
    return model(batch.to(first.device) if first is not None else batch)


def collect_layer_stats(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    stats_device: torch.device | str | None = None,
) -> dict[str, LayerStats]:
    """Run the dense ``model`` on ``batches`` and return ``{name: LayerStats}`` for the named
    ``nn.Linear`` modules (transformers' ``Conv1D`` too: its input is a Linear's input).

    Forward hooks on just those modules see their inputs; the hooks are removed however the pass
    ends. Pass a subset of names per call to bound memory (``H`` is ``in^2`` floats per layer):
    each call is one more pass over the calibration batches. ``forward(model, batch)`` runs one
    batch (token ids ``[batch, seq]`` for a language model; anything the model takes) - the
    default moves the batch to the model's device and calls ``model(batch)``. The model is run in
    eval mode under ``no_grad`` (dropout would otherwise perturb the inputs) and its mode restored.
    ``stats_device``: where the Hessians accumulate (default: each layer's weight's device).
    """
    names = list(layer_names)
    if not names:
        raise ValueError("layer_names is empty: name at least one nn.Linear module")
    if len(set(names)) != len(names):
        raise ValueError(f"layer_names has duplicates: {sorted({n for n in names if names.count(n) > 1})}")
    modules = dict(model.named_modules())
    stats: dict[str, LayerStats] = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"layer_names: the model has no module named {name!r}")
        if not is_oneshot_layer(module):
            raise ValueError(  # noqa: TRY004 - a bad name in layer_names, as above
                f"layer_names: {name!r} is a {type(module).__name__}, not nn.Linear (or "
                "transformers Conv1D)")
        stats[name] = LayerStats(layer_weight(module).shape[1],
                                 device=stats_device or module.weight.device, dtype=dtype)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
            stats[name].add_batch(inputs[0])
        return hook

    run = forward or _default_forward
    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    unused = [name for name, s in stats.items() if s.tokens == 0]
    if unused:
        raise ValueError(f"no calibration input reached {unused}: the forward never called them "
                         "(or batches was empty)")
    return stats
