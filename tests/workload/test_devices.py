"""Devices: resolution of ``device``, worker placement against faked device lists, amp, and the
study signature staying the same across devices. Everything here runs on a CPU-only machine;
the GPU paths are exercised by benchmarks/gpu_check.py where a GPU is present."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autosparse.compress.finetune import FinetuneSession
from autosparse.config.schema import parse_config
from autosparse.config.sections import FinetuneConfig
from autosparse.config.validation import ConfigError
from autosparse.search.study_identity import signature as _signature
from autosparse.workload.devices import (
    amp_mode,
    place_workers,
    present_devices,
    resolve_device,
)

CPU = ["cpu"]
TWO_GPUS = ["cpu", "cuda:0", "cuda:1"]
MAC = ["cpu", "mps"]


def test_present_devices_starts_with_cpu_and_matches_torch():
    present = present_devices()
    assert present[0] == "cpu"
    gpus = [name for name in present if name.startswith("cuda:")]
    assert len(gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_auto_is_cpu_on_this_cpu_only_machine():
    assert resolve_device("auto", present_devices()) in ("cpu", "mps")


@pytest.mark.parametrize("present, expected", [
    (CPU, "cpu"), (TWO_GPUS, "cuda:0"), (MAC, "mps"), (["cpu", "cuda:0", "mps"], "cuda:0"),
])
def test_auto_prefers_cuda_then_mps_then_cpu(present, expected):
    assert resolve_device("auto", present) == expected


@pytest.mark.parametrize("name, expected", [
    ("cpu", "cpu"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"),
])
def test_named_devices_resolve(name, expected):
    assert resolve_device(name, TWO_GPUS) == expected


@pytest.mark.parametrize("name, present, words", [
    ("cuda:3", ["cpu", "cuda:0"], ["cuda:3", "no GPU 3", "cpu, cuda:0"]),
    ("cuda", CPU, ["no CUDA GPU", "present: cpu"]),
    ("cuda:0", CPU, ["no CUDA GPU", "present: cpu"]),
    ("mps", TWO_GPUS, ["mps", "cpu, cuda:0, cuda:1"]),
    ("tpu", TWO_GPUS, ["tpu", "allowed", "cpu, cuda:0, cuda:1"]),
])
def test_bad_device_names_the_devices_present(name, present, words):
    with pytest.raises(ConfigError) as err:
        resolve_device(name, present)
    for word in words:
        assert word in str(err.value)


def test_config_refuses_an_unknown_device_name_before_anything_runs():
    with pytest.raises(ConfigError, match="device 'tpu' not allowed; allowed: auto, cpu, cuda"):
        parse_config({"name": "x", "model": {"builtin": "digits-cnn"}, "device": "tpu"})
    with pytest.raises(ConfigError, match="devices"):
        parse_config({"name": "x", "model": {"builtin": "digits-cnn"}, "devices": []})


@pytest.mark.parametrize("workers, device, devices, present, expected", [
    (3, "auto", None, CPU, ["cpu"] * 3),                    # CPU workers share the cores
    (2, "cpu", None, TWO_GPUS, ["cpu", "cpu"]),              # asked for the CPU
    (2, "auto", None, TWO_GPUS, ["cuda:0", "cuda:1"]),       # one GPU per worker
    (1, "auto", None, TWO_GPUS, ["cuda:0"]),
    (2, "cuda", None, TWO_GPUS, ["cuda:0", "cuda:1"]),
    (1, "cuda:1", None, TWO_GPUS, ["cuda:1"]),
    (2, "auto", [1, 0], TWO_GPUS, ["cuda:1", "cuda:0"]),     # the list's order
    (1, "cuda", [1], TWO_GPUS, ["cuda:1"]),
    (2, "auto", [0, 0], TWO_GPUS, ["cuda:0", "cuda:0"]),     # sharing only when asked
    (3, "auto", [0, 1, 0], TWO_GPUS, ["cuda:0", "cuda:1", "cuda:0"]),
    (2, "auto", [0, 1, 0], TWO_GPUS, ["cuda:0", "cuda:1"]),
    (2, "auto", None, MAC, ["mps", "mps"]),
])
def test_workers_are_placed_one_per_gpu(workers, device, devices, present, expected):
    assert place_workers(workers, device, devices, present) == expected


@pytest.mark.parametrize("workers, device, devices, present, words", [
    (3, "auto", None, TWO_GPUS, ["--workers 3", "2 GPU(s)", "devices: [0, 1, 0]"]),
    (2, "cuda:1", None, TWO_GPUS, ["--workers 2", "1 GPU(s)", "devices: [1, 1]"]),
    (3, "auto", [0, 1], TWO_GPUS, ["--workers 3", "2 GPU(s)"]),
    (1, "auto", [2], TWO_GPUS, ["no GPU 2", "cpu, cuda:0, cuda:1"]),
    (1, "auto", [0], CPU, ["no GPU 0", "present: cpu"]),
    (1, "cpu", [0], TWO_GPUS, ["needs device: cuda", "'cpu'"]),
    (1, "cuda:0", [0, 1], TWO_GPUS, ["needs device: cuda"]),
])
def test_placement_errors_say_what_to_do(workers, device, devices, present, words):
    with pytest.raises(ConfigError) as err:
        place_workers(workers, device, devices, present)
    for word in words:
        assert word in str(err.value)


def test_amp_modes():
    assert not amp_mode("cpu", False).enabled and amp_mode("cuda", False).name == "float32"
    cpu = amp_mode("cpu", True)
    assert cpu.enabled and cpu.dtype is torch.bfloat16 and not cpu.scale_loss
    with pytest.raises(ConfigError, match="finetune.amp.*mps"):
        amp_mode("mps", True)


def _tiny_finetune(amp: bool) -> float:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,),
                                                                        generator=generator))
               for _ in range(4)]
    cfg = FinetuneConfig(steps=12, amp=amp)
    with FinetuneSession(student, teacher, batches, cfg) as session:
        return session.run_until().final_loss


def test_amp_on_cpu_trains_in_bfloat16_and_repeats():
    """finetune.amp on the CPU is bfloat16 autocast: it trains (finite loss near the float32
    one, not equal to it) and the same seed repeats it exactly."""
    fp32, amp = _tiny_finetune(False), _tiny_finetune(True)
    assert math.isfinite(amp) and amp != fp32 and abs(amp - fp32) < 0.1 * abs(fp32) + 0.05
    assert _tiny_finetune(True) == amp


def test_study_signature_does_not_name_the_device():
    """A study may be resumed on another device: device, devices and amp leave it unchanged."""
    base = {"name": "x", "model": {"builtin": "digits-cnn"}}
    cpu = parse_config({**base, "device": "cpu"})
    gpu = parse_config({**base, "device": "cuda:1", "devices": [1, 1],
                        "finetune": {"amp": True}})
    assert _signature(cpu) == _signature(gpu) == _signature(parse_config(base))


def test_search_places_workers_before_any_work(tmp_path, monkeypatch):
    """run_search checks the placement against the devices present first: three workers on a
    (faked) two-GPU machine stop at once, with nothing trained or written."""
    from autosparse.search import runner

    monkeypatch.setattr(runner, "present_devices", lambda: TWO_GPUS)
    config = tmp_path / "c.yaml"
    config.write_text("name: place\nmodel: {builtin: digits-cnn}\n")
    with pytest.raises(ConfigError, match=r"--workers 3 but only 2 GPU\(s\)"):
        runner.run_search(config, runs_dir=tmp_path / "runs", workers=3)
    assert not (tmp_path / "runs").exists()
