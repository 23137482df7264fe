"""``autosparse calibrate``: time real variants here, fit a ``measured`` profile, prove it.

    variants  = narrower / int8 / mixed / zeroed-weight versions of several architectures (ONNX)
    measure   = onnxruntime, one thread, warm-up, interleaved rounds, medians
    fit       = the cost model's free constants, on a seeded share of each architecture
    validate  = rank correlation and relative error on the variants the fit never saw
    write     = measured profile YAML, per-variant CSV, report (Markdown), plot (PNG), MLflow run
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime
import pandas as pd

from autosparse.config.hardware import HardwareProfile, load_profile
from autosparse.config.validation import ConfigError
from autosparse.cost.calibration.architectures import DEFAULT_CALIBRATION
from autosparse.cost.calibration.figure import calibration_figure_png
from autosparse.cost.calibration.fit import (
    FREE_CONSTANTS,
    FitResult,
    Sample,
    fit_with_blocks,
    predict,
    prediction_stats,
    split_samples,
)
from autosparse.cost.calibration.machine import (
    CacheReport,
    Sweep,
    effective_caches,
    this_machine,
)
from autosparse.cost.calibration.timing import time_variants
from autosparse.cost.calibration.variants import make_variants

Printer = Callable[[str], None]
DEFAULT_ARCHITECTURES = DEFAULT_CALIBRATION  # calibration/architectures.py says why each
CONTROL_MARK = "sparse"  # variant names of zeroed-weight variants contain it


@dataclass(frozen=True)
class CalibrationSettings:
    base: str = "x86-server-vnni"
    architectures: tuple[str, ...] = DEFAULT_ARCHITECTURES
    per_architecture: int = 30
    fit_share: float = 0.5
    rounds: int = 61
    calls: int = 21
    seed: int = 0
    name: str | None = None
    cache_sweep: Sweep = Sweep()  # used only where sysfs's cache sizes are rejected (a VM)


@dataclass(frozen=True)
class CalibrationOutcome:
    profile: HardwareProfile
    profile_path: Path
    frame: pd.DataFrame  # one row per variant: split, measured/predicted ms, error
    held_out: dict[str, float]
    fit: dict[str, float]
    controls: dict[str, float]
    seconds: dict[str, float]


def default_profile_name(now: dt.datetime | None = None) -> str:
    """measured-<host>-<UTC timestamp>: each calibration is a new file, never a silent
    replacement (two calibrations on one machine differed 20-25 % in fitted constants)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "local"
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"measured-{host}-{stamp}"


def profile_destination(out_dir: Path, name: str | None,
                        printer: Printer = print) -> tuple[str, Path]:
    """The profile's name and file: a fresh default name (suffixed if that second's file
    exists), or the user's explicit name, saying so when that overwrites an earlier file."""
    if name is not None:
        path = out_dir / f"{name}.yaml"
        if path.exists():
            printer(f"overwriting {path} (an earlier calibration named {name!r}; omit --name "
                    "for a new file each time)")
        return name, path
    base = default_profile_name()
    chosen, count = base, 1
    while (out_dir / f"{chosen}.yaml").exists():
        count += 1
        chosen = f"{base}-{count}"
    return chosen, out_dir / f"{chosen}.yaml"


def local_cache_sizes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> list[int]:
    """Data/unified cache capacities of this CPU, closest first (empty where sysfs is absent)."""
    sizes = {}
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not text:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1], 1)
        sizes[level] = int(text.rstrip("KMG")) * scale
    return [sizes[level] for level in sorted(sizes)]


def with_local_caches(base: HardwareProfile, sizes: Sequence[int]) -> HardwareProfile:
    """The base profile with this CPU's cache capacities on its bounded levels, closest first:
    where data lives (and so its bandwidth) then follows the machine being calibrated."""
    bounded = [level for level in base.memory if level.capacity_bytes is not None]
    if not sizes or len(sizes) != len(bounded):
        return base
    memory = [level.model_copy(update={"capacity_bytes": float(size)})
              for level, size in zip(bounded, sizes)] + base.memory[len(bounded):]
    return base.model_copy(update={"memory": memory})


def negative_controls(frame: pd.DataFrame) -> dict[str, float]:
    """Measured latency of each zeroed-weight variant over its twin without zeros, when both
    exist (same architecture, widths and precisions): ~1.0 means dense kernels ignore zeros."""
    ratios = {}
    by_name = frame.set_index("variant")
    for name, row in by_name.iterrows():
        if CONTROL_MARK not in str(name):
            continue
        twin = row["twin"]
        if isinstance(twin, str) and twin in by_name.index:
            ratios[str(name)] = float(row["measured_ms"] / by_name.loc[twin, "measured_ms"])
    return ratios


def _twin_key(variant) -> tuple:
    bits = tuple(sorted((n, c.bits) for n, c in variant.candidate.items()))
    return variant.architecture, tuple(sorted(variant.widths.items())), bits


def check_settings(settings: CalibrationSettings) -> None:
    """Refuse, before minutes of timing, settings that cannot give a fit and a held-out set."""
    if not 0 < settings.fit_share < 1:
        raise ConfigError(f"--fit-share {settings.fit_share:g} must be in (0, 1): the rest of "
                          "the variants is the held-out set the report is about")
    fit_count = len(settings.architectures) * max(
        1, round(settings.fit_share * settings.per_architecture))
    if fit_count < len(FREE_CONSTANTS):
        raise ConfigError(
            f"{settings.per_architecture} variants per architecture x "
            f"{len(settings.architectures)} architecture(s) x fit share {settings.fit_share:g} "
            f"leaves {fit_count} variants to fit {len(FREE_CONSTANTS)} constants: need at least "
            f"{len(FREE_CONSTANTS)}; raise --per-architecture or --fit-share")


def run_calibration(settings: CalibrationSettings, out_dir: Path,
                    printer: Printer = print) -> CalibrationOutcome:
    check_settings(settings)
    caches = effective_caches(sweep=settings.cache_sweep)
    if caches.source == "measured":
        printer(cache_line(caches))
    base = with_local_caches(load_profile(settings.base), caches.sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, profile_path = profile_destination(out_dir, settings.name, printer)
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="autosparse-calibrate-") as workdir:
        start = time.perf_counter()
        variants = make_variants(settings.architectures, settings.per_architecture,
                                 settings.seed, workdir)
        seconds["build"] = time.perf_counter() - start
        printer(f"built {len(variants)} variants of {', '.join(settings.architectures)} "
                f"in {seconds['build']:.0f} s; timing them (1 thread, {settings.rounds} "
                f"interleaved rounds x {settings.calls} calls) ...")
        start = time.perf_counter()
        measurements = time_variants(variants, rounds=settings.rounds, calls=settings.calls,
                                     seed=settings.seed)
        seconds["measure"] = time.perf_counter() - start
    samples = [Sample(v.name, v.architecture, v.table, v.candidate, m.median_seconds)
               for v, m in zip(variants, measurements)]
    fit_set, held_set = split_samples(samples, settings.fit_share, settings.seed)
    start = time.perf_counter()
    result = fit_with_blocks(base, fit_set, name, seed=settings.seed)
    seconds["fit"] = time.perf_counter() - start

    in_fit = {s.name for s in fit_set}
    plain = {_twin_key(v): v.name for v in variants if CONTROL_MARK not in v.name}
    predicted = predict(result.profile, samples)
    frame = pd.DataFrame({
        "variant": [s.name for s in samples],
        "architecture": [s.architecture for s in samples],
        "split": ["fit" if s.name in in_fit else "held-out" for s in samples],
        "measured_ms": [s.measured_s * 1e3 for s in samples],
        "predicted_ms": predicted * 1e3,
        "spread": [m.spread for m in measurements],
        "twin": [plain.get(_twin_key(v)) for v in variants],
        "macs": [sum(layer.macs for layer in v.table.layers) for v in variants],
        "candidate": [v.candidate.to_json() for v in variants],
    })
    frame["error_percent"] = (frame["predicted_ms"] / frame["measured_ms"] - 1) * 100
    held = frame[frame["split"] == "held-out"]
    fitted = frame[frame["split"] == "fit"]
    held_stats = prediction_stats(held["predicted_ms"].to_numpy(), held["measured_ms"].to_numpy())
    fit_stats = prediction_stats(fitted["predicted_ms"].to_numpy(),
                                 fitted["measured_ms"].to_numpy())
    controls = negative_controls(frame)
    profile = _with_provenance(result, settings, held_stats, controls, len(samples),
                               [m.spread for m in measurements], caches)
    _write_outputs(out_dir, profile, profile_path, frame, held_stats, fit_stats, controls,
                   settings, seconds)
    return CalibrationOutcome(profile, profile_path, frame, held_stats, fit_stats, controls,
                              seconds)


def cache_line(caches: CacheReport) -> str:
    """What calibrate says when it distrusts sysfs's cache sizes."""
    rejected = ", ".join(f"L{level} {size / 1024 ** 2:.0f} MiB"
                         for level, size in caches.rejected.items())
    return (f"cache: sysfs reports {rejected} for this core, above the "
            f"{caches.limit / 1024 ** 2:.0f} MiB one core can plausibly have (a VM shows its "
            f"host's whole cache); using the measured last-level capacity "
            f"{caches.sizes[-1] / 1024 ** 2:.1f} MiB (copy-bandwidth knee)")


def _with_provenance(result: FitResult, settings: CalibrationSettings,
                     held: dict[str, float], controls: dict[str, float],
                     count: int, spreads: Sequence[float] = (),
                     caches: CacheReport | None = None) -> HardwareProfile:
    ratios = list(controls.values())
    machine = this_machine()
    fitted = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": machine["cpu"],
        "onnxruntime": onnxruntime.__version__,
        "machine": machine,
        "caches": caches.to_dict() if caches is not None else None,
        "timing": {"rounds": settings.rounds, "calls": settings.calls,
                   # IQR / median of each variant's round medians, over all variants
                   "spread_median": round(float(np.median(spreads)), 4) if spreads else None,
                   "spread_max": round(float(np.max(spreads)), 4) if spreads else None},
        "base_profile": settings.base,
        "architectures": list(settings.architectures),
        "variants": count,
        "constants": {k: float(f"{v:.6g}") for k, v in result.constants.items()},
        # train log RMSE per channel block tried (fit.fit_with_blocks): why each block won
        "block_scan": {p: {int(b): round(r, 4) for b, r in scan.items()}
                       for p, scan in result.block_scan.items()},
        "held_out": {k: round(v, 4) for k, v in held.items()},
        "unstructured_over_dense_median": round(float(np.median(ratios)), 4) if ratios else None,
    }
    description = (
        f"Fitted by `autosparse calibrate` on {fitted['cpu']} with onnxruntime "
        f"{fitted['onnxruntime']}, one thread, batch 1. Latency constants are measured; energy "
        f"figures are the base profile's ({settings.base}): no power meter was read; cache "
        f"capacities are this core's ({caches.source if caches else 'none'}: sysfs where "
        "plausible, else measured). Unstructured sparsity is not accelerated: zeroed-weight "
        "variants ran "
        f"{fitted['unstructured_over_dense_median']}x the latency of their dense twins (median).")
    return result.profile.model_copy(update={
        "description": description,
        "sources": ["measured on this machine by `autosparse calibrate` (see fitted)",
                    *[f"base profile {settings.base}: {s}" for s in result.profile.sources]],
        "fitted": fitted,
    })


def _stats_table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| set | variants | Spearman | Kendall | MAPE | within ±10 % | within ±20 % |",
             "|---|---|---|---|---|---|---|"]
    for label, s in rows.items():
        lines.append(f"| {label} | {s['count']:.0f} | {s['spearman']:.3f} | {s['kendall']:.3f} | "
                     f"{s['mape_percent']:.1f} % | {s['within_10_percent']:.0f} % | "
                     f"{s['within_20_percent']:.0f} % |")
    return "\n".join(lines)


def _flags_text(fitted: dict) -> str:
    return ", ".join(fitted["machine"]["flags"]) or "no kernel flags"


def _caches_text(caches: dict | None) -> str:
    if not caches or not caches["sizes_bytes"]:
        return "from the base profile"
    sizes = " / ".join(f"{s / 1024:.0f} KiB" for s in caches["sizes_bytes"])
    return f"{sizes} ({caches['source']})"


def _report_markdown(profile: HardwareProfile, frame: pd.DataFrame, held: dict, fit: dict,
                     controls: dict, settings: CalibrationSettings, seconds: dict) -> str:
    per_arch = {
        f"held-out, {arch}": prediction_stats(g["predicted_ms"].to_numpy(),
                                             g["measured_ms"].to_numpy())
        for arch, g in frame[frame["split"] == "held-out"].groupby("architecture")
        if len(g) > 2
    }
    ratios = list(controls.values())
    constants = "\n".join(f"| {k} | {v:.4g} |" for k, v in profile.fitted["constants"].items())
    command = (f"autosparse calibrate --base {settings.base} --per-architecture "
               f"{settings.per_architecture} --rounds {settings.rounds} --calls {settings.calls} "
               f"--seed {settings.seed}" + (f" --name {settings.name}" if settings.name else ""))
    return f"""# Cost-model calibration: {profile.name}

Command: `{command}` (with `--out` pointing here).
Machine: {profile.fitted['cpu']} ({_flags_text(profile.fitted)}),
onnxruntime {profile.fitted['onnxruntime']}, caches {_caches_text(profile.fitted['caches'])},
one thread,
batch 1, {settings.rounds} interleaved rounds x {settings.calls} timed calls per variant,
medians. {len(frame)} variants of {', '.join(settings.architectures)}; the fit used
{int(fit['count'])} of them ({settings.fit_share:.0%} of each architecture, seeded), the rest are
held out. Build {seconds['build']:.0f} s, measure {seconds['measure']:.0f} s, fit {seconds['fit']:.0f} s.

## How well the cost model predicts latency

{_stats_table({'held-out (all)': held, **per_arch, 'fit (in-sample)': fit})}

![predicted vs measured](calibration.png)

## Negative control: unstructured sparsity on dense kernels

{len(ratios)} zeroed-weight variants (50–95 % zeros) against their twins without zeros: measured
latency ratio median {np.median(ratios) if ratios else float('nan'):.3f}
(min {min(ratios) if ratios else float('nan'):.3f}, max {max(ratios) if ratios else float('nan'):.3f}).
The runtime's dense kernels do not skip zeros, so the measured profile accelerates no sparsity
pattern, and the cost model predicts the twins alike.

## Fitted constants

| constant | value |
|---|---|
{constants}

Per-variant figures: `calibration.csv`; the profile: `{profile.name}.yaml`.
"""


def _write_outputs(out_dir: Path, profile: HardwareProfile, profile_path: Path,
                   frame: pd.DataFrame, held: dict, fit: dict, controls: dict,
                   settings: CalibrationSettings, seconds: dict) -> None:
    profile_path.write_text(profile.to_yaml())
    frame.drop(columns=["candidate"]).to_csv(out_dir / "calibration.csv", index=False,
                                             float_format="%.6g")
    (out_dir / "calibration.md").write_text(
        _report_markdown(profile, frame, held, fit, controls, settings, seconds))
    calibration_figure_png(
        frame, out_dir / "calibration.png",
        f"{profile.name}: held-out Spearman {held['spearman']:.3f}, "
        f"{held['within_10_percent']:.0f} % within ±10 % (n={held['count']:.0f})")


def summary_lines(outcome: CalibrationOutcome) -> Sequence[str]:
    held, ratios = outcome.held_out, list(outcome.controls.values())
    return [
        f"held-out variants: {held['count']:.0f} | Spearman {held['spearman']:.3f} | Kendall "
        f"{held['kendall']:.3f} | MAPE {held['mape_percent']:.1f} % | within ±10 %: "
        f"{held['within_10_percent']:.0f} %",
        f"fit (in-sample): {outcome.fit['count']:.0f} variants, MAPE "
        f"{outcome.fit['mape_percent']:.1f} %",
        "unstructured zeros vs dense twin (measured): median "
        + (f"{np.median(ratios):.3f}x over {len(ratios)} pairs" if ratios else "no pairs"),
        f"measured profile: {outcome.profile_path} (use it as `hardware: {outcome.profile_path}`)",
        _provenance_line(outcome.profile.fitted),
    ]


def _provenance_line(fitted: dict) -> str:
    timing = fitted.get("timing") or {}
    spread = ("" if timing.get("spread_median") is None else
              f"; timing spread (IQR / median over rounds) median {timing['spread_median']:.1%},"
              f" max {timing['spread_max']:.1%}")
    return (f"recorded machine: {fitted['cpu']} ({_flags_text(fitted)}); caches "
            f"{_caches_text(fitted['caches'])}{spread}")
