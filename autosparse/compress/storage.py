"""What a compressed model's layers really store: nonzero values and relative-index fillers.

The size formula (``footprint.py``) can only guess from a pattern how many values a layer keeps.
Once the weights are fine-tuned and quantized, every value the quantizer rounded to zero is as
free as a pruned one, and a relative index (Deep Compression) may beat a bitmask. These counts
are measured here, on exactly the tensor export stores (the rows and input columns the channel
groups leave, in row-major order), for both the search's size objective and the packed writer,
so the two agree to the bit.

Layer rule: torch only, never optuna or mlflow.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from autosparse.compress.footprint import MAX_RELATIVE_BITS, StoredZeros
from autosparse.space.candidate import Candidate, parse_nm
from autosparse.space.layers import LayerTable


def stored_zeros(tensor: Tensor) -> StoredZeros:
    """Nonzero count and, per relative-index width 1..8, the filler entries it needs.

    A w-bit relative index stores each nonzero's distance from the previous one (the first
    from position -1) as a code 1..2^w-1; code 0 is a filler that advances 2^w-1 positions, so a
    gap d takes (d - 1) // (2^w - 1) fillers (``compress.bitpack.relative_codes`` writes it).
    """
    flat = tensor.detach().reshape(-1) != 0
    positions = torch.nonzero(flat).flatten()
    if positions.numel() == 0:
        return StoredZeros(0, (0,) * MAX_RELATIVE_BITS)
    gaps = torch.diff(positions, prepend=torch.tensor([-1], device=positions.device))
    fillers = tuple(int(((gaps - 1) // (2 ** w - 1)).sum())
                    for w in range(1, MAX_RELATIVE_BITS + 1))
    return StoredZeros(int(positions.numel()), fillers)


def kept_part(weight: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
    """The rows and input columns channel groups keep, in order (what the shrunk layer holds)."""
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    return weight


def model_zeros(model: nn.Module, table: LayerTable, candidate: Candidate,
                rows: Mapping[str, Tensor] | None = None,
                cols: Mapping[str, Tensor] | None = None) -> dict[str, StoredZeros]:
    """``stored_zeros`` of every layer but N:M ones (their layout is fixed) of a compressed model.

    ``rows``/``cols`` are ``compress.structural_keep``'s keep masks for an unshrunk (masked)
    model; a shrunk model needs none. Effective weights are read (parametrized or baked).
    """
    modules = dict(model.named_modules())
    rows, cols = rows or {}, cols or {}
    out = {}
    with torch.no_grad():
        for layer in table.layers:
            if parse_nm(candidate.get_choice(layer.name).pattern) is not None:
                continue
            weight = modules[layer.name].weight
            out[layer.name] = stored_zeros(kept_part(weight, rows.get(layer.name),
                                                     cols.get(layer.name)))
    return out
