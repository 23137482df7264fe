"""Data: every ``DataConfig.source`` becomes the same three in-memory splits.

The search scores candidates on ``validation`` and reports ``test`` separately, so every source
is turned into fixed train/validation/test splits here, once, with normalisation statistics taken
from the train split only (never peeking at the splits used for scoring). Everything is held as
float32 tensors in memory: the fine-tune of each candidate re-reads the data many times, and the
sources supported here (digits, npz, small image folders, MNIST/CIFAR-sized torchvision sets) fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from autosparse.config.schema import ConfigError
from autosparse.config.sections import DataConfig, SplitConfig
from autosparse.workload.splits import SPLITS, DataSplits

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)
_VAL_SUFFIXES = ("val", "validation")


def load_data(cfg: DataConfig) -> DataSplits:
    """Load, split and normalise the data the config names."""
    if cfg.factory is not None:
        from autosparse.workload.data_factory import load_factory

        splits = load_factory(cfg)
        splits.fingerprint = data_fingerprint(cfg)
        return splits
    loaders: dict[str, Callable[[DataConfig], DataSplits]] = {
        "sklearn-digits": _load_digits,
        "npz": _load_npz,
        "image-folder": _load_image_folder,
        "torchvision": _load_torchvision,
        "sklearn-diabetes": _task_source("load_diabetes_splits"),  # regression (task.kind)
        "synthetic-tokens": _task_source("load_token_splits"),  # language model (task.kind)
    }
    if cfg.source == "text":  # next-token windows of local text, fingerprinted by its files
        from autosparse.workload.text_data import load_text_splits

        return load_text_splits(cfg, cfg.split_seed)
    splits = loaders[cfg.source](cfg)
    splits.fingerprint = data_fingerprint(cfg)
    return splits


def _task_source(name: str) -> Callable[[DataConfig], DataSplits]:
    """A built-in source of ``task_builtins`` (imported on use: it imports this module)."""
    def load(cfg: DataConfig) -> DataSplits:
        from autosparse.workload import task_builtins

        return getattr(task_builtins, name)(cfg)
    return load


def data_fingerprint(cfg: DataConfig) -> str:
    """A short hash of everything in the config that changes the tensors (not the batch size).

    For an npz file its size and modification time are included, so replacing the file
    invalidates caches keyed on the data.
    """
    payload = cfg.model_dump(mode="json", exclude={"batch_size"})
    if cfg.factory is not None:
        from autosparse.workload.data_factory import factory_stamp

        payload["file"] = factory_stamp(cfg.factory)
    elif cfg.source == "npz" and cfg.path and os.path.isfile(cfg.path):
        stat = os.stat(cfg.path)
        payload["file"] = [stat.st_size, stat.st_mtime_ns]
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------- splitting and normalising


def stratified_split(
    y: np.ndarray, fractions: tuple[float, ...], seed: int
) -> list[np.ndarray]:
    """Indices for each fraction, every class spread in proportion, exact global sizes.

    Each sample gets a rank ``(position in its shuffled class + u) / class size``; sorting by it
    interleaves the classes evenly, so cutting the sorted order at the global sizes gives every
    split about its fraction of every class, without per-class rounding drift.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    rank = np.empty(n, dtype=np.float64)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        order = rng.permutation(len(members))
        rank[members[order]] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    ordered = np.argsort(rank, kind="stable")
    sizes = [int(round(f * n)) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    if min(sizes) <= 0:
        raise ConfigError(
            f"data.split: {n} samples are too few for fractions {list(fractions)} "
            f"(split sizes would be {sizes})"
        )
    bounds = np.cumsum([0, *sizes])
    return [np.sort(ordered[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]


def index_range(bounds: tuple[int, int], n: int, name: str) -> np.ndarray:
    """The indices ``[start, end)`` of one split, refused when they run past the array."""
    start, end = bounds
    if end > n:
        raise ConfigError(f"data.split.{name}: index range [{start}, {end}) runs past the data, "
                          f"which has {n} samples (indices 0..{n - 1})")
    return np.arange(start, end)


def _fractions(split: SplitConfig) -> tuple[float, float, float]:
    return split.train, split.validation, split.test


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std per channel (axis 1; per feature for flat data); constant channels get std 1."""
    # one channel at a time keeps the float64 temporaries small on image-sized data
    mean = np.array([x[:, c].mean(dtype=np.float64) for c in range(x.shape[1])])
    std = np.array([x[:, c].std(dtype=np.float64) for c in range(x.shape[1])])
    std[std < 1e-12] = 1.0
    return mean, std


def _resolve_stats(cfg: DataConfig, train_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std from the config (length 1 or one per channel), else computed on the train split."""
    channels = train_x.shape[1]
    computed = None
    out = []
    for field in ("mean", "std"):
        given = getattr(cfg, field)
        if given is None:
            computed = computed or _channel_stats(train_x)
            out.append(computed[0 if field == "mean" else 1])
            continue
        if len(given) not in (1, channels):
            allowed = ("one value" if channels == 1 else
                       f"one value for every channel, or {channels} values, one per channel")
            raise ConfigError(
                f"data.{field} has {len(given)} values; the data has {channels} "
                f"channel{'s' if channels != 1 else ''}: give {allowed}"
            )
        values = np.asarray(given, dtype=np.float64).repeat(channels if len(given) == 1 else 1)
        if field == "std" and np.any(values <= 0):
            raise ConfigError(f"data.std values must be positive, got {given}")
        out.append(values)
    return out[0], out[1]


def _normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean32 = mean.astype(np.float32).reshape(shape)
    std32 = std.astype(np.float32).reshape(shape)
    return ((x - mean32) / std32).astype(np.float32, copy=False)


def _check_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Labels must be integers 0..K-1 (one per sample); return them as int64."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(
            f"{where}: labels must be one integer class index per sample, got shape {y.shape} "
            "(one-hot labels: store argmax instead)"
        )
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        floating = np.issubdtype(y.dtype, np.floating)
        integral = floating and np.all(np.isfinite(y)) and np.all(y == np.round(y))
        if not integral:
            raise ConfigError(
                f"{where}: labels must be integer class indices 0..K-1, "
                f"got non-integer {y.dtype} values"
            )
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ConfigError(f"{where}: labels must be class indices 0..K-1, found {int(y.min())}")
    return y


def _origin(raw: dict, method: str, **splits: tuple[dict, np.ndarray]) -> dict:
    """``DataSplits.origin``: the raw data, how it was split, and per split where its samples
    are (which raw array) and the indices into it, exactly as the split used them."""
    return {"raw": raw, "method": method,
            "splits": {name: {**where, "indices": np.asarray(indices, dtype=np.int64)}
                       for name, (where, indices) in splits.items()}}


def _make_splits(
    cfg: DataConfig,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: tuple[str, ...] | None = None,
    origin: dict | None = None,
) -> DataSplits:
    """Normalise with train statistics and wrap the three splits as TensorDatasets."""
    mean, std = _resolve_stats(cfg, parts["train"][0])
    datasets = {}
    for name in SPLITS:
        x, y = parts[name]
        datasets[name] = TensorDataset(
            torch.from_numpy(_normalise(x, mean, std)), torch.from_numpy(y)
        )
    num_classes = int(max(int(parts[name][1].max()) for name in SPLITS)) + 1
    if classes is not None:
        num_classes = max(num_classes, len(classes))
    return DataSplits(
        **datasets,
        input_shape=tuple(int(d) for d in parts["train"][0].shape[1:]),
        num_classes=num_classes,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        classes=classes,
        batch_size=cfg.batch_size,
        origin=origin,
    )


def _stratified_method(fractions: tuple[float, ...], seed: int) -> str:
    return (f"stratified by class: fractions {'/'.join(f'{f:g}' for f in fractions)}, "
            f"numpy default_rng({seed}) (autosparse.workload.data.stratified_split)")


def _split_by_fractions(
    cfg: DataConfig, x: np.ndarray, y: np.ndarray, classes: tuple[str, ...] | None = None,
    raw: dict | None = None, where: dict | None = None,
) -> DataSplits:
    """``raw``/``where``: what ``x`` is and where it lives, recorded with the indices."""
    ranges = cfg.split.ranges()
    if ranges is not None:
        train, val, test = (index_range(ranges[name], len(y), name) for name in SPLITS)
        method = "index ranges [start, end) of data.split into the one array"
    else:
        train, val, test = stratified_split(y, _fractions(cfg.split), cfg.split_seed)
        method = _stratified_method(_fractions(cfg.split), cfg.split_seed)
    parts = {
        "train": (x[train], y[train]),
        "validation": (x[val], y[val]),
        "test": (x[test], y[test]),
    }
    where = where or {}
    origin = _origin(raw or {}, method, train=(where, train), validation=(where, val),
                     test=(where, test))
    return _make_splits(cfg, parts, classes, origin)


def _carve_validation(cfg: DataConfig, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices splitting a fixed train set into train/validation by validation / (train +
    validation)."""
    if cfg.split.ranges() is not None:
        raise ConfigError("data.split: index ranges split one array; this source has a fixed "
                          "train/test split already (give data.split as fractions: "
                          "validation is carved from its train part)")
    ratio = cfg.split.validation / (cfg.split.train + cfg.split.validation)
    train, val = stratified_split(y, (1.0 - ratio, ratio), cfg.split_seed)
    return train, val


def _carved_method(cfg: DataConfig) -> str:
    ratio = cfg.split.validation / (cfg.split.train + cfg.split.validation)
    return ("the source's own test split as a whole; validation carved from its train split, "
            + _stratified_method((1.0 - ratio, ratio), cfg.split_seed))


def _to_float(x: np.ndarray) -> np.ndarray:
    """uint8 data is taken as 0..255 pixels and scaled to [0, 1], like torchvision's ToTensor."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        raise ConfigError(f"data: inputs must be numeric, got dtype {x.dtype}")
    return x.astype(np.float32)


# ---------------------------------------------------------------- sources


def _load_digits(cfg: DataConfig) -> DataSplits:
    """scikit-learn's 8x8 digits (1,797 images, ships with sklearn): the offline demo data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    raw = {"load": "sklearn.datasets.load_digits()", "samples": len(y),
           "x": "images.astype(float32) / 16.0 with a channel axis: (N, 1, 8, 8)",
           "y": "target as int64"}
    return _split_by_fractions(cfg, x, y, raw=raw)


_LAYOUT_NDIM = {"NCHW": 4, "NHWC": 4, "NCL": 3, "NLC": 3, "flat": 2}


def to_channels_first(x: np.ndarray, layout: str, where: str = "data") -> np.ndarray:
    """NHWC -> NCHW and NLC -> NCL; data missing only the channel axis gets one channel."""
    want = _LAYOUT_NDIM[layout]
    if layout != "flat" and x.ndim == want - 1:
        x = x[:, None] if layout in ("NCHW", "NCL") else x[..., None]
    if x.ndim != want:
        raise ConfigError(
            f"{where}: layout {layout} needs {want}-D inputs, got shape {tuple(x.shape)} "
            f"(allowed layouts: {', '.join(_LAYOUT_NDIM)})"
        )
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    elif layout == "NLC":
        x = x.transpose(0, 2, 1)
    return np.ascontiguousarray(x)


def _npz_array(arrays, key: str, path: str) -> np.ndarray:
    try:
        return arrays[key]
    except ValueError:  # numpy refuses object arrays (allow_pickle=False): never load those
        raise ConfigError(f"data ({path}:{key}): an object array (dtype=object), not numbers; "
                          "save numeric arrays (e.g. np.asarray(x, dtype=np.float32))") from None
    except (OSError, EOFError) as err:
        raise ConfigError(f"data ({path}:{key}): cannot read the array ({err})") from None


def _npz_pair(arrays, x_key: str, y_key: str, cfg: DataConfig, path: str):
    missing = [k for k in (x_key, y_key) if k not in arrays.files]
    if missing:
        raise ConfigError(
            f"data: {path} has no array {', '.join(repr(k) for k in missing)} "
            f"(it has: {', '.join(arrays.files) or 'nothing'}); set data.x_key / data.y_key"
        )
    x = to_channels_first(_to_float(_npz_array(arrays, x_key, path)), cfg.layout,
                          f"data ({path}:{x_key})")
    y = _check_labels(_npz_array(arrays, y_key, path), f"data ({path}:{y_key})")
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(
            f"data ({path}): {x_key} has {len(x)} samples and {y_key} has {len(y)} "
            "(need the same, non-zero number)"
        )
    return x, y


def _load_npz(cfg: DataConfig) -> DataSplits:
    """An npz file: one x/y pair split by fractions, or fixed ``_train``/``_val``/``_test`` keys.

    With ``x_train`` and ``x_test`` but no validation key, validation is carved from train.
    """
    path = str(cfg.path)
    if not os.path.isfile(path):
        raise ConfigError(f"data.path: npz file not found: {path}")
    with open(path, "rb") as handle:  # np.load takes anything else for a pickle and says so
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        raise ConfigError(f"data.path {path}: not an npz file (an npz is a zip archive written "
                          f"by numpy.savez; this file starts with {magic!r})")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path: cannot read {path} as an npz file: {err}") from None
    raw = {"load": f"numpy.load({os.path.abspath(path)!r})", "path": os.path.abspath(path),
           "layout": cfg.layout,
           "x": f"the array as float32 (uint8: / 255.0), put channel-first from {cfg.layout}",
           "y": "the labels as int64 class indices"}
    with arrays:
        files = set(arrays.files)
        if f"{cfg.x_key}_train" not in files:
            x, y = _npz_pair(arrays, cfg.x_key, cfg.y_key, cfg, path)
            return _split_by_fractions(cfg, x, y, raw={**raw, "samples": len(y)},
                                       where={"x": cfg.x_key, "y": cfg.y_key})
        train_keys = {"x": f"{cfg.x_key}_train", "y": f"{cfg.y_key}_train"}
        parts = {"train": _npz_pair(arrays, train_keys["x"], train_keys["y"], cfg, path)}
        val_suffix = next((s for s in _VAL_SUFFIXES if f"{cfg.x_key}_{s}" in files), None)
        if val_suffix is None:
            train, val = _carve_validation(cfg, parts["train"][1])
            x, y = parts["train"]
            parts["train"], parts["validation"] = (x[train], y[train]), (x[val], y[val])
            where_val, method = (train_keys, val), _carved_method(cfg)
        else:
            val_keys = {"x": f"{cfg.x_key}_{val_suffix}", "y": f"{cfg.y_key}_{val_suffix}"}
            parts["validation"] = _npz_pair(arrays, val_keys["x"], val_keys["y"], cfg, path)
            train = np.arange(len(parts["train"][1]))
            where_val = (val_keys, np.arange(len(parts["validation"][1])))
            method = "the file's own train, validation and test arrays, each as a whole"
        test_keys = {"x": f"{cfg.x_key}_test", "y": f"{cfg.y_key}_test"}
        parts["test"] = _npz_pair(arrays, test_keys["x"], test_keys["y"], cfg, path)
    shapes = {name: x.shape[1:] for name, (x, _) in parts.items()}
    if len(set(shapes.values())) != 1:
        raise ConfigError(f"data ({path}): the splits have different sample shapes: {shapes}")
    origin = _origin(raw, method, train=(train_keys, train), validation=where_val,
                     test=(test_keys, np.arange(len(parts["test"][1]))))
    return _make_splits(cfg, parts, origin=origin)


def _read_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None:
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except OSError as err:
        raise ConfigError(f"data: cannot read image {path}: {err}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _load_image_folder(cfg: DataConfig) -> DataSplits:
    """``path/<class>/<image>`` (like torchvision's ImageFolder, read with PIL, classes sorted)."""
    root = Path(str(cfg.path))
    if not root.is_dir():
        raise ConfigError(f"data.path: image folder not found: {root}")
    size = None
    if cfg.image_size is not None:
        if len(cfg.image_size) != 2 or min(cfg.image_size) < 1:
            raise ConfigError(
                "data.image_size must be [height, width] with positive values, "
                f"got {cfg.image_size}"
            )
        size = (int(cfg.image_size[0]), int(cfg.image_size[1]))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"data.path: {root} has no class sub-folders (expected {root}/<class>/<image>)"
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            p for p in (root / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise ConfigError(
                f"data.path: class folder {root / name} has no images "
                f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        files += [(p, label) for p in found]
    mode = "L" if cfg.grayscale else "RGB"
    images = [_read_image(p, mode, size) for p, _ in files]
    shapes = {img.shape[1:] for img in images}
    if len(shapes) > 1:
        raise ConfigError(
            f"data: images in {root} have different sizes {sorted(shapes)[:5]}; "
            "set data.image_size: [height, width] to resize them"
        )
    x = _to_float(np.stack(images))
    y = np.array([label for _, label in files], dtype=np.int64)
    raw = {"root": str(root.resolve()), "mode": mode, "size": list(size) if size else None,
           "samples": len(files),
           "x": f"each file read with PIL, converted to {mode}"
                + (f", resized to {size[0]}x{size[1]} (bilinear)" if size else "")
                + ", channel-first, uint8 / 255.0 as float32",
           "y": "the index of the file's class folder in 'classes'",
           "classes": list(classes),
           "files": [p.relative_to(root).as_posix() for p, _ in files],
           "labels": y.tolist()}
    return _split_by_fractions(cfg, x, y, classes=tuple(classes), raw=raw,
                               where={"from": "files"})


def _load_torchvision(cfg: DataConfig) -> DataSplits:
    """``torchvision.datasets.<name>(root=path, train=..., download=False)``, read into memory.

    Validation is carved from the official train split; test is the official test split.
    Not exercised by the test suite (torchvision is not installable beside this torch build).
    """
    try:
        import torchvision
        from torchvision.transforms import ToTensor
    except ImportError as err:
        raise RuntimeError(
            "data.source 'torchvision' needs the torchvision package: install the torchvision "
            f"release that matches torch {torch.__version__} ({err})"
        ) from None
    dataset_cls = getattr(torchvision.datasets, str(cfg.name), None)
    if not isinstance(dataset_cls, type):
        raise ConfigError(
            f"data.name: torchvision.datasets has no dataset {cfg.name!r} (e.g. MNIST, CIFAR10)"
        )

    def read(train: bool) -> tuple[np.ndarray, np.ndarray]:
        try:
            dataset = dataset_cls(root=cfg.path, train=train, download=False, transform=ToTensor())
        except TypeError as err:
            raise ConfigError(
                f"data.name: {cfg.name} does not take train=True/False ({err})"
            ) from None
        except RuntimeError as err:  # torchvision's "Dataset not found" when download=False
            raise ConfigError(f"data.path: {cfg.name} not found under {cfg.path}: {err}") from None
        xs, ys = [], []
        for x, y in DataLoader(dataset, batch_size=1000, num_workers=0):
            xs.append(x.numpy())
            ys.append(np.asarray(y))
        return np.concatenate(xs), _check_labels(np.concatenate(ys), f"data ({cfg.name})")

    train_x, train_y = read(train=True)
    parts = {"test": read(train=False)}
    train, val = _carve_validation(cfg, train_y)
    parts["train"], parts["validation"] = (train_x[train], train_y[train]), \
        (train_x[val], train_y[val])
    classes = getattr(dataset_cls, "classes", None)
    raw = {"load": f"torchvision.datasets.{cfg.name}(root={os.path.abspath(str(cfg.path))!r}, "
                   "train=..., download=False, transform=ToTensor())",
           "root": os.path.abspath(str(cfg.path)), "name": cfg.name,
           "x": "ToTensor(): channel-first float32 in [0, 1]", "y": "the dataset's label"}
    origin = _origin(raw, _carved_method(cfg), train=({"train": True}, train),
                     validation=({"train": True}, val),
                     test=({"train": False}, np.arange(len(parts["test"][1]))))
    return _make_splits(cfg, parts, tuple(classes) if isinstance(classes, (list, tuple)) else None,
                        origin)
