"""Recompute this export's test figures from the raw data, for every model file in this folder.

    python reproduce.py                 # in the export folder
    python reproduce.py --data PATH     # the data file or folder has moved since the export

It reads ``split.json`` (which raw samples form the test split, and how a raw sample becomes the
model's input) and ``report.json`` (the figures to reproduce and the tolerance), loads the raw
data with the data's own library, runs every model file present and prints one line per file:
the metric recomputed here, the report's figure, and whether they agree. Exit status 0: every
file agrees within the tolerance; 1: some file differs (or the test samples are not the ones the
export used); 2: it cannot run here (a missing package, the data not found).

A one-shot export (``model.gguf``) is scored in llama.cpp instead: its test perplexity over the
test windows, each from an empty context on one thread, as the export measured it. That needs
only numpy and llama-cpp-python (plus transformers for a text tokenizer folder).

Otherwise it needs numpy, onnxruntime and torch, plus the data's own library: scikit-learn (sklearn-digits,
sklearn-diabetes), Pillow (image folders), torchvision (torchvision datasets), transformers (a
text tokenizer folder). ``model.packed`` also needs autosparse (``pip install autosparse``); it
is skipped, with a note, where autosparse is not importable. A ``data.factory`` export imports
the factory's module (run from the folder the search ran in, or put it on PYTHONPATH).

(This file is written by autosparse into every export folder; it does not import autosparse
except for model.packed.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "validation", "test")


class CannotRun(Exception):
    """Something this machine lacks (a package, the data): exit status 2."""


# ------------------------------------------------------------------ the raw data of one split


def normalise(x: np.ndarray, pre: dict) -> np.ndarray:
    """``(x - mean[c]) / std[c]`` in float32, c the channel (axis 1), as the search did."""
    if pre["normalise"] != "per-channel":
        return x
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = np.asarray(pre["mean"], np.float64).astype(np.float32).reshape(shape)
    std = np.asarray(pre["std"], np.float64).astype(np.float32).reshape(shape)
    return ((x - mean) / std).astype(np.float32, copy=False)


def as_float(x: np.ndarray) -> np.ndarray:
    """uint8 pixels to [0, 1], anything else as float32."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def channels_first(x: np.ndarray, layout: str) -> np.ndarray:
    """NHWC -> NCHW, NLC -> NCL; an array missing only the channel axis gets one."""
    want = {"NCHW": 4, "NHWC": 4, "NCL": 3, "NLC": 3, "flat": 2}[layout]
    if layout != "flat" and x.ndim == want - 1:
        x = x[:, None] if layout in ("NCHW", "NCL") else x[..., None]
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    elif layout == "NLC":
        x = x.transpose(0, 2, 1)
    return np.ascontiguousarray(x)


def labels(y: np.ndarray) -> np.ndarray:
    return (y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y).astype(np.int64)


def need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CannotRun(f"this data needs {package} (pip install {package})") from None


def markov_tokens(sequences: int, length: int, vocab: int, successors: int, seed: int):
    """The synthetic-tokens data (autosparse.workload.task_builtins.markov_tokens)."""
    rng = np.random.default_rng(seed)
    transition = np.full((vocab, vocab), 0.02 / vocab)
    for token in range(vocab):
        chosen = rng.choice(vocab, successors, replace=False)
        transition[token, chosen] += rng.dirichlet(np.ones(successors)) * 0.98
    transition /= transition.sum(axis=1, keepdims=True)
    cumulative = transition.cumsum(axis=1)
    out = np.empty((sequences, length), dtype=np.int64)
    out[:, 0] = rng.integers(0, vocab, sequences)
    for t in range(1, length):
        u = rng.random(sequences)[:, None]
        out[:, t] = np.minimum((u > cumulative[out[:, t - 1]]).sum(axis=1), vocab - 1)
    return out


def read_text_tokens(files: list[Path], tokenizer: str, separator: str) -> np.ndarray:
    """The files' tokens joined by the separator (byte tokens, or a transformers tokenizer)."""
    if tokenizer == "bytes" or (Path(tokenizer) / "byte_tokenizer.json").is_file():
        data = separator.encode("utf-8").join(p.read_bytes() for p in files)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    tok = need("transformers", "transformers").AutoTokenizer.from_pretrained(
        tokenizer, local_files_only=True)
    sep, ids = tok.encode(separator, add_special_tokens=False), []
    for i, path in enumerate(files):
        ids += (sep if i else []) + tok.encode(path.read_text(encoding="utf-8", errors="replace"),
                                               add_special_tokens=False)
    return np.asarray(ids, dtype=np.int64)


def factory_split(spec: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The user's data.factory called again; its loader's batches for this split, in order."""
    sys.path[:0] = [spec["cwd"]]
    module, _, function = spec["factory"].partition(":")
    make = importlib.import_module(module)
    for part in function.split("."):
        make = getattr(make, part)
    loaders = make(**spec["kwargs"])
    loader = loaders[name] if isinstance(loaders, dict) else loaders[SPLITS.index(name)]
    xs, ys = zip(*((np.asarray(x), np.asarray(y)) for x, y in loader))
    return np.concatenate(xs), np.concatenate(ys)


def load_split(spec: dict, name: str, data: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one split, rebuilt from the raw data as split.json describes."""
    source, raw, part = spec["source"], spec.get("raw", {}), spec["splits"][name]
    if source == "data.factory":
        return factory_split(spec, name)
    if source == "text":
        root = Path(data or raw["root"])
        tokens = read_text_tokens([root / f for f in part["files"]], raw["tokenizer"],
                                  raw["separator"])
        starts = np.asarray(part["starts"], dtype=np.int64)
        windows = tokens[starts[:, None] + np.arange(raw["seq_len"])[None, :]]
        return windows[:, :-1], windows[:, 1:]
    index = np.asarray(part["indices"], dtype=np.int64)
    pre = spec["preprocessing"]
    if source == "sklearn-digits":
        digits = need("sklearn.datasets", "scikit-learn").load_digits()
        x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
        return normalise(x[index], pre), digits.target.astype(np.int64)[index]
    if source == "sklearn-diabetes":
        x, y = need("sklearn.datasets", "scikit-learn").load_diabetes(return_X_y=True)
        x, y = x.astype(np.float32)[index], y.astype(np.float32)[index, None]
        target = pre["target"]
        return normalise(x, pre), (y - target["mean"]) / target["std"]
    if source == "synthetic-tokens":
        tokens = markov_tokens(raw["sequences"], raw["length"], raw["vocab"], raw["successors"],
                               raw["seed"])[index]
        return tokens[:, :-1], tokens[:, 1:]
    if source == "npz":
        path = data or raw["path"]
        if not Path(path).is_file():
            raise CannotRun(f"the npz file {path} is not there (give --data PATH)")
        with np.load(path, allow_pickle=False) as arrays:
            x = channels_first(as_float(arrays[part["x"]]), raw["layout"])
            return normalise(x[index], pre), labels(arrays[part["y"]])[index]
    if source == "image-folder":
        image = need("PIL.Image", "Pillow")
        root = Path(data or raw["root"])
        pixels = []
        for i in index:
            with image.open(root / raw["files"][i]) as img:
                img = img.convert(raw["mode"])
                if raw["size"]:
                    img = img.resize((raw["size"][1], raw["size"][0]), image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
            pixels.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        y = np.asarray(raw["labels"], dtype=np.int64)[index]
        return normalise(as_float(np.stack(pixels)), pre), y
    if source == "torchvision":
        datasets = need("torchvision.datasets", "torchvision")
        to_tensor = need("torchvision.transforms", "torchvision").ToTensor()
        dataset = getattr(datasets, raw["name"])(root=data or raw["root"], train=part["train"],
                                                 download=False, transform=to_tensor)
        samples = [dataset[int(i)] for i in index]
        x = np.stack([s[0].numpy() for s in samples])
        return normalise(x, pre), labels(np.asarray([int(s[1]) for s in samples]))
    raise CannotRun(f"split.json names the source {source!r}, which this script does not know")


def changed_files(spec: dict, name: str, data: str | None) -> list[str]:
    """The raw text files of a split whose bytes differ from split.json's sha256 (or that are
    gone), so a changed corpus is named file by file rather than only by a window checksum."""
    part = spec["splits"][name]
    if spec["source"] != "text" or "files_sha256" not in part:
        return []
    root, changed = Path(data or spec["raw"]["root"]), []
    for file, digest in zip(part["files"], part["files_sha256"]):
        path = root / file
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            changed.append(file)
    return changed


def sha256(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ the models and the metric


def runner(path: Path):
    """A function batch (numpy) -> outputs (numpy) for one model file, or None to skip it."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()  # one thread, as the export's own check ran it
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import torch

    if path.suffix == ".pt2":
        model = torch.export.load(str(path)).module()
    else:  # model.packed: the bit-packed file needs autosparse's reader
        try:
            from autosparse.export.packed import load_packed
        except ImportError:
            return None
        model = load_packed(path).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        out = getattr(out, "logits", out)  # transformers' output objects
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    return run


def metric(kind: str, name: str, run, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """The task metric over the split in batches of the export's size (as the export did)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for start in range(0, len(x), batch):
        out = torch.from_numpy(run(x[start:start + batch]))
        target = torch.from_numpy(np.asarray(y[start:start + batch]))
        if kind == "classification":
            total += int((out.argmax(dim=1) == target).sum())
            count += target.numel()
        elif kind == "regression":
            diff = out.float() - target.to(out.dtype).reshape(out.shape).float()
            total += float((diff * diff).sum() if name == "mse" else diff.abs().sum())
            count += diff.numel()
        else:  # language-model: perplexity = exp(mean next-token cross-entropy)
            total += float(F.cross_entropy(out.reshape(-1, out.shape[-1]).float(),
                                           target.reshape(-1), reduction="sum"))
            count += target.numel()
    mean = total / count
    if kind == "classification":
        return 100.0 * mean  # percent
    return math.exp(mean) if kind == "language-model" else mean


# ------------------------------------------------------------------ a GGUF file in llama.cpp


def llama_cpp_module():
    """llama-cpp-python, or CannotRun in one line (it is built from source, often missing)."""
    try:
        import llama_cpp
    except ImportError:
        raise CannotRun("model.gguf is scored in llama.cpp: llama-cpp-python is not installed "
                        "(pip install llama-cpp-python)") from None
    return llama_cpp


def gguf_perplexity(llama_cpp, path: Path, windows: np.ndarray, threads: int) -> float:
    """exp(mean next-token negative log-likelihood) over the windows, each evaluated from an
    empty context with every position's logits and an F32 key/value cache: what the export's
    check computed (autosparse.cost.llama_cpp.llama_cpp_perplexity), in the same order."""
    n = int(windows.shape[1])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n, n_batch=n, n_ubatch=n, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False,
                          type_k=0, type_v=0)  # ggml type 0: F32
    nll, count = 0.0, 0
    try:
        for ids in windows.tolist():
            llm.reset()  # n_tokens = 0: the next eval drops the whole key/value cache
            llm.eval(ids)
            logits = np.array(llm.scores[:n], dtype=np.float32)[:-1].astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            nll -= float(log_probs[np.arange(n - 1), ids[1:]].sum())
            count += n - 1
    finally:
        llm.close()
    return float(np.exp(nll / count))


def dotted(report: dict, path: str | None):
    """report.json's value at ``a.b`` (None where it has none)."""
    if not path:
        return None
    value = report
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def main_gguf(spec: dict, report: dict, data: str | None, threads: int) -> int:
    """A one-shot export: rebuild the test windows, check them, score model.gguf in llama.cpp."""
    llama_cpp = llama_cpp_module()
    check, expected = report["reproduce"], spec["checksums"]["test"]
    x, y = load_split(spec, "test", data)
    x, y = np.ascontiguousarray(x, dtype=np.int64), np.ascontiguousarray(y, dtype=np.int64)
    print(f"test windows: {len(y)} of {x.shape[1] + 1} tokens from {spec['source']} "
          f"({spec['method']})")
    changed = changed_files(spec, "test", data)
    if changed:
        print(f"raw text changed since the export (sha256 differs or file gone): "
              f"{', '.join(changed)}")
    if len(y) != expected["samples"] or sha256([y]) != expected["targets_sha256"] \
            or sha256([x]) != expected["inputs_sha256"]:
        print("FAILED: checksum mismatch: the rebuilt test windows are not the ones the export "
              "scored (split.json's sha256 of the windows' tokens differs)")
        return 1
    print("windows: bit-identical to the export's (sha256 of inputs and targets match)")
    windows = np.concatenate([x[:, :1], y], axis=1)
    tolerance, failed = check["tolerance"], False
    pytorch = report.get("test", {}).get("pytorch")
    for file, figure in check["files"].items():
        path = HERE / file
        if not path.is_file():
            print(f"{file:<20} missing from this folder")
            failed = True
            continue
        value = gguf_perplexity(llama_cpp, path, windows, threads)
        reported = dotted(report, figure)
        beside = f" (PyTorch at export {pytorch:.6g})" if isinstance(pytorch, (int, float)) \
            and figure != "test.pytorch" else ""
        if not isinstance(reported, (int, float)):
            print(f"{file:<20} perplexity {value:.6g}   report has no perplexity to compare")
            continue
        diff = abs(value - reported) / max(abs(reported), 1e-12)
        ok = diff <= tolerance
        failed |= not ok
        print(f"{file:<20} perplexity {value:.6g}   report {reported:.6g}   "
              f"{'ok' if ok else 'DIFFERS'} ({diff:.3g} relative, tolerance {tolerance:g}; "
              f"report's {figure}){beside}")
    return 1 if failed else 0


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="where the data is now (npz file, image folder, "
                        "torchvision root, text root), if it moved since the export")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads for "
                        "model.gguf (the export measured with 1)")
    args = parser.parse_args(argv)
    spec = json.loads((HERE / "split.json").read_text())
    report = json.loads((HERE / "report.json").read_text())
    if report.get("format") == "gguf":
        return main_gguf(spec, report, args.data, args.threads)
    task, check = report["metric"], report["reproduce"]
    kind, name = task["kind"], task["name"]
    if kind != "classification" and name not in ("mse", "mae", "perplexity"):
        raise CannotRun(f"the metric {name!r} is the user's own function: not recomputed here")
    if kind == "classification":  # the report's test accuracy is top-1, whatever the metric
        name = "accuracy"
    figures = report[f"test_{name}"]

    x, y = load_split(spec, "test", args.data)
    expected = spec["checksums"]["test"]
    changed = changed_files(spec, "test", args.data)
    if changed:
        print(f"raw text changed since the export: {', '.join(changed)}")
    x = np.ascontiguousarray(x, dtype=np.int64 if np.issubdtype(x.dtype, np.integer)
                             else np.float32)  # as the ONNX files take them
    y = np.asarray(y, dtype=expected["targets_dtype"])
    print(f"test split: {len(y)} samples of {spec['source']} ({spec['method']})")
    if len(y) != expected["samples"] or sha256([y]) != expected["targets_sha256"]:
        print("FAILED: these are not the test samples the export scored (their targets differ "
              "from split.json's checksum)")
        return 1
    same = sha256([x]) == expected["inputs_sha256"]
    print("inputs: bit-identical to the export's" if same else
          "note: the preprocessed inputs are not bit-identical to the export's (another numpy "
          "or data library version?); the metrics below may differ slightly")

    tolerance, unit = check["tolerance"], check["tolerance_unit"]
    failed = False
    for file, key in check["files"].items():
        path = HERE / file
        if not path.is_file():
            continue
        run = runner(path)
        if run is None:
            print(f"{file:<20} skipped: needs autosparse (pip install autosparse)")
            continue
        reported = figures.get(key)
        if not isinstance(reported, (int, float)):
            print(f"{file:<20} skipped: report.json has no test figure {key!r} for it")
            continue
        value = metric(kind, name, run, x, y, spec["batch_size"])
        diff = abs(value - reported) if unit == "points" else \
            abs(value - reported) / max(abs(reported), 1e-12)
        ok = diff <= tolerance
        failed |= not ok
        print(f"{file:<20} {name} {value:.6g}   report {reported:.6g}   "
              f"{'ok' if ok else 'DIFFERS'} ({diff:.3g} {unit}, tolerance {tolerance:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CannotRun as err:
        print(f"cannot run: {err}")
        sys.exit(2)
