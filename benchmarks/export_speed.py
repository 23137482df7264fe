"""Is the exported model really smaller and faster? Dense vs exported, measured vs predicted.

    for model in (quickstart digits-cnn with its trained weights, ResNet-style CNN at 32x32 with
                  random weights -- for speed only):
        for candidate in (dense, int8, channel 50 % inside residual blocks + int8, ...):
            compress + bake + shrink (channel groups removed by Torch-Pruning); write the packed
            checkpoint of the shrunk model, ONNX fp32 and ONNX int8 (QDQ)
            stored size: packed file vs the size formula's prediction
            latency: onnxruntime, one thread, batch 1, interleaved rounds, medians
            predicted latency: the cost model with the measured profile of this machine
    write <out>.csv and <out>.md

    python benchmarks/export_speed.py --out benchmarks/results/export_speed
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from autosparse.compress.apply import bake, compress_model, structural_keep
from autosparse.compress.footprint import footprint_metrics
from autosparse.compress.shrink import shrink_model
from autosparse.compress.storage import model_zeros
from autosparse.config.hardware import load_profile
from autosparse.cost.calibration.timing import time_variants
from autosparse.cost.calibration.variants import Variant
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.onnx_files import export_onnx, quantize_onnx_int8
from autosparse.export.packed import save_packed
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover, example_input
from autosparse.space.structure import leaders
from autosparse.workload.models import DigitsCNN

MEASURED = Path("benchmarks/results/calibration/measured-ci-epyc.yaml")


class Block(nn.Module):
    """A basic residual block: conv-bn-relu-conv-bn + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet14(nn.Module):
    """ResNet-style CIFAR network (3 stages x 2 blocks, widths 16/32/64), ~35 MMAC at 32x32."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            stages += [Block(c_in, c_out, stride), Block(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def candidates(table) -> dict[str, Candidate]:
    inner = [n for n in table.names if n.endswith(".conv1")]  # feed only their block's conv2
    every = table.names
    stages = [n for n in leaders(table) if n not in inner]  # residual stages: stem, conv2s
    return {
        "dense fp32": Candidate({}),
        "int8": Candidate({n: LayerChoice.make("dense", 0, 8) for n in every}),
        "channel 50 % (block-inner convs)": Candidate(
            {n: LayerChoice.make("channel", 0.5, 32) for n in inner}),
        "channel 50 % (residual stages)": Candidate(
            {n: LayerChoice.make("channel", 0.5, 32) for n in stages}),
        "channel 50 % + int8": Candidate(
            {n: LayerChoice.make("channel" if n in inner else "dense", 0.5 if n in inner else 0, 8)
             for n in every}),
        "unstructured 90 % fp32": Candidate(
            {n: LayerChoice.make("unstructured", 0.9, 32) for n in every}),
        "unstructured 80 % + int4": Candidate(
            {n: LayerChoice.make("unstructured", 0.8, 4) for n in every}),
    }


def digits_candidates(table) -> dict[str, Candidate]:
    every, led = table.names, leaders(table)  # channel on conv1-conv3 and fc1, never the head
    return {
        "dense fp32": Candidate({}),
        "int8": Candidate({n: LayerChoice.make("dense", 0, 8) for n in every}),
        "channel 50 % (conv1-conv3, fc1)": Candidate(
            {n: LayerChoice.make("channel", 0.5, 32) for n in led}),
        "channel 50 % + int8": Candidate(
            {n: LayerChoice.make("channel" if n in led else "dense", 0.5 if n in led else 0, 8)
             for n in every}),
        "unstructured 90 % fp32": Candidate(
            {n: LayerChoice.make("unstructured", 0.9, 32) for n in every}),
        "unstructured 80 % + int4": Candidate(
            {n: LayerChoice.make("unstructured", 0.8, 4) for n in every}),
    }


def run(models: dict, workdir: Path, rounds: int, calls: int) -> pd.DataFrame:
    rows, variants = [], []
    profiles = {"measured": load_profile(MEASURED), "x86": load_profile("x86-server-vnni")}
    for model_name, (model, input_shape, make) in models.items():
        model.eval()
        table, graph = discover(model, input_shape)
        example = example_input(model, input_shape)
        calibration = [np.random.default_rng(i).standard_normal((1, *input_shape)).astype(np.float32)
                       for i in range(8)]
        for label, candidate in make(table).items():
            _, _, kept = structural_keep(model, candidate, graph)
            baked = bake(compress_model(model, candidate, None, graph))
            shrunk, shrink_report = shrink_model(baked, candidate, table, graph, kept, example)
            stem = workdir / f"{model_name}-{len(rows)}"
            info = save_packed(shrunk, candidate, stem.with_suffix(".packed"), table=table,
                               kept=kept)
            fp32 = export_onnx(shrunk, input_shape, stem.with_suffix(".onnx"))
            row = {"model": model_name, "candidate": label,
                   "predicted_size_kb": footprint_metrics(
                       table, candidate, model_zeros(shrunk, table, candidate))["size_kb"],
                   "packed_kb": stem.with_suffix(".packed").stat().st_size / 1000,
                   "header_kb": info.header_bytes / 1000,
                   "buffers_kb": info.buffer_bytes / 1000,
                   "removed_groups": len(shrink_report.groups),
                   "parameters": shrink_report.parameters_after}
            for name, profile in profiles.items():
                row[f"predicted_ms_{name}"] = estimate_cost(table, candidate, profile).latency_ms
            rows.append(row)
            variants.append(Variant(f"{model_name}|{label}|fp32", model_name, {}, table, candidate,
                                    fp32))
            if all(candidate.get_choice(n).bits <= 8 for n in table.names):
                int8 = quantize_onnx_int8(fp32, stem.with_suffix(".int8.onnx"), calibration)
                variants.append(Variant(f"{model_name}|{label}|int8", model_name, {}, table,
                                        candidate, int8))
    measured = {m.name: m.median_seconds * 1e3
                for m in time_variants(variants, rounds=rounds, calls=calls)}
    frame = pd.DataFrame(rows)
    for kind in ("fp32", "int8"):
        frame[f"measured_ms_onnx_{kind}"] = [measured.get(f"{r.model}|{r.candidate}|{kind}")
                                             for r in frame.itertuples()]
    return frame


def markdown(frame: pd.DataFrame, command: str) -> str:
    lines = ["# Export: dense vs exported, stored size and onnxruntime latency", "",
             f"Command: `{command}`. One thread, batch 1, interleaved rounds, medians; predicted "
             f"latency from the cost model with `{MEASURED}` (this machine, calibrated) and with "
             "`x86-server-vnni` (the datasheet profile). Buffers: batch-norm running statistics, "
             "stored but outside the size formula (it counts parameters). The fp32 ONNX of a "
             "quantized candidate holds its dequantized weights (same speed as dense); its "
             "prediction is for the int8 model.", ""]
    for model, part in frame.groupby("model", sort=False):
        lines += [f"## {model}", "",
                  "| candidate | packed file kB (predicted + header + buffers) | ONNX fp32 ms | ONNX int8 ms "
                  "| predicted ms (measured profile) | predicted ms (x86 profile) |",
                  "|---|---|---|---|---|---|"]
        for r in part.itertuples():
            int8 = "" if pd.isna(r.measured_ms_onnx_int8) else f"{r.measured_ms_onnx_int8:.4f}"
            lines.append(f"| {r.candidate} | {r.packed_kb:.2f} ({r.predicted_size_kb:.2f} + "
                         f"{r.header_kb:.2f} + {r.buffers_kb:.2f}) | {r.measured_ms_onnx_fp32:.4f} | {int8} | "
                         f"{r.predicted_ms_measured:.4f} | {r.predicted_ms_x86:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits-weights", type=Path, default=None,
                        help="state dict of the quickstart's dense model (default: random weights)")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--calls", type=int, default=21)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_speed"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    digits = DigitsCNN(1, 8, 8, 10)
    if args.digits_weights:
        digits.load_state_dict(torch.load(args.digits_weights, weights_only=True))
    models = {"quickstart digits-cnn (1x8x8)": (digits, (1, 8, 8), digits_candidates),
              "ResNet-14 style (3x32x32, random weights)": (ResNet14(), (3, 32, 32), candidates)}
    with tempfile.TemporaryDirectory() as tmp:
        frame = run(models, Path(tmp), args.rounds, args.calls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.5g")
    command = "python benchmarks/export_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.with_suffix(".md").write_text(markdown(frame, command))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
