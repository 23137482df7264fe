"""Real model variants to time: narrower, int8, mixed-precision and zeroed-weight versions.

A variant pairs an ONNX file with the ``LayerTable`` + ``Candidate`` the cost model reads, so a
fitted model can be scored against the measured latency of exactly that variant. The mix is
drawn from a seed so that fitting and held-out validation can be reproduced.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from autosparse.cost.calibration.architectures import ARCHITECTURES, Architecture
from autosparse.cost.calibration.export import (
    export_onnx,
    quantize_layers,
    quantized_layers,
    zero_smallest,
)
from autosparse.space.candidate import (
    DENSE,
    FLOAT_BITS,
    UNSTRUCTURED,
    Candidate,
    LayerChoice,
)
from autosparse.space.discovery import discover_layers
from autosparse.space.layers import LayerTable

INT8 = 8
KEEP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# every prunable layer at most this wide: the fine steps at which a channel block shows (a
# kernel that computes 16 channels at once runs 4, 8, 12 and 16 kept alike)
CHANNEL_STEPS = (4, 8, 12, 16, 24, 32, 48)
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CONTROL_SPARSITY = 0.9
PRECISIONS = ("fp32", "int8", "mixed")
# how often a free draw prunes channels / adds zeroed weights; precision is stratified instead
P_PRUNED = 0.7
P_SPARSE = 0.3


@dataclass(frozen=True)
class VariantSpec:
    """What a variant is, before anything is built: cheap to draw, compare and name."""

    name: str
    architecture: str
    widths: Mapping[str, int]
    int8_layers: frozenset[str] = frozenset()
    sparsity: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Variant:
    """A built variant: the ONNX file to time and the table/candidate the cost model sees.

    ``table`` describes the physically narrow model (channel pruning is already in its shapes,
    so pruned layers are "dense" in ``candidate``); ``candidate`` gives bits 8 for int8 layers,
    32 for fp32, and "unstructured" with its sparsity where weights were zeroed.
    """

    name: str
    architecture: str
    widths: Mapping[str, int]
    table: LayerTable
    candidate: Candidate
    onnx_path: Path

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.table.input_shape


def _pruned_widths(arch: Architecture, rng: random.Random) -> dict[str, int]:
    """Per-layer keep fractions, at least one channel, never all layers kept whole."""
    while True:
        widths = {
            name: max(1, round(base * rng.choice(KEEP_FRACTIONS)))
            for name, base in arch.base_widths.items()
        }
        if widths != dict(arch.base_widths):
            return widths


def _mixed_layers(layers: list[str], rng: random.Random) -> frozenset[str]:
    """A random non-empty, proper subset of the layers."""
    count = rng.randint(1, max(1, len(layers) - 1))
    return frozenset(rng.sample(layers, count))


def _sparse_layers(layers: list[str], rng: random.Random) -> dict[str, float]:
    """Each layer zeroed with probability 1/2 (at least one), at a drawn sparsity."""
    chosen = [name for name in layers if rng.random() < 0.5] or [rng.choice(layers)]
    return {name: rng.choice(SPARSITIES) for name in chosen}


def _spec_name(arch: str, index: int, pruned: bool, int8: frozenset[str], layers: list[str],
               sparse: bool) -> str:
    precision = "fp32" if not int8 else "int8" if len(int8) == len(layers) else (
        f"mixed{len(int8)}of{len(layers)}"
    )
    parts = [arch, f"{index:02d}", "pruned" if pruned else "base", precision]
    if sparse:
        parts.append("sparse")
    return "-".join(parts)


def _fine_anchors(arch: Architecture, everything: frozenset[str]) -> list[tuple]:
    """Every prunable layer capped at each of ``CHANNEL_STEPS`` (distinct widths only), fp32
    and int8 alternating, starting with int8 on every other architecture, so that over the
    architectures each step is timed at both precisions."""
    base = dict(arch.base_widths)
    out, seen = [], set()
    flip = sorted(ARCHITECTURES).index(arch.name) % 2 if arch.name in ARCHITECTURES else 0
    for step in CHANNEL_STEPS:
        widths = {name: min(width, step) for name, width in base.items()}
        key = tuple(sorted(widths.items()))
        if widths == base or key in seen:
            continue
        seen.add(key)
        out.append((widths, everything if (len(out) + flip) % 2 else frozenset(), {}))
    return out


def draw_specs(arch: Architecture, count: int, seed: int) -> list[VariantSpec]:
    """``count`` distinct specs for one architecture, the same for the same seed.

    The first four are fixed anchors: dense fp32 base, full int8 base, and the unstructured
    negative control (base widths, 90 % zeros in every layer, dense kernels) in fp32 and int8.
    Then, where the architecture asks for them and ``count`` leaves room for random draws
    too, the fine channel-step anchors (``_fine_anchors``).
    The rest draw widths and zeroed layers independently; precision (fp32 / int8 / mixed) is
    dealt from shuffled blocks of the three, so every kind gets its share even in short lists.
    """
    rng = random.Random(f"{seed}:{arch.name}")
    layers = arch.layers
    base = dict(arch.base_widths)
    everything = frozenset(layers)
    control = {name: CONTROL_SPARSITY for name in layers}
    anchors = [(base, frozenset(), {}), (base, everything, {}), (base, frozenset(), control),
               (base, everything, control)]
    fine = _fine_anchors(arch, everything) if arch.fine_steps else []
    if count >= 2 * (len(anchors) + len(fine)):
        anchors += fine
    specs: list[VariantSpec] = []
    seen: set[tuple] = set()
    attempts = 0
    precisions: list[str] = []
    while len(specs) < count:
        attempts += 1
        if attempts > 100 * count + 100:
            raise ValueError(f"{arch.name}: cannot draw {count} distinct variants")
        if len(specs) < len(anchors):
            widths, int8, sparsity = anchors[len(specs)]
        else:
            widths = _pruned_widths(arch, rng) if rng.random() < P_PRUNED else base
            if not precisions:
                precisions = rng.sample(PRECISIONS, len(PRECISIONS))
            precision = precisions.pop()
            if precision == "fp32":
                int8 = frozenset()
            elif precision == "int8":
                int8 = everything
            else:
                int8 = _mixed_layers(layers, rng)
            sparsity = _sparse_layers(layers, rng) if rng.random() < P_SPARSE else {}
        key = (tuple(sorted(widths.items())), int8, tuple(sorted(sparsity.items())))
        if key in seen:
            continue
        seen.add(key)
        name = _spec_name(arch.name, len(specs), widths != base, int8, layers, bool(sparsity))
        specs.append(VariantSpec(name, arch.name, dict(widths), int8, dict(sparsity)))
    return specs


def candidate_for(spec: VariantSpec, table: LayerTable) -> Candidate:
    """Every layer listed explicitly: bits 8 or 32, unstructured where weights were zeroed."""
    choices = {}
    for name in table.names:
        bits = INT8 if name in spec.int8_layers else FLOAT_BITS
        s = spec.sparsity.get(name, 0.0)
        choices[name] = LayerChoice.make(UNSTRUCTURED if s > 0 else DENSE, s, bits)
    return Candidate(choices)


def build_variant(spec: VariantSpec, workdir: Path, seed: int = 0) -> Variant:
    """Build the narrow model, zero weights, export, quantize the int8 layers, and check it."""
    arch = ARCHITECTURES[spec.architecture]
    model = arch.build(spec.widths, seed=seed)
    zero_smallest(model, spec.sparsity)
    table = discover_layers(model, arch.input_shape)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{spec.name}.onnx"
    if spec.int8_layers:
        fp32_path = export_onnx(model, arch.input_shape, workdir / f"{spec.name}.fp32.onnx")
        quantize_layers(fp32_path, path, spec.int8_layers, arch.input_shape, seed=seed,
                        whole_model=set(spec.int8_layers) == set(arch.layers))
        fp32_path.unlink()
        got = quantized_layers(onnx.load(str(path)))
        if got != set(spec.int8_layers):
            raise RuntimeError(
                f"{spec.name}: asked int8 for {sorted(spec.int8_layers)}, got {sorted(got)}"
            )
    else:
        export_onnx(model, arch.input_shape, path)
    return Variant(spec.name, spec.architecture, dict(spec.widths), table,
                   candidate_for(spec, table), path)


def make_variants(
    architectures: Iterable[str | Architecture], per_architecture: int, seed: int,
    workdir: str | Path,
) -> list[Variant]:
    """``per_architecture`` variants of each architecture (times its ``variant_share``, at
    least 6), exported under ``workdir``."""
    workdir = Path(workdir)
    variants = []
    for arch in architectures:
        arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch
        if arch.name not in ARCHITECTURES or ARCHITECTURES[arch.name] is not arch:
            raise ValueError(f"architecture {arch.name!r} is not registered in ARCHITECTURES")
        count = per_architecture if arch.variant_share >= 1 else max(
            6, round(per_architecture * arch.variant_share))
        for spec in draw_specs(arch, count, seed):
            variants.append(build_variant(spec, workdir, seed=seed))
    return variants
