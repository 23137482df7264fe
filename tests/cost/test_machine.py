"""The machine a profile was measured on: fingerprint, honest cache sizes, provenance, warnings,
and the export report's labels (which format and which profile file each prediction is for)."""

from __future__ import annotations

import os
import re
import types
import warnings
from pathlib import Path

import pytest

from autosparse.config.hardware import load_profile
from autosparse.cost import calibrate
from autosparse.cost.calibration import machine
from autosparse.cost.calibration.fit import FitResult
from autosparse.cost.calibration.machine import (
    CacheReport,
    ProfileMachineWarning,
    Sweep,
    bandwidth_sweep,
    effective_caches,
    fingerprint,
    fingerprint_mismatch,
    last_level_capacity,
    recorded_fingerprint,
    sysfs_caches,
    warn_if_other_machine,
)
from autosparse.cost.estimate import estimate_cost
from autosparse.space.candidate import Candidate, LayerChoice

KIB, MIB = 1024, 1024 ** 2
COMMITTED = (Path(__file__).resolve().parents[2]
             / "benchmarks/results/calibration/measured-ci-epyc.yaml")

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 fma avx avx2 avx512f avx512bw avx_vnni avx512_vnni amx_tile amx_int8 hypervisor

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 fma avx avx2 avx512f avx512bw avx_vnni avx512_vnni amx_tile amx_int8 hypervisor
"""
AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse sse2 fma avx avx2 sha_ni hypervisor
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp i8mm sve
CPU implementer\t: 0x41
"""


def cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


# --- fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_reads_model_vendor_and_kernel_flags(tmp_path):
    fp = fingerprint(cpuinfo(tmp_path, INTEL), logical_cpus=2)
    assert fp["cpu"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert fp["vendor"] == "GenuineIntel" and fp["logical_cpus"] == 2
    # only flags kernels dispatch on, in a fixed order; sse/hypervisor are not among them
    assert fp["flags"] == ["fma", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile",
                           "amx_int8"]
    assert re.match(r"\d+\.\d+", fp["onnxruntime"]) and re.match(r"\d+\.\d+", fp["torch"])


def test_fingerprint_of_an_arm_cpu_uses_its_features_line(tmp_path):
    fp = fingerprint(cpuinfo(tmp_path, ARM))
    assert fp["flags"] == ["asimd", "asimddp", "i8mm", "sve"] and fp["vendor"] == "0x41"
    assert fp["cpu"]  # no model name line: platform's answer, never empty


def test_fingerprint_without_cpuinfo_still_names_something(tmp_path):
    fp = fingerprint(tmp_path / "missing")
    assert fp["cpu"] and fp["flags"] == []


def test_same_machine_is_no_mismatch(tmp_path):
    fp = fingerprint(cpuinfo(tmp_path, INTEL))
    assert fingerprint_mismatch(fp, dict(fp)) is None
    assert fingerprint_mismatch(fp, {**fp, "logical_cpus": 64, "torch": "0.0"}) is None


def test_other_cpu_is_a_one_line_reason_naming_both(tmp_path):
    amd = fingerprint(cpuinfo(tmp_path, AMD))
    intel = fingerprint(cpuinfo(tmp_path, INTEL))
    reason = fingerprint_mismatch(amd, intel)
    assert reason is not None and "\n" not in reason
    assert "profile measured on AMD EPYC 7B13 64-Core Processor (fma, avx2, no VNNI)" in reason
    assert "this machine is Intel(R) Xeon(R) Platinum 8481C" in reason and "avx512_vnni" in reason
    assert "autosparse calibrate" in reason


def test_same_model_with_other_flags_is_a_mismatch(tmp_path):
    """A VM can mask AVX-512 on the same CPU model: the kernels then differ."""
    intel = fingerprint(cpuinfo(tmp_path, INTEL))
    masked = {**intel, "flags": ["fma", "avx2"]}
    assert "no VNNI" in fingerprint_mismatch(masked, intel)


def test_legacy_profile_records_only_the_cpu_model():
    committed = load_profile(COMMITTED)
    recorded = recorded_fingerprint(committed.fitted, committed.measured)
    assert recorded == {"cpu": "AMD EPYC"}
    assert fingerprint_mismatch(recorded, {"cpu": "AMD EPYC", "flags": ["avx2"]}) is None
    reason = fingerprint_mismatch(recorded, {"cpu": "Intel Xeon", "flags": ["avx512_vnni"]})
    assert "AMD EPYC (flags not recorded)" in reason
    assert recorded_fingerprint(load_profile("x86-server-vnni").fitted, False) is None


# --- the warning ---------------------------------------------------------------------------------

def measured_on(tmp_path: Path, text: str, name: str = "measured-elsewhere"):
    fp = fingerprint(cpuinfo(tmp_path, text))
    return load_profile("x86-server-vnni").model_copy(update={
        "name": name, "measured": True, "fitted": {"cpu": fp["cpu"], "machine": fp}})


def test_measured_profile_on_another_cpu_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_WARNED", set())
    here = fingerprint(cpuinfo(tmp_path, INTEL))
    profile = measured_on(tmp_path, AMD)
    with pytest.warns(ProfileMachineWarning, match="hardware profile runs/x.yaml: profile "
                      "measured on AMD EPYC 7B13"):
        assert warn_if_other_machine(profile, "runs/x.yaml", here) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_other_machine(profile, "runs/x.yaml", here) is not None  # not again


def test_builtin_profiles_and_same_machine_never_warn(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_WARNED", set())
    here = fingerprint(cpuinfo(tmp_path, INTEL))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_other_machine(load_profile("x86-server-vnni"), None, here) is None
        assert warn_if_other_machine(measured_on(tmp_path, INTEL), None, here) is None


def test_committed_profile_warns_on_an_intel_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_WARNED", set())
    with pytest.warns(ProfileMachineWarning, match="AMD EPYC"):
        warn_if_other_machine(load_profile(COMMITTED), str(COMMITTED),
                              fingerprint(cpuinfo(tmp_path, INTEL)))


# --- cache sizes ---------------------------------------------------------------------------------

TINY = Sweep(sizes=(16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 8 * MIB, 16 * MIB), repeats=1,
             bytes_per_repeat=1 * MIB)


def fake_sysfs(root: Path, levels) -> Path:
    for index, (level, kind, size) in enumerate(levels):
        folder = root / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    return root


VM = [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
      (3, "Unified", "307200K")]  # a 2-vCPU guest shown its host's 300 MiB L3
BARE = [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
        (3, "Unified", "32768K")]


def test_vm_l3_is_rejected_and_the_last_level_measured(tmp_path):
    root = fake_sysfs(tmp_path / "cache", VM)
    assert sysfs_caches(root) == {1: 48 * KIB, 2: 2 * MIB, 3: 300 * MIB}
    report = effective_caches(root, logical_cpus=2, sweep=TINY)
    assert report.source == "measured" and report.rejected == {3: 300 * MIB}
    assert report.sizes[:2] == [48 * KIB, 2 * MIB]  # plausible L1 and L2 stay sysfs's
    assert len(report.sizes) == 3 and 2 * MIB <= report.sizes[2] <= 16 * MIB
    assert [s for s, _ in report.sweep] == list(TINY.sizes)
    data = report.to_dict()
    assert data["sysfs_rejected"] == {"L3": 300 * MIB} and "16 MiB" in data["rule"]
    assert data["sizes_bytes"] == report.sizes and len(data["sweep_kib_gb_per_s"]) == 7


def test_bare_metal_sysfs_is_trusted_without_a_sweep(tmp_path):
    root = fake_sysfs(tmp_path / "cache", BARE)
    report = effective_caches(root, logical_cpus=16, sweep=TINY)
    assert report == CacheReport([32 * KIB, 1 * MIB, 32 * MIB], "sysfs",
                                 {1: 32 * KIB, 2: 1 * MIB, 3: 32 * MIB}, limit=64 * MIB)
    assert "sysfs_rejected" not in report.to_dict() and report.sweep == []
    # the same 32 MiB L3 seen by a 2-CPU guest is more than one core plausibly has
    assert effective_caches(root, logical_cpus=2, sweep=TINY).source == "measured"


def test_no_sysfs_keeps_the_base_profile(tmp_path):
    report = effective_caches(tmp_path / "missing", logical_cpus=2, sweep=TINY)
    assert report.sizes == [] and report.source == "none"
    base = load_profile("x86-server-vnni")
    assert calibrate.with_local_caches(base, report.sizes) is base


def test_sweep_gives_positive_bandwidth_at_increasing_sizes():
    points = bandwidth_sweep(TINY)
    sizes = [s for s, _ in points]
    assert sizes == sorted(sizes) == list(TINY.sizes)
    assert all(bw > 0 for _, bw in points)


def test_knee_is_where_bandwidth_falls_halfway_to_dram():
    curve = [(1 * MIB, 90e9), (2 * MIB, 60e9), (4 * MIB, 30e9), (16 * MIB, 30e9),
             (32 * MIB, 29e9), (64 * MIB, 25e9), (128 * MIB, 18e9), (256 * MIB, 14e9)]
    # sqrt(30 * 14) = 20.5 GB/s, crossed between 64 MiB (25) and 128 MiB (18): in log-log,
    # 0.606 of the way, 64 MiB x 2^0.606 = 97.4 MiB
    assert last_level_capacity(curve, above=2 * MIB) == pytest.approx(97.4 * MIB, rel=0.005)
    # without `above`, L1/L2 is the peak: sqrt(90 * 14) = 35.5 GB/s, crossed between 2 and 4 MiB
    assert 2 * MIB < last_level_capacity(curve, above=0) < 4 * MIB
    # the cache holds up to the last point before DRAM: the crossing lies between them
    slow = [(4 * MIB, 30e9), (16 * MIB, 29e9), (64 * MIB, 28e9), (256 * MIB, 14e9)]
    assert 64 * MIB < last_level_capacity(slow, above=2 * MIB) < 256 * MIB
    flat = [(4 * MIB, 15e9), (16 * MIB, 14.5e9), (64 * MIB, 14e9), (256 * MIB, 14e9)]
    assert last_level_capacity(flat, above=2 * MIB) is None  # no level beyond L2 is faster
    assert last_level_capacity(curve[:2], above=0) is None  # too few points to tell


def test_bad_sweeps_are_refused():
    with pytest.raises(ValueError, match="increasing"):
        Sweep(sizes=(4 * MIB, 1 * MIB))
    with pytest.raises(ValueError, match="repeats 0"):
        Sweep(repeats=0)


# --- provenance and file naming in calibrate ------------------------------------------------------

def test_each_calibration_gets_a_new_file_unless_named(tmp_path):
    lines: list[str] = []
    name, path = calibrate.profile_destination(tmp_path, None, lines.append)
    assert re.fullmatch(r"measured-[A-Za-z0-9_.-]+-\d{8}T\d{6}Z", name)
    assert path == tmp_path / f"{name}.yaml" and lines == []
    path.write_text("x")
    again, second = calibrate.profile_destination(tmp_path, None, lines.append)
    assert second != path and not second.exists() and lines == []  # same second: suffixed
    (tmp_path / "box.yaml").write_text("x")
    assert calibrate.profile_destination(tmp_path, "box", lines.append)[1] == tmp_path / "box.yaml"
    assert len(lines) == 1 and lines[0].startswith(f"overwriting {tmp_path / 'box.yaml'}")


def test_provenance_records_machine_caches_and_spread():
    base = load_profile("x86-server-vnni")
    caches = CacheReport([48 * KIB, 2 * MIB, 64 * MIB], "measured",
                         {1: 48 * KIB, 2: 2 * MIB, 3: 480 * MIB}, {3: 480 * MIB}, 16 * MIB,
                         [(16 * KIB, 60e9), (256 * MIB, 14e9)])
    result = FitResult(base.model_copy(update={"name": "box", "measured": True}),
                       {"fp32_macs_per_second": 4e10}, 0.1)
    profile = calibrate._with_provenance(result, calibrate.CalibrationSettings(), {"count": 3},
                                         {}, 6, [0.01, 0.03, 0.2], caches)
    fitted = load_profile_from_text(profile.to_yaml(), Path("/tmp")).fitted  # survives YAML
    assert fitted["machine"]["cpu"] == fitted["cpu"] and "flags" in fitted["machine"]
    assert fitted["timing"]["spread_median"] == 0.03 and fitted["timing"]["spread_max"] == 0.2
    assert fitted["caches"]["source"] == "measured"
    assert fitted["caches"]["sizes_bytes"] == [48 * KIB, 2 * MIB, 64 * MIB]
    assert re.match(r"\d{4}-\d\d-\d\dT", fitted["date"])
    assert "measured" in profile.description
    assert recorded_fingerprint(fitted) == fitted["machine"]


def load_profile_from_text(text: str, folder: Path):
    import yaml

    from autosparse.config.hardware import parse_profile
    return parse_profile(yaml.safe_load(text), str(folder))


# --- the export report's labels ------------------------------------------------------------------

@pytest.fixture(scope="module")
def exporter():
    from autosparse.export import latency as module  # the report's latency predictions
    return module


def uses(exporter, tmp_path):
    other = measured_on(tmp_path, AMD, "measured-amd")
    return {"x86-server-vnni": exporter.ProfileUse(load_profile("x86-server-vnni"),
                                                   "built-in x86-server-vnni (x.yaml)",
                                                   "the config's hardware"),
            "measured-amd": exporter.ProfileUse(other, "runs/calibration/measured-amd.yaml",
                                                "the newest measured profile in runs/calibration")}


def int8_candidate(table) -> Candidate:
    return Candidate({n: LayerChoice.make("channel", 0.5, 8) for n in table.names})


def test_predictions_name_their_format_file_and_profile(exporter, small_table, tmp_path):
    here = fingerprint(cpuinfo(tmp_path, INTEL))
    candidate = int8_candidate(small_table)
    predicted = exporter.predicted_latencies(small_table, candidate, uses(exporter, tmp_path),
                                             int8_file=True, machine=here)
    builtin, amd = predicted["x86-server-vnni"], predicted["measured-amd"]
    profile = load_profile("x86-server-vnni")
    fp32 = Candidate({n: LayerChoice.make("channel", 0.5, 32) for n in small_table.names})
    assert builtin["candidate_ms"] == estimate_cost(small_table, candidate, profile).latency_ms
    assert builtin["candidate_fp32_ms"] == estimate_cost(small_table, fp32, profile).latency_ms
    assert builtin["candidate_ms"] != builtin["candidate_fp32_ms"]
    assert builtin["candidate_format"] == "int8 x3"
    assert builtin["candidate_file"] == "model.int8.onnx"
    assert builtin["candidate_fp32_file"] == "model.onnx"
    assert builtin["profile_file"] == "built-in x86-server-vnni (x.yaml)"
    assert builtin["machine_warning"] is None
    assert "AMD EPYC 7B13" in amd["machine_warning"]

    measured = {"dense_fp32": 1.5, "onnx": 0.9, "onnx_int8": 0.6}
    text = "\n".join(exporter.latency_markdown(measured, predicted))
    assert "| measured | predicted: x86-server-vnni | predicted: measured-amd |" in text
    assert (f"| model.int8.onnx: the candidate as scored (int8 x3; the file holds every searched "
            f"layer at int8) | 0.6000 | {builtin['candidate_ms']:.4f} | "
            f"{amd['candidate_ms']:.4f} |") in text
    assert (f"| model.onnx: the candidate's structure at fp32 | 0.9000 | "
            f"{builtin['candidate_fp32_ms']:.4f} |") in text
    assert f"| dense model, fp32 (dense_fp32) | 1.5000 | {builtin['dense_ms']:.4f} |" in text
    assert "- measured-amd: the newest measured profile in runs/calibration, file " \
           "runs/calibration/measured-amd.yaml" in text
    assert "- warning: measured-amd: profile measured on AMD EPYC 7B13" in text
    assert "warning: x86-server-vnni" not in text


def test_fp32_and_mixed_candidates_are_labelled(exporter, small_table, tmp_path):
    here = fingerprint(cpuinfo(tmp_path, INTEL))
    one = {"x86-server-vnni": uses(exporter, tmp_path)["x86-server-vnni"]}
    dense = Candidate({n: LayerChoice.make("channel", 0.25, 32) for n in small_table.names})
    predicted = exporter.predicted_latencies(small_table, dense, one, False, here)
    text = "\n".join(exporter.latency_markdown({"dense_fp32": 1.0, "onnx": 0.8}, predicted))
    assert "| model.onnx: the candidate as scored (fp32 x3) | 0.8000 |" in text
    mixed = Candidate({"conv1": LayerChoice.make("dense", 0, 32),
                       "conv2": LayerChoice.make("dense", 0, 8),
                       "fc": LayerChoice.make("dense", 0, 4)})
    predicted = exporter.predicted_latencies(small_table, mixed, one, False, here)
    assert predicted["x86-server-vnni"]["candidate_file"] is None
    text = "\n".join(exporter.latency_markdown({"dense_fp32": 1.0, "onnx": 0.8}, predicted))
    assert "| the candidate as scored (fp32 x1, int8 x1, int4 x1): no exported file has these " \
           "precisions | — |" in text
    none = "\n".join(exporter.latency_markdown({"dense_fp32": 1.0, "onnx": 0.8}, {}))
    assert "no hardware profile" in none


def test_export_prefers_the_newest_profile_measured_here(exporter, tmp_path, monkeypatch):
    here = fingerprint(cpuinfo(tmp_path, INTEL))
    monkeypatch.setattr(exporter, "this_machine", lambda: here)
    folder = tmp_path / "runs" / "calibration"
    folder.mkdir(parents=True)
    own = measured_on(tmp_path, INTEL, "measured-here")
    other = measured_on(tmp_path, AMD, "measured-amd")
    (folder / "measured-here.yaml").write_text(own.to_yaml())
    (folder / "measured-amd.yaml").write_text(other.to_yaml())
    os.utime(folder / "measured-here.yaml", (1_000_000, 1_000_000))  # older, but this CPU's
    config = types.SimpleNamespace(cost_profile=lambda: "x86-server-vnni")
    context = types.SimpleNamespace(profile=load_profile("x86-server-vnni"), config=config)
    chosen = exporter._profiles(context, tmp_path / "runs", None)
    assert list(chosen) == ["x86-server-vnni", "measured-here"]
    assert chosen["measured-here"].file == str(folder / "measured-here.yaml")
    assert "newest measured profile" in chosen["measured-here"].role
    assert chosen["x86-server-vnni"].role == "the config's hardware"
    assert chosen["x86-server-vnni"].file.startswith("built-in x86-server-vnni (")
    # none measured here: the newest of any CPU, which the report then warns about
    (folder / "measured-here.yaml").unlink()
    chosen = exporter._profiles(context, tmp_path / "runs", None)
    assert list(chosen) == ["x86-server-vnni", "measured-amd"]
    assert chosen["measured-amd"].role.endswith("(none there was measured on this CPU)")
