"""Hardware profiles: what a target device computes, how fast, what it accelerates, what it costs.

A profile is a YAML file validated like a search config. The built-in ones live in
``autosparse/config/profiles/`` with their sources written in the file; a user's own is given by path.
The cost model (``cost.py``) reads nothing else about the device, so a profile fitted by
``autosparse calibrate`` is used exactly like a shipped one.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from autosparse.config.choices import CHANNEL, DENSE, FLOAT_BITS, is_valid_pattern
from autosparse.config.validation import ConfigError, Strict, validate
from autosparse.config.yaml_loader import read_yaml

# DepthwiseConv2d: a Conv2d with groups == channels (LayerInfo.cost_kind); its efficiency
# falls back to Conv2d's where a profile gives none
LAYER_KINDS = ("Conv1d", "Conv2d", "DepthwiseConv2d", "Linear")

# Horowitz, ISSCC 2014, 45 nm (pJ): the default MAC energy when a precision gives none.
HOROWITZ_INT8_MULT_PJ = 0.2
HOROWITZ_INT8_ADD_PJ = 0.03
HOROWITZ_FLOAT_PJ = {32: (3.7, 0.9), 16: (1.1, 0.4)}  # bits -> (multiply, add)


def horowitz_mac_pj(bits: int, kind: str) -> float:
    """Energy of one multiply-accumulate at 45 nm: multiplier grows with bits², adder with bits.

    Integers scale the int8 figures (int32 then gives 3.2 + 0.12 pJ, close to Horowitz's
    3.1 + 0.1); floats use the fp16/fp32 figures, scaled the same way for other widths.
    """
    if kind == "float":
        ref = 32 if bits >= 24 else 16
        mult, add = HOROWITZ_FLOAT_PJ[ref]
        return mult * (bits / ref) ** 2 + add * (bits / ref)
    return HOROWITZ_INT8_MULT_PJ * (bits / 8) ** 2 + HOROWITZ_INT8_ADD_PJ * (bits / 8)


class Precision(Strict):
    """One arithmetic the device executes natively (e.g. int8 dot products, fp32 FMA)."""

    bits: int = Field(ge=1, le=32)
    kind: Literal["int", "float"]
    macs_per_second: float = Field(gt=0, description="peak multiply-accumulates per second")
    activation_bits: int | None = Field(
        None, ge=1, le=32, description="activations travel at this width; default: 8 for "
        "integer precisions of 8 bits or fewer, else the precision's own bits")
    energy_pj_per_mac: float | None = Field(
        None, gt=0, description="default: Horowitz 45 nm x technology_scale")
    layer_overhead_us: float = Field(0.0, ge=0, description="fixed cost of one layer (launch, "
                                     "dispatch, packing) at this precision")
    channel_block: int = Field(1, ge=1, description="output channels are computed in blocks of "
                               "this many (SIMD width, tile): a partial block costs a full one")
    input_channel_block: int = Field(1, ge=1, description="input channels of a dense conv "
                                     "are read in blocks of this many (NCHWc layouts pad "
                                     "them): a partial block costs a full one")
    op_overhead_us: float = Field(0.0, ge=0, description="fixed cost of one op between weight "
                                  "layers (residual add, pooling, transpose, softmax) whose "
                                  "activations are at this precision")
    kind_efficiency: dict[str, float] = Field(
        default_factory=dict, description="share of this precision's peak each layer kind "
        "reaches, where it differs from the profile-wide kind_efficiency (an int8 Conv1d "
        "kernel is not as far from the int8 Conv2d one as the fp32 kernels are)")

    @field_validator("kind_efficiency")
    @classmethod
    def _check_kind_efficiency(cls, value: dict[str, float]) -> dict[str, float]:
        return _checked_efficiencies(value)

    @property
    def act_bits(self) -> int:
        if self.activation_bits is not None:
            return self.activation_bits
        return 8 if self.kind == "int" and self.bits <= 8 else self.bits

    @property
    def label(self) -> str:
        return f"{'fp' if self.kind == 'float' else 'int'}{self.bits}"


def _checked_efficiencies(value: dict[str, float]) -> dict[str, float]:
    bad = [k for k in value if k not in LAYER_KINDS]
    if bad:
        raise ValueError(f"kind_efficiency keys {bad} not allowed; allowed: "
                         f"{', '.join(LAYER_KINDS)}")
    wrong = {k: v for k, v in value.items() if not 0 < v <= 1}
    if wrong:
        raise ValueError(f"kind_efficiency values {wrong} must be in (0, 1]")
    return value


class SparseAcceleration(Strict):
    """A sparsity pattern the device skips work for, and how well.

    The layer's compute time is scaled by ``max(density / efficiency, 1 / max_speedup)``
    (never above 1: a runtime falls back to the dense kernel when sparse would be slower),
    where density = 1 - sparsity. Below ``min_sparsity`` the pattern runs on the dense kernel.
    """

    pattern: str
    min_sparsity: float = Field(0.0, ge=0, lt=1)
    efficiency: float = Field(1.0, gt=0, le=1, description="share of the ideal 1/density speedup")
    max_speedup: float = Field(float("inf"), ge=1)
    precisions: list[int] | None = Field(None, description="bits it applies to; default: all")
    kinds: list[str] | None = Field(None, description="layer kinds it applies to; default: all")
    max_kernel_elements: int | None = Field(
        None, ge=1, description="largest conv kernel it applies to (1 = pointwise 1x1 only)")

    @field_validator("kinds")
    @classmethod
    def _check_kinds(cls, value: list[str] | None) -> list[str] | None:
        bad = [k for k in value or [] if k not in LAYER_KINDS]
        if bad:
            raise ValueError(f"kinds {bad} not allowed; allowed: {', '.join(LAYER_KINDS)}")
        return value

    def covers(self, kind: str, weight_shape: tuple[int, ...]) -> bool:
        """Whether a layer of this kind and weight shape gets the sparse kernel at all."""
        if self.kinds is not None and kind not in self.kinds:
            return False
        kernel = math.prod(weight_shape[2:]) if len(weight_shape) > 2 else 1
        return self.max_kernel_elements is None or kernel <= self.max_kernel_elements

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if value in (DENSE, CHANNEL) or not is_valid_pattern(value):
            raise ValueError(f"pattern {value!r} not allowed; allowed: unstructured or N:M such "
                             "as '2:4' (channel pruning always shrinks the dense layer)")
        return value

    def compute_fraction(self, sparsity: float) -> float:
        density = 1.0 - sparsity
        return min(1.0, max(density / self.efficiency, 1.0 / self.max_speedup))


class MemoryLevel(Strict):
    """One level of the memory hierarchy, listed from the closest (smallest) outwards."""

    name: str
    capacity_bytes: float | None = Field(None, gt=0, description="none = unbounded (DRAM, flash)")
    bandwidth_bytes_per_second: float = Field(gt=0)
    energy_pj_per_byte: float = Field(ge=0)


class HardwareProfile(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    sources: list[str] = Field(min_length=1, description="where every figure comes from")
    measured: bool = Field(False, description="fitted by `autosparse calibrate`")
    precisions: list[Precision] = Field(min_length=1)
    kind_efficiency: dict[str, float] = Field(
        default_factory=dict, description="share of peak each layer kind reaches; default 1")
    sparsity: list[SparseAcceleration] = Field(default_factory=list)
    memory: list[MemoryLevel] = Field(min_length=1)
    weights_level: str | None = Field(
        None, description="level the weights always come from (e.g. flash on an MCU); default: "
        "the closest level that holds all of the model's weights")
    model_overhead_us: float = Field(0.0, ge=0, description="fixed cost of one inference")
    conversion_overhead_us: float = Field(
        0.0, ge=0, description="cost of switching activation precision between layers (a "
        "quantize or dequantize step), also at the model's float input and output")
    conversion_ns_per_element: float = Field(
        0.0, ge=0, description="per activation element converted at a precision switch")
    technology_scale: float = Field(1.0, gt=0, description="multiplies the 45 nm MAC energy")
    static_power_watts: float = Field(0.0, ge=0, description="charged over the latency")
    fitted: dict[str, Any] = Field(default_factory=dict, description="calibration details")

    @field_validator("kind_efficiency")
    @classmethod
    def _check_kinds(cls, value: dict[str, float]) -> dict[str, float]:
        return _checked_efficiencies(value)

    @model_validator(mode="after")
    def _check_consistency(self) -> "HardwareProfile":
        keys = [(p.kind, p.bits) for p in self.precisions]
        if len(set(keys)) != len(keys):
            raise ValueError(f"precisions list the same kind and bits twice: {keys}")
        widths = {p.bits for p in self.precisions}
        for entry in self.sparsity:
            unknown = sorted(set(entry.precisions or ()) - widths)
            if unknown:
                raise ValueError(f"sparsity pattern {entry.pattern!r} names precisions "
                                 f"{unknown} the profile does not list; listed: {sorted(widths)}")
        patterns = [entry.pattern for entry in self.sparsity]
        if len(set(patterns)) != len(patterns):
            raise ValueError(f"sparsity lists a pattern twice: {patterns}")
        names = [level.name for level in self.memory]
        if len(set(names)) != len(names):
            raise ValueError(f"memory level names must be unique: {names}")
        if self.memory[-1].capacity_bytes is not None:
            raise ValueError("the last memory level must be unbounded (capacity_bytes: null)")
        if self.weights_level is not None and self.weights_level not in names:
            raise ValueError(f"weights_level {self.weights_level!r} is not a memory level; "
                             f"levels: {', '.join(names)}")
        return self

    # --- what the cost model asks -------------------------------------------------------------

    def precision_for(self, bits: int) -> tuple[Precision, bool]:
        """The arithmetic a layer with ``bits``-bit weights runs on, and whether it is native.

        Float weights (32) take the widest float the device has: narrowing floats would change
        accuracy the search did not measure. Integer weights take the narrowest precision that
        holds them (int4 on an int8 machine runs at int8: it saves memory, not time). Without
        one, the widest precision is used and the result is marked not native.
        """
        if bits >= FLOAT_BITS:
            floats = [p for p in self.precisions if p.kind == "float"]
            if floats:
                return max(floats, key=lambda p: p.bits), True
            return max(self.precisions, key=lambda p: p.bits), False
        fitting = [p for p in self.precisions if p.bits >= bits]
        if fitting:
            return min(fitting, key=lambda p: (p.bits, p.kind != "int")), True
        return max(self.precisions, key=lambda p: p.bits), False

    def acceleration(self, pattern: str) -> SparseAcceleration | None:
        for entry in self.sparsity:
            if entry.pattern == pattern:
                return entry
        return None

    def mac_energy_pj(self, precision: Precision) -> float:
        if precision.energy_pj_per_mac is not None:
            return precision.energy_pj_per_mac
        return horowitz_mac_pj(precision.bits, precision.kind) * self.technology_scale

    def efficiency(self, kind: str, precision: Precision | None = None) -> float:
        """Share of peak a layer kind reaches: the precision's own figure where it gives one,
        else the profile-wide one; a depthwise conv without a figure counts as a Conv2d."""
        for table in ((precision.kind_efficiency if precision else {}), self.kind_efficiency):
            if kind in table:
                return table[kind]
        if kind == "DepthwiseConv2d":
            return self.efficiency("Conv2d", precision)  # profiles from before depthwise
        return 1.0

    def level(self, name: str) -> MemoryLevel:
        return next(level for level in self.memory if level.name == name)

    def level_holding(self, nbytes: float) -> MemoryLevel:
        """The closest level whose capacity holds ``nbytes`` (the last one holds anything)."""
        for level in self.memory:
            if level.capacity_bytes is None or nbytes <= level.capacity_bytes:
                return level
        return self.memory[-1]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=False)
        return yaml.safe_dump(data, sort_keys=False, width=100)


PROFILE_PACKAGE = "autosparse.config.profiles"


def builtin_profiles() -> list[str]:
    """Names of the shipped profiles (file stems under autosparse/config/profiles/)."""
    folder = resources.files(PROFILE_PACKAGE)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


def parse_profile(data: Any, source: str = "<dict>") -> HardwareProfile:
    return validate(HardwareProfile, data, "hardware profile", source)


@lru_cache(maxsize=64)
def _load_file(path: str, mtime: float) -> HardwareProfile:
    # the loader refuses alias bombs and duplicate keys, as for a search config
    return parse_profile(read_yaml(path, "hardware profile"), path)


def load_profile(name_or_path: str | os.PathLike) -> HardwareProfile:
    """A built-in profile by name, or a user's YAML file by path."""
    text = str(name_or_path)
    if text in builtin_profiles():
        path = Path(str(resources.files(PROFILE_PACKAGE) / f"{text}.yaml"))
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"hardware {text!r} is neither a built-in profile "
                              f"({', '.join(builtin_profiles())}) nor an existing YAML file")
    return _load_file(str(path.resolve()), path.stat().st_mtime)
