"""An export's test figures, reproducible from the raw data: ``split.json`` and ``reproduce.py``.

The report's test metric can only be checked by someone who knows which raw samples formed the
test split and what was done to them. ``split.json`` records it for every source, taken from
the split itself (``DataSplits.origin``: the indices the loader actually used, never recomputed
here): the source and its config section, the split method and seed, per split the indices into
the raw data as loaded (for text the files and the windows' offsets into their joined tokens),
the preprocessing step by step with its numbers, and sha256 checksums of the validation and test
targets and inputs exactly as the search held them. A user's ``data.factory`` has no indices (its
loaders are the recipe): the factory, its kwargs, the sample counts and the checksums of what its
loaders yielded, in order. ``reproduce.py`` (``reproduce_script``, copied verbatim) rebuilds the
test split from that, recomputes the test metric of every model file and compares it with the
report within ``report.json``'s ``reproduce.tolerance``. A one-shot export (``model.gguf``) gets
the same two files (``write_gguf_reproduction``): the script then rebuilds the test windows and
recomputes the file's test perplexity in llama.cpp, needing only numpy and llama-cpp-python.
For text, split.json also holds the sha256 of each validation and test file, so a corpus edited
since the export is named file by file.

Why a file of its own and not a section of report.json: the index lists run to thousands of
numbers, which a reader of report.json (and the MLflow run it is logged to) does not want to
wade through, and every export of one search shares the same split.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from autosparse.config.sections import DataConfig
from autosparse.cost.onnx_files import input_array
from autosparse.search.context import SearchContext
from autosparse.workload.splits import SPLITS, DataSplits

SPLIT_FILE = "split.json"
SCRIPT_FILE = "reproduce.py"
SCRIPT_SOURCE = Path(__file__).with_name("reproduce_script.py")
# model file -> its column in the report's test figures; files not listed are not re-scored
FILE_KEYS = {"model.onnx": "onnx", "model.int8.onnx": "onnx_int8",
             "model.compact.onnx": "onnx_compact", "model.pt2": "pt2", "model.packed": "packed"}
# how far reproduce.py's figure may be from the report's: a percentage within one test sample
# (at least MIN_POINTS points: another CPU's int8 kernels may flip a borderline sample), any
# other metric within RELATIVE of the report's value
MIN_POINTS = 0.1
RELATIVE = 1e-3
_LIBRARY = {"sklearn-digits": "scikit-learn", "sklearn-diabetes": "scikit-learn",
            "image-folder": "Pillow", "torchvision": "torchvision"}


def _plain(value):
    """numpy arrays and scalars as JSON's lists and numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dumps(value, level: int = 0) -> str:
    """JSON with objects indented and lists of plain values on one line (index lists)."""
    pad = "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(k)}: {dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [pad + dumps(v, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"
    return json.dumps(value)


def checksums(data: DataSplits, split: str) -> dict:
    """sha256 of one split's targets and inputs as the search held them, in its order; the
    inputs as the exported models take them (float32, or int64 token ids)."""
    targets, inputs = hashlib.sha256(), hashlib.sha256()
    samples, first_batch, dtypes = 0, None, ("", "")
    for x, y in data.loader(split, data.batch_size):
        x, y = input_array(np.asarray(x)), np.ascontiguousarray(np.asarray(y))
        inputs.update(x.tobytes())
        targets.update(y.tobytes())
        samples += len(y)
        first_batch = first_batch or len(y)
        dtypes = (str(x.dtype), str(y.dtype))
    return {"samples": samples, "targets_sha256": targets.hexdigest(),
            "targets_dtype": dtypes[1], "inputs_sha256": inputs.hexdigest(),
            "inputs_dtype": dtypes[0], "first_batch": first_batch}


def preprocessing(cfg: DataConfig, data: DataSplits, raw: dict) -> dict:
    """What turns a raw sample into the model's input, step by step, with its numbers."""
    shape = ["batch", *data.input_shape]
    if cfg.factory is not None:
        return {"normalise": "none", "shape": shape,
                "steps": [(f"x and y exactly as the loaders of {cfg.factory} yield them "
                           "(their own transforms; autosparse adds none)"),
                          "x as float32 (integer token ids as int64) for the model files"]}
    if cfg.source in ("text", "synthetic-tokens"):
        return {"normalise": "none", "dtype": "int64", "shape": shape,
                "steps": [f"x = {raw['x']}", f"y = {raw['y']}", "no normalisation"]}
    mean, std = list(data.mean or ()), list(data.std or ())
    if cfg.source == "sklearn-diabetes":
        stats = "the train split's per-feature mean and std (float32; std + 1e-8)"
    else:
        stats = " and ".join([
            f"{name} from data.{name} of the config" if given is not None else
            f"{name} of the train split per channel (float64"
            + ("; a constant channel gets std 1)" if name == "std" else ")")
            for name, given in (("mean", cfg.mean), ("std", cfg.std))])
    out = {"normalise": "per-channel", "mean": mean, "std": std, "stats": stats,
           "dtype": "float32", "shape": shape,
           "steps": [f"x = {raw['x']}",
                     (f"x = (x - mean[c]) / std[c] in float32 with mean {mean} and std {std}, "
                      f"c the channel (axis 1; the feature of flat data); {stats}"),
                     f"y = {raw['y']}"]}
    if "target_mean" in raw:  # sklearn-diabetes: the target is standardised too
        out["target"] = {"mean": raw["target_mean"], "std": raw["target_std"]}
        out["steps"].append("y = (y - target.mean) / target.std in float32 (the train split's "
                            "target mean and std): the mse is in these units")
    return out


def split_record(cfg: DataConfig, data: DataSplits) -> dict:
    """split.json: which samples form each split, how they are preprocessed, and checksums."""
    record: dict = {"format": 1, "source": "data.factory" if cfg.factory else cfg.source,
                    "data": cfg.model_dump(mode="json"), "split_seed": cfg.split_seed,
                    "batch_size": data.batch_size}
    origin = data.origin or {}
    if cfg.factory is not None:
        record.update(factory=cfg.factory, kwargs=cfg.kwargs, cwd=os.getcwd(),
                      method="the factory's own loaders, each split as its loader yields it "
                             "(order and count below; the checksums pin the samples)")
    else:
        record.update(raw=origin.get("raw", {}), method=origin.get("method", "unknown"))
    record["checksums"] = {name: checksums(data, name) for name in ("validation", "test")}
    record["splits"] = {}
    for name in SPLITS:
        part = dict(origin.get("splits", {}).get(name, {}))
        known = record["checksums"].get(name, {}).get("samples")
        if known is None:
            try:
                known = data.samples(name)
            except ValueError:  # a factory's train loader of unknown length
                known = None
        record["splits"][name] = {"samples": known, **part}
    if cfg.factory is not None:  # the user's batches, re-batched alike by reproduce.py
        record["batch_size"] = record["checksums"]["test"]["first_batch"]
    record["preprocessing"] = preprocessing(cfg, data, record.get("raw", {}))
    if record["source"] == "text":  # so reproduce.py can name a raw file edited since
        root = Path(record["raw"]["root"])
        for name in ("validation", "test"):
            part = record["splits"][name]
            part["files_sha256"] = [hashlib.sha256((root / f).read_bytes()).hexdigest()
                                    for f in part.get("files", [])]
    return _plain(record)


def _split_sentence(record: dict) -> str:
    test = record["splits"]["test"]
    count = f"{test['samples']:,} test samples"
    if record["source"] == "data.factory":
        return (f"the {count} that the test loader of `{record['factory']}(**kwargs)` yields, in "
                "its order; split.json holds the factory, its kwargs and sha256 checksums of the "
                "targets and inputs (no indices: the factory is the recipe)")
    if record["source"] == "text":
        return (f"{count} (token windows) from {len(test['files'])} test files under "
                f"{record['raw']['root']}: {record['method']}; the files and each window's "
                "offset are in split.json")
    total = record.get("raw", {}).get("samples")
    of = f" (of {total:,})" if total else ""
    return (f"{count}{of} of {record['source']}, {record['method']}; their indices into the raw "
            "data as loaded are in split.json (validation and train too)")


def reproduce_section(record: dict, report: dict, out: Path) -> dict:
    """report.json's ``reproduce``: the script, the split file and the tolerance it checks."""
    samples = record["splits"]["test"]["samples"] or 1
    percent = report["metric"]["kind"] == "classification"
    requires = ["numpy", "onnxruntime", "torch"]
    library = _LIBRARY.get(record["source"])
    if record["source"] == "text" and record["raw"]["tokenizer"] != "bytes":
        library = "transformers"
    requires += [library] if library else []
    pre = record["preprocessing"]
    return {
        "command": f"python {SCRIPT_FILE}", "script": SCRIPT_FILE, "split_file": SPLIT_FILE,
        "split_sha256": hashlib.sha256((out / SPLIT_FILE).read_bytes()).hexdigest(),
        "tolerance": max(100.0 / samples, MIN_POINTS) if percent else RELATIVE,
        "tolerance_unit": "points" if percent else "relative",
        "files": {name: key for name, key in FILE_KEYS.items() if (out / name).is_file()},
        "requires": requires, "packed_requires": "autosparse",
        "split": _split_sentence(record),
        "preprocessing": "; ".join(pre["steps"]),
    }


def write_reproduction(context: SearchContext, report: dict, out: Path) -> None:
    """Write split.json and reproduce.py into ``out``; the report gains ``reproduce`` and the
    two files' sizes."""
    record = split_record(context.config.data, context.data)
    (out / SPLIT_FILE).write_text(dumps(record) + "\n")
    shutil.copyfile(SCRIPT_SOURCE, out / SCRIPT_FILE)
    report["reproduce"] = reproduce_section(record, report, out)
    files = dict(report.get("files_bytes", {}))
    files.update({name: (out / name).stat().st_size for name in (SPLIT_FILE, SCRIPT_FILE)})
    report["files_bytes"] = dict(sorted(files.items()))



WINDOW_STEP = "each test window (x[0] then y) is scored in llama.cpp from an empty context"


def gguf_reproduce_section(record: dict, report: dict, out: Path,
                           fallback_tolerance: float) -> dict:
    """report.json's ``reproduce`` of a one-shot (GGUF) export: reproduce.py recomputes
    ``model.gguf``'s test perplexity in llama.cpp. ``files`` maps it to the report's figure as a
    dotted path: llama.cpp's own figure (the same computation, within RELATIVE), or, where the
    export could not run llama.cpp, PyTorch's within ``fallback_tolerance`` (the export's own
    llama.cpp-against-PyTorch bar)."""
    measured = bool(report.get("llama_cpp", {}).get("measured"))
    perplexity = report.get("metric") == "perplexity"
    figure = "llama_cpp.perplexity" if measured else "test.pytorch" if perplexity else None
    requires = ["numpy", "llama-cpp-python"]
    if record["source"] == "text" and record["raw"]["tokenizer"] != "bytes":
        requires.append("transformers")
    return {
        "command": f"python {SCRIPT_FILE}", "script": SCRIPT_FILE, "split_file": SPLIT_FILE,
        "split_sha256": hashlib.sha256((out / SPLIT_FILE).read_bytes()).hexdigest(),
        "runtime": "llama.cpp (llama-cpp-python), 1 thread, F32 key/value cache",
        "metric": "perplexity", "files": {"model.gguf": figure},
        "tolerance": RELATIVE if measured else fallback_tolerance,
        "tolerance_unit": "relative", "requires": requires,
        "split": _split_sentence(record),
        "preprocessing": "; ".join(record["preprocessing"]["steps"]
                                   + [WINDOW_STEP]),
    }


def write_gguf_reproduction(context: SearchContext, report: dict, out: Path,
                            fallback_tolerance: float) -> None:
    """split.json and reproduce.py of a one-shot export (the same two files as a fine-tune
    export's; the script runs model.gguf in llama.cpp); the report gains ``reproduce`` and
    ``files_bytes``."""
    record = split_record(context.config.data, context.data)
    (out / SPLIT_FILE).write_text(dumps(record) + "\n")
    shutil.copyfile(SCRIPT_SOURCE, out / SCRIPT_FILE)
    report["reproduce"] = gguf_reproduce_section(record, report, out, fallback_tolerance)
    report["files_bytes"] = {name: (out / name).stat().st_size
                             for name in ("model.gguf", SPLIT_FILE, SCRIPT_FILE)}
