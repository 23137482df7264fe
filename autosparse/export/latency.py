"""Measured beside predicted latency in an export's report: which hardware profiles predict
(the config's or ``--hardware``, plus the newest measured one), what each predicts for which
exported file and precision, and the markdown table that sets them side by side.

Split out of ``exporter``: the predictions need the cost model and the profiles, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from autosparse.config.hardware import (
    PROFILE_PACKAGE,
    HardwareProfile,
    builtin_profiles,
    load_profile,
)
from autosparse.config.validation import ConfigError
from autosparse.cost.calibration.machine import (
    fingerprint_mismatch,
    recorded_fingerprint,
    this_machine,
)
from autosparse.cost.estimate import estimate_cost
from autosparse.search.context import SearchContext
from autosparse.space.candidate import FLOAT_BITS, Candidate, LayerChoice
from autosparse.space.layers import LayerTable


@dataclass(frozen=True)
class ProfileUse:
    """A profile the report predicts with, and where it came from (named in the report)."""

    profile: HardwareProfile
    file: str  # the YAML file read (a built-in profile's file inside the package)
    role: str  # why it is used: the config's, --hardware, or the newest measured one


def _profile_file(source: str) -> str:
    if source in builtin_profiles():
        return f"built-in {source} ({resources.files(PROFILE_PACKAGE) / f'{source}.yaml'})"
    return str(Path(source))


def _profiles(context: SearchContext, runs_dir: Path,
              hardware: str | None) -> dict[str, ProfileUse]:
    """The requested (or the search's) profile, plus the newest measured profile in
    ``runs/calibration/`` fitted on this CPU (the newest of any CPU when none was; the report
    then warns), each with its file."""
    profiles: dict[str, ProfileUse] = {}
    source = hardware or context.config.cost_profile()
    chosen = load_profile(hardware) if hardware else context.profile
    if chosen is not None and source:
        role = "--hardware" if hardware else "the config's hardware"
        profiles[chosen.name] = ProfileUse(chosen, _profile_file(str(source)), role)
    measured = sorted((runs_dir / "calibration").glob("*.yaml"),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    newest: tuple[Path, HardwareProfile] | None = None
    here = False
    for index, path in enumerate(measured):
        try:
            profile = load_profile(path)
        except ConfigError:
            if index == 0:
                raise
            continue  # an older file this version cannot read: not the newest, not chosen
        newest = newest or (path, profile)
        recorded = recorded_fingerprint(profile.fitted, profile.measured)
        if recorded is not None and fingerprint_mismatch(recorded, this_machine()) is None:
            newest, here = (path, profile), True
            break
    if newest is not None:
        path, profile = newest
        role = f"the newest measured profile in {runs_dir / 'calibration'}" + (
            "" if here else " (none there was measured on this CPU)")
        profiles.setdefault(profile.name, ProfileUse(profile, str(path), role))
    return profiles


def at_float(candidate: Candidate, table: LayerTable) -> Candidate:
    """The candidate's structure (patterns, sparsities) with every layer at 32-bit float: what
    ``model.onnx`` computes."""
    choices = {}
    for name in table.names:
        c = candidate.get_choice(name)
        choices[name] = LayerChoice.make(c.pattern, c.sparsity, FLOAT_BITS, c.criterion)
    return Candidate(choices)


def precision_label(candidate: Candidate, table: LayerTable) -> str:
    """The searched layers' precisions, e.g. ``int8 x5`` or ``fp32 x1, int4 x2, int8 x2``."""
    counts: dict[int, int] = {}
    for name in table.names:
        bits = candidate.get_choice(name).bits
        counts[bits] = counts.get(bits, 0) + 1
    return ", ".join(f"{'fp32' if b == FLOAT_BITS else f'int{b}'} x{n}"
                     for b, n in sorted(counts.items(), reverse=True))


def predicted_latencies(table: LayerTable, candidate: Candidate,
                        profiles: dict[str, ProfileUse], int8_file: bool,
                        machine: dict | None = None) -> dict[str, dict]:
    """Per profile: the dense fp32 model, the candidate as scored (its own bits) and its
    structure at fp32, each labelled with the exported file it predicts, plus the profile's file
    and, when it was measured on another CPU, why its figures may not hold here."""
    here = machine if machine is not None else this_machine()
    scored_label = precision_label(candidate, table)
    all_float = all(candidate.get_choice(n).bits == FLOAT_BITS for n in table.names)
    scored_file = "model.int8.onnx" if int8_file else ("model.onnx" if all_float else None)
    fp32 = at_float(candidate, table)
    predicted = {}
    for name, use in profiles.items():
        cost = estimate_cost(table, candidate, use.profile)
        recorded = recorded_fingerprint(use.profile.fitted, use.profile.measured)
        predicted[name] = {
            "profile_file": use.file,
            "profile_role": use.role,
            "dense_ms": estimate_cost(table, Candidate({}), use.profile).latency_ms,
            "dense_format": "fp32 (the dense model's ONNX, dense_fp32)",
            "candidate_ms": cost.latency_ms,
            "candidate_format": scored_label,
            "candidate_file": scored_file,
            "candidate_energy_uj": cost.energy_uj,
            "candidate_fp32_ms": estimate_cost(table, fp32, use.profile).latency_ms,
            "candidate_fp32_file": "model.onnx",
            "machine_warning": None if recorded is None else fingerprint_mismatch(recorded, here),
        }
    return predicted


def latency_markdown(measured: dict[str, float], predicted: dict[str, dict]) -> list[str]:
    """Measured and predicted latency side by side, one row per exported file, one column per
    profile: each prediction stands beside the file (and precision) it is for."""
    names = list(predicted)
    header = "| latency, ms (onnxruntime, 1 thread, batch 1) | measured |" + "".join(
        f" predicted: {name} |" for name in names)
    lines = [header, "|---|---|" + "---|" * len(names)]

    def row(label: str, measured_key: str | None, key: str) -> None:
        value = measured.get(measured_key) if measured_key else None
        cells = "".join(f" {p[key]:.4f} |" for p in predicted.values())
        lines.append(f"| {label} | {'—' if value is None else f'{value:.4f}'} |{cells}")

    first = next(iter(predicted.values()), None)
    scored = first["candidate_format"] if first else None
    scored_file = first["candidate_file"] if first else None
    row("dense model, fp32 (dense_fp32)", "dense_fp32", "dense_ms")
    if first is None:
        for key in ("onnx", "onnx_int8"):
            if key in measured:
                row(f"model{'.int8' if key == 'onnx_int8' else ''}.onnx", key, "dense_ms")
    elif scored_file == "model.onnx":
        row(f"model.onnx: the candidate as scored ({scored})", "onnx", "candidate_ms")
    else:
        row("model.onnx: the candidate's structure at fp32", "onnx", "candidate_fp32_ms")
        if scored_file == "model.int8.onnx":
            row(f"model.int8.onnx: the candidate as scored ({scored}; the file holds every "
                "searched layer at int8)", "onnx_int8", "candidate_ms")
        else:
            row(f"the candidate as scored ({scored}): no exported file has these precisions",
                None, "candidate_ms")
    if not predicted:
        return lines + ["", "Predicted: no hardware profile; give --hardware, or run "
                        "`autosparse calibrate` on this machine."]
    lines.append("")
    for name, p in predicted.items():
        lines.append(f"- {name}: {p['profile_role']}, file {p['profile_file']}; predicted energy "
                     f"of the candidate as scored {p['candidate_energy_uj']:.3g} µJ")
    lines += [f"- warning: {name}: {p['machine_warning']}" for name, p in predicted.items()
              if p.get("machine_warning")]
    return lines
