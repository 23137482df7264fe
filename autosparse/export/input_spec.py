"""What a deployment must feed the exported model, written into the export folder.

The search normalises inputs with statistics computed on the train split; a user who feeds
``model.onnx`` raw pixels gets a fraction of the accuracy. So every export records the input
spec (shape, dtype, the raw form per data source, the normalisation and the class order) and
gives a loading-and-predict snippet per format that applies it. A language model takes int64
token ids (no normalisation) and returns logits per position; a regression model returns its
targets (no class order).
"""

from __future__ import annotations

from autosparse.config.sections import DataConfig

_RAW = {
    "sklearn-digits": "sklearn.datasets.load_digits().images / 16.0, shape (N, 1, 8, 8), in [0, 1]",
    "npz": "the npz arrays as stored, put channel-first (layout {layout}) as float32",
    "image-folder": "RGB{gray} images resized to {size}, pixel / 255 in [0, 1], channel-first",
    "torchvision": "the torchvision dataset's images as tensors in [0, 1], channel-first",
    "sklearn-diabetes": "sklearn.datasets.load_diabetes() features, shape (N, 10), as float32",
    "synthetic-tokens": "token ids in [0, {vocab}), the first {length} tokens of each sequence "
                        "(autosparse.workload.task_builtins.markov_tokens)",
}


def input_spec(data_cfg: DataConfig, input_shape: tuple[int, ...], mean: tuple[float, ...],
               std: tuple[float, ...], classes: tuple[str, ...] | None,
               num_classes: int, kind: str = "classification", tokens: bool = False) -> dict:
    """The spec as plain data for report.json. ``kind`` is the task's (classification,
    regression, language-model); ``tokens``: the model takes integer token ids."""
    raw = _RAW.get(data_cfg.source, "the data source's samples").format(
        layout=data_cfg.layout, gray=" (grayscale)" if data_cfg.grayscale else "",
        size=data_cfg.image_size, vocab=num_classes, length=input_shape[0] if input_shape else 0)
    if data_cfg.factory is not None:  # the user's loaders did their own preprocessing
        raw = f"x exactly as the loaders of {data_cfg.factory} yield it"
        mean, std = (0.0,), (1.0,)  # autosparse added no normalisation of its own
    if tokens:
        return {"kind": kind, "shape": ["batch", *input_shape], "dtype": "int64", "raw": raw,
                "mean": [], "std": [], "normalise": "none: token ids go in as they are",
                "vocabulary": num_classes,
                "output": f"logits of shape (batch, {', '.join(map(str, input_shape))}, "
                          f"{num_classes}): at each position the scores of the next token "
                          "over the vocabulary; argmax over the last axis is the predicted "
                          "next token, softmax its probabilities"}
    if kind == "regression":
        target = (" (for sklearn-diabetes: disease progression standardised with the train "
                  "split's mean and std)" if data_cfg.source == "sklearn-diabetes" else "")
        return {"kind": kind, "shape": ["batch", *input_shape], "dtype": "float32", "raw": raw,
                "mean": list(mean), "std": list(std),
                "normalise": "x = (raw - mean[c]) / std[c] for each channel c (axis 1)",
                "outputs": num_classes,
                "output": f"{num_classes} regression value{'s' if num_classes > 1 else ''} per "
                          f"sample, shape (batch, {num_classes}), in the units of the training "
                          f"targets{target}"}
    return {
        "shape": ["batch", *input_shape],
        "dtype": "float32",
        "raw": raw,
        "mean": list(mean),
        "std": list(std),
        "normalise": "x = (raw - mean[c]) / std[c] for each channel c (axis 1)",
        "classes": list(classes) if classes else list(range(num_classes)),
        "output": "one logit per class, in the order of 'classes'; argmax is the prediction",
    }


def _tokens_markdown(spec: dict) -> list[str]:
    return [
        "## Input: what to feed the model", "",
        f"- shape {tuple(spec['shape'])}, {spec['dtype']} token ids; raw form: {spec['raw']}",
        f"- normalise: {spec['normalise']}",
        f"- output: {spec['output']}", "",
        "```python", "import numpy as np",
        "x = np.asarray(tokens, dtype=np.int64)  # (batch, tokens), ids in [0, "
        f"{spec['vocabulary']})", "",
        "import onnxruntime as ort                      # model.onnx / model.int8.onnx",
        "session = ort.InferenceSession('model.onnx')",
        "logits = session.run(None, {session.get_inputs()[0].name: x})[0]",
        "next_tokens = logits.argmax(axis=-1)", "",
        "import torch                                   # model.pt2",
        "program = torch.export.load('model.pt2').module()",
        "next_tokens = program(torch.from_numpy(x)).argmax(dim=-1)", "",
        "import autosparse                              # model.packed (smallest file)",
        "model = autosparse.load('model.packed')        # its graph travels with it",
        "```", ""]


def input_markdown(spec: dict) -> list[str]:
    """The report.md section: the spec and a snippet per format."""
    if spec.get("dtype") == "int64":
        return _tokens_markdown(spec)
    regression = spec.get("kind") == "regression"
    mean, std = spec["mean"], spec["std"]
    prepare = ["import numpy as np",
               f"mean = np.array({mean}, np.float32).reshape(1, -1, *[1] * {len(spec['shape']) - 2})",
               f"std = np.array({std}, np.float32).reshape(1, -1, *[1] * {len(spec['shape']) - 2})",
               "x = ((raw - mean) / std).astype(np.float32)  # raw: " + spec["raw"]]
    return [
        "## Input: what to feed the model", "",
        f"- shape {tuple(spec['shape'])}, {spec['dtype']}; raw form: {spec['raw']}",
        f"- normalise: {spec['normalise']}, mean {mean}, std {std} (train-split statistics: "
        "without this step the model sees different inputs than it was trained on)",
        f"- output: {spec['output']}" + ("" if regression else f"; classes {spec['classes']}"),
        "",
        "```python", *prepare, "",
        "import onnxruntime as ort                      # model.onnx / model.int8.onnx",
        "session = ort.InferenceSession('model.onnx')",
        "y = session.run(None, {session.get_inputs()[0].name: x})[0]" if regression else
        "labels = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)", "",
        "import torch                                   # model.pt2",
        "program = torch.export.load('model.pt2').module()",
        "y = program(torch.from_numpy(x))" if regression else
        "labels = program(torch.from_numpy(x)).argmax(dim=1)", "",
        "import autosparse                              # model.packed (smallest file)",
        "model = autosparse.load('model.packed')        # its graph travels with it",
        "```", ""]


def sizes_markdown(files_bytes: dict[str, int], dense_onnx_bytes: int | None,
                   latency_ms: dict[str, float]) -> list[str]:
    """Each file's size next to dense, naming the small one, and a word when int8 is slower."""
    lines = ["## Files", "", "| file | kB | vs dense fp32 ONNX |", "|---|---|---|"]
    if dense_onnx_bytes:
        lines.append(f"| dense model, fp32 ONNX (for comparison; not in this folder) | "
                     f"{dense_onnx_bytes / 1000:.1f} | 1.00× |")
    for name, size in files_bytes.items():
        if name.startswith("model."):
            ratio = f"{size / dense_onnx_bytes:.2f}×" if dense_onnx_bytes else ""
            lines.append(f"| {name} | {size / 1000:.1f} | {ratio} |")
    lines += ["", "`model.packed` stores exactly what the size objective counted (bit-packed "
              "values, sparse index, one bitmask per pruned channel group) and the model's graph. "
              "`model.compact.onnx` holds the same bits in a standard ONNX file (decoded by "
              "standard operators that onnxruntime folds at load: it then runs as fast as "
              "`model.onnx`). `model.onnx` and `model.pt2` hold the shrunk model's weights as "
              "dense float32 (zeros included), so only channel pruning makes them smaller.", ""]
    fp32, int8 = latency_ms.get("onnx"), latency_ms.get("onnx_int8")
    if fp32 and int8 and int8 > fp32:
        lines += [f"int8 ONNX is slower than fp32 here ({int8:.4f} vs {fp32:.4f} ms): onnxruntime "
                  "runs QDQ convs as float between dequantize and quantize steps where this CPU "
                  "has no fused integer kernel for them, and pays for the conversions (README, "
                  "\"Latency fidelity\"); use `model.onnx` where speed matters on this CPU.", ""]
    return lines
