"""The level database: every searchable layer compressed ONCE per level, stored as the export
writes it, and candidates stitched from it with no compression work.

Why: a language model is searched by scoring thousands of candidates (an assignment layer ->
``Level``); compressing per candidate would cost minutes each. Each layer is compressed once per
level on the DENSE model's calibration inputs (one dense pass gives every layer's ``LayerStats``;
see ``calibration`` for why dense inputs), the results are stored packed, and a candidate is
scored by writing the stored weights into the model (``assemble``) and running it.

Layout under ``root`` (the caller puts it at ``runs/<search>/levels/``)::

    manifest.json                       fingerprints, settings, grids, layers and their levels
    entries/<layer>/<level key>.lvl     one file per (layer, level), each written atomically

An entry file is ``ASLEVEL1``, a uint32 little-endian header length, a JSON header (format,
layer, level key, kind, shape, ggml_type or values, payload bytes and sha256, stored_bytes,
seconds to build) and the payload:

* quantized level (``bits`` set): the GGUF tensor data - rows of ggml blocks, made by
  ``RecordingGrid`` + ``pack`` from the weights ``compress_weight`` scored - so the exporter
  copies it (``packed``) and ``gguf.quants.dequantize`` reads back exactly the scored floats.
* sparse, unquantized: a bitmask (``np.packbits``, little bit order, row-major; a set bit marks
  a stored value, i.e. every weight whose float32 bits are not +0.0, so -0.0 survives) and the
  stored values as F16 when every one is exactly a half (an fp16 model's magnitude/Wanda
  levels), else BF16 when exactly bfloat16 (a bf16 model's), else F32 (an fp32 model's, and
  SparseGPT's updated weights). The header's ``values`` says which.
* dense: not stored; ``weight``/``packed`` read the model's own tensor.
The byte-level codec and the fingerprints live in ``level_files``.

Sparse + quantized: a GGUF tensor has no mask, so a pruned weight must be a value of the grid.
Levels with sparsity > 0 therefore use ``grid_for_bits(bits, exact_zero=True)`` - Q4_0 instead
of Q4_K at 4 bits, and 2 bits is refused (Q2_K subtracts a min and has no exact zero) - and the
manifest's ``grids`` records both mappings (``"4"``: Q4_K, ``"4+sparse"``: Q4_0).

Identity: the manifest holds a fingerprint of the model (each state-dict tensor's shape, dtype
and a sha256 of up to 65,536 evenly strided elements - cheap for 7 B, and retrained weights
differ everywhere; an edit confined to unsampled elements would pass), the calibration windows'
sha256, the compressor settings (blocksize, percdamp, act_order, batch_size: the Hessians'
float sums depend on the batching) and the grids. Opening or extending a database with another
model, calibration set, setting or grid raises ``DatabaseMismatch`` naming what differs. Methods
live in the level keys, so new levels (new methods, bits, sparsities) extend a database.

Resuming: entries are written with temp file + ``os.replace``, so an entry file is either whole
or absent; ``build_level_database`` skips every complete entry (a killed build resumes with
nothing rebuilt and nothing lost) and deletes stale temp files. One builder per root at a time.
Parallel builds over layers in several processes are left out (the manifest merge would need a
lock); on a GPU one process is the faster route.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import torch
from gguf import GGMLQuantizationType
from torch import nn

from autosparse.compress.oneshot import gguf_grids
from autosparse.compress.oneshot.calibration import LayerStats, collect_layer_stats
from autosparse.compress.oneshot.gguf_grids import (
    F16Grid,
    GGUFGrid,
    RecordingGrid,
    check_shape,
    pack,
)
from autosparse.compress.oneshot.layer_weights import (
    is_oneshot_layer,
    layer_weight,
    swap_layer_weight,
)
from autosparse.compress.oneshot.level_files import (
    FORMAT,
    TYPE_OF,
    VALUE_TYPES,
    CompressorSettings,
    DatabaseMismatch,
    as_level,
    check_manifest,
    decode,
    entry_bytes,
    model_fingerprint,
    read_header,
    sparse_payload,
    tensor_bytes,
    tokens_fingerprint,
    write_atomic,
)
from autosparse.compress.oneshot.levels import Level, compress_weight
from autosparse.compress.oneshot.streaming import streamed

__all__ = ["Assembled", "CompressorSettings", "DatabaseInfo", "DatabaseMismatch", "LevelDatabase",
           "assemble", "build_level_database", "compress_entry"]

MANIFEST = "manifest.json"
ENTRIES = "entries"
SUFFIX = ".lvl"

GridForBits = Callable[..., "gguf_grids.AnyGGUFGrid"]
Progress = Callable[[int, int, str, Level, float], None]


@dataclass
class DatabaseInfo:
    """What a database holds and what building it cost."""

    root: Path
    layers: int
    entries: int  # complete entry files
    missing: int  # listed in the manifest, not (yet) built
    bytes_on_disk: int  # entry files and manifest
    stored_bytes: int  # GGUF bytes of all entries (what ``stored_bytes`` says, summed)
    dense_bytes: int  # the layers' dense tensors in their dtype, once per layer
    build_seconds: float  # compression + packing, summed over entries (every build that wrote one)
    seconds_per_level: dict[str, float] = field(default_factory=dict)  # mean over layers
    built: int = 0  # entries this call built (build_level_database)
    seconds: float = 0.0  # this call's wall time, stats included
    stats_seconds: float = 0.0  # this call's calibration passes


# ------------------------------------------------------------------------------ the database


class LevelDatabase:
    """A built level database, opened for reading.

    ``model`` (optional) is checked against the manifest and serves the dense level;
    ``calibration_windows``/``settings`` are checked when given. ``weight`` keeps the last
    weights read in an LRU cache of ``cache_bytes``; the tensors it returns are shared with the
    cache: read them, do not modify them in place.
    """

    def __init__(
        self, root: Path | str, *, model: nn.Module | None = None,
        calibration_windows: torch.Tensor | None = None,
        settings: CompressorSettings | None = None, cache_bytes: int = 256 << 20,
    ) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no level database at {self.root}: {MANIFEST} is missing "
                                    "(build one with build_level_database)")
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DatabaseMismatch(f"the level database at {self.root} has format "
                                   f"{self.manifest.get('format')!r}, this code reads {FORMAT}")
        problems = check_manifest(self.manifest, model=model,
                                  calibration_windows=calibration_windows, settings=settings)
        if problems:
            raise DatabaseMismatch(f"the level database at {self.root} was built for something "
                                   f"else; {'; '.join(problems)}")
        self.model = model
        self._modules = dict(model.named_modules()) if model is not None else {}
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._cache_limit = cache_bytes
        self._cached = 0

    # --- what it holds ------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def fingerprint(self) -> str:
        """One hash of model, calibration, settings and grids (for files derived from scores)."""
        keys = ("model", "calibration", "settings", "grids")
        text = json.dumps({k: self.manifest[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _layer(self, layer: str) -> dict[str, Any]:
        if layer not in self.manifest["layers"]:
            raise KeyError(f"layer {layer!r} is not in the level database at {self.root}")
        return self.manifest["layers"][layer]

    def shape(self, layer: str) -> tuple[int, int]:
        rows, cols = self._layer(layer)["shape"]
        return rows, cols

    def levels(self, layer: str) -> list[Level]:
        """The dense level, then the layer's stored levels in the manifest's order."""
        return [Level()] + [Level.from_key(k) for k in self._layer(layer)["levels"]]

    def path(self, layer: str, level: Level | str) -> Path:
        return self.root / ENTRIES / quote(layer, safe="._-") / f"{as_level(level).key}{SUFFIX}"

    def has(self, layer: str, level: Level | str) -> bool:
        """Whether the entry is complete on disk (the dense level always is)."""
        level = as_level(level)
        if level.is_dense:
            return True
        try:
            read_header(self.path(layer, level))
        except (OSError, ValueError):
            return False
        return True

    def missing(self) -> list[tuple[str, str]]:
        return [(layer, lv.key) for layer in self.layers for lv in self.levels(layer)[1:]
                if not self.has(layer, lv)]

    def header(self, layer: str, level: Level | str) -> dict[str, Any]:
        level = as_level(level)
        if level.key not in self._layer(layer)["levels"]:
            raise KeyError(f"level {level.key!r} of {layer!r} is not in the level database "
                           f"(its levels: {self._layer(layer)['levels']})")
        try:
            return read_header(self.path(layer, level))[0]
        except (OSError, ValueError) as exc:
            raise KeyError(f"entry {layer!r} / {level.key!r} is not built ({exc}); rerun "
                           "build_level_database to finish the database") from None

    def _entry(self, layer: str, level: Level) -> tuple[dict[str, Any], bytes]:
        """An entry's header and payload (the file's tail), its checksum verified."""
        header = self.header(layer, level)
        path = self.path(layer, level)
        data = path.read_bytes()
        payload = data[len(data) - header["payload_bytes"]:]
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise ValueError(f"{path}: payload checksum mismatch (corrupt entry; delete it and "
                             "rerun build_level_database)")
        return header, payload

    def _dense_type(self, layer: str) -> str:
        name = self._layer(layer)["dtype"]
        if name not in VALUE_TYPES:
            raise ValueError(f"the dense {layer!r} is {name}; GGUF sizes are known for "
                             f"{sorted(VALUE_TYPES)} only")
        return name

    def _dense(self, layer: str) -> torch.Tensor:
        module = self._modules.get(layer)
        if module is None:
            raise ValueError(f"the dense level of {layer!r} is read from the model: open the "
                             "database with model=...")
        return layer_weight(module).detach().contiguous()  # a Conv1D's: a [out, in] copy

    # --- reading ------------------------------------------------------------------------------
    def weight(self, layer: str, level: Level | str) -> torch.Tensor:
        """float32 ``[out, in]`` on the CPU, exactly the stored weights (shared with the cache)."""
        level = as_level(level)
        if level.is_dense:
            return self._dense(layer).to(device="cpu", dtype=torch.float32, copy=True)
        key = (layer, level.key)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        w = decode(*self._entry(layer, level))
        self._cache[key] = w
        self._cached += w.numel() * 4
        while self._cached > self._cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.numel() * 4
        return w

    def stored_bytes(self, layer: str, level: Level | str) -> int:
        """Bytes of this tensor in the exported GGUF file. GGUF grid levels: exactly
        ``gguf_grids.stored_bytes(grid, rows, cols)``. Unquantized levels: the whole tensor in
        F16/BF16/F32 (the entry's values type; the model's dtype for dense), since GGUF stores
        a sparse tensor dense - the mask + values form is only this database's disk form."""
        level = as_level(level)
        rows, cols = self.shape(layer)
        if level.is_dense:
            type_name = self._dense_type(layer)
        else:
            header = self.header(layer, level)
            if header["kind"] == "gguf":
                return int(header["stored_bytes"])
            type_name = header["values"]
        return rows * cols * VALUE_TYPES[type_name].itemsize

    def packed(self, layer: str, level: Level | str) -> tuple[bytes, GGMLQuantizationType]:
        """The tensor data the exporter writes and its GGUF type (F16/BF16/F32 for unquantized)."""
        level = as_level(level)
        if level.is_dense:
            type_name = self._dense_type(layer)
            return tensor_bytes(self._dense(layer), type_name), GGMLQuantizationType[type_name]
        header = self.header(layer, level)
        if header["kind"] == "gguf":
            return self._entry(layer, level)[1], GGMLQuantizationType[header["ggml_type"]]
        return (tensor_bytes(self.weight(layer, level), header["values"]),
                GGMLQuantizationType[header["values"]])

    def info(self) -> DatabaseInfo:
        entries = missing = disk = stored = dense = 0
        seconds: dict[str, list[float]] = {}
        for layer in self.layers:
            dense += self.stored_bytes(layer, Level())
            for level in self.levels(layer)[1:]:
                if not self.has(layer, level):
                    missing += 1
                    continue
                header = self.header(layer, level)
                entries += 1
                disk += self.path(layer, level).stat().st_size
                stored += self.stored_bytes(layer, level)
                seconds.setdefault(level.key, []).append(float(header["seconds"]))
        return DatabaseInfo(
            root=self.root, layers=len(self.layers), entries=entries, missing=missing,
            bytes_on_disk=disk + (self.root / MANIFEST).stat().st_size, stored_bytes=stored,
            dense_bytes=dense, build_seconds=sum(sum(v) for v in seconds.values()),
            seconds_per_level={k: sum(v) / len(v) for k, v in seconds.items()})


# ---------------------------------------------------------------------------------- building


def _levels_per_layer(
    names: Sequence[str], levels: Mapping[str, Sequence[Level | str]] | Sequence[Level | str]
) -> dict[str, list[Level]]:
    if isinstance(levels, Mapping):
        if set(levels) != set(names):
            raise ValueError(f"levels: a dict must name exactly the layer_names; extra "
                             f"{sorted(set(levels) - set(names))}, missing "
                             f"{sorted(set(names) - set(levels))}")
        per = {name: list(levels[name]) for name in names}
    else:
        per = {name: list(levels) for name in names}
    return {name: list(dict.fromkeys(as_level(lv) for lv in lvls)) for name, lvls in per.items()}


def _grid_key(level: Level) -> str:
    return f"{level.bits}+sparse" if level.sparsity > 0 else f"{level.bits}"


def _grid(grid_for_bits: GridForBits, level: Level) -> gguf_grids.AnyGGUFGrid:
    """The GGUF grid of a quantized level: ``exact_zero`` for sparse levels (see the module)."""
    assert level.bits is not None
    sparse = level.sparsity > 0
    grid = grid_for_bits(level.bits, exact_zero=sparse)
    if not isinstance(grid, (GGUFGrid, F16Grid)):
        raise ValueError(  # noqa: TRY004 - every bad argument is a ValueError here
            f"grid_for_bits({level.bits}) gave {grid!r}: the level database stores GGUF bytes, "
            "so it needs a grid of gguf_grids")
    if sparse and not grid.exact_zero:
        raise ValueError(f"grid_for_bits({level.bits}, exact_zero=True) gave {grid.name}, which "
                         f"cannot store the zeros of level {level.key!r}")
    return grid


def lm_forward(model: nn.Module, batch: torch.Tensor) -> Any:
    """``model(batch)`` on the model's device; a transformers model without its key/value cache."""
    first = next(model.parameters())
    config = getattr(model, "config", None)
    batch = batch.to(first.device)
    return model(batch, use_cache=False) if hasattr(config, "use_cache") else model(batch)


def _needs_stats(level: Level) -> bool:
    return level.sparsity_method in ("wanda", "sparsegpt") or level.bits_method == "gptq"


def _on(stats: LayerStats | None, device: torch.device | str | None) -> LayerStats | None:
    if stats is None or device is None:
        return stats
    moved = LayerStats(stats.in_features, device="meta", dtype=stats.hessian.dtype)
    moved.hessian, moved.tokens = stats.hessian.to(device), stats.tokens
    return moved


def compress_entry(
    weight: torch.Tensor, stats: LayerStats | None, level: Level, grid_for_bits: GridForBits,
    settings: CompressorSettings,
) -> tuple[torch.Tensor, dict[str, Any], bytes]:
    """One entry: the compressed weight (float32, CPU), its header fields and its payload."""
    opts = {"blocksize": settings.blocksize, "percdamp": settings.percdamp,
            "act_order": settings.act_order}
    if level.bits is None:
        w = compress_weight(weight, stats, level, None, **opts).cpu()
        header, payload = sparse_payload(w)
        return w, header, payload
    recorder = RecordingGrid(_grid(grid_for_bits, level))
    w = compress_weight(weight, stats, level, lambda _bits: recorder, **opts).cpu()
    params = [None if p is None else replace(p, **{f.name: getattr(p, f.name).cpu()
                                                  for f in fields(p) if getattr(p, f.name) is not None})
              for p in recorder.params]  # GPU fits -> CPU for pack
    payload = pack(recorder.grid, w, params)
    return w, {"kind": "gguf", "ggml_type": recorder.grid.name, "stored_bytes": len(payload)}, payload


def _prepare_manifest(
    root: Path, model: nn.Module, windows: torch.Tensor, settings: CompressorSettings,
    grids: dict[str, str], per_layer: Mapping[str, list[Level]], modules: Mapping[str, nn.Module],
) -> None:
    """Write the manifest, or check the existing one and add the new levels and grids to it."""
    layers = {}
    for name, lvls in per_layer.items():
        w = layer_weight(modules[name])
        layers[name] = {"shape": list(w.shape), "dtype": TYPE_OF.get(w.dtype, str(w.dtype)),
                        "levels": [lv.key for lv in lvls if not lv.is_dense]}
    path = root / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        problems = (["format"] if old.get("format") != FORMAT else []) or check_manifest(
            old, model=model, calibration_windows=windows, settings=settings, grids=grids)
        if problems:
            raise DatabaseMismatch(f"the level database at {root} was built for something else; "
                                   f"{'; '.join(problems)} (use another folder, or delete it)")
        for name, entry in layers.items():
            known = old["layers"].get(name, {**entry, "levels": []})
            known["levels"] += [k for k in entry["levels"] if k not in known["levels"]]
            old["layers"][name] = known
        old["grids"].update(grids)
        manifest = old
    else:
        manifest = {"format": FORMAT, "model": model_fingerprint(model),
                    "calibration": {"fingerprint": tokens_fingerprint(windows),
                                    "shape": list(windows.shape)},
                    "settings": asdict(settings), "grids": grids, "layers": layers}
    write_atomic(path, (json.dumps(manifest, indent=1) + "\n").encode())


def build_level_database(
    model: nn.Module, layer_names: Sequence[str],
    levels: Mapping[str, Sequence[Level | str]] | Sequence[Level | str],
    calibration_windows: torch.Tensor, root: Path | str, *,
    grid_for_bits: GridForBits = gguf_grids.grid_for_bits,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    layers_at_once: int = 4, batch_size: int = 8, blocksize: int = 128, percdamp: float = 0.01,
    act_order: bool = False, device: torch.device | str | None = None,
    progress: Progress | None = None, stream: bool = False,
) -> DatabaseInfo:
    """Compress each named ``nn.Linear`` (or transformers ``Conv1D``, as ``[out, in]``) at each
    of its levels and store the entries under
    ``root``; entries already complete are skipped, so a killed build resumes where it stopped.

    ``levels``: one list for every layer, or a dict layer -> list naming exactly ``layer_names``
    (dense levels are accepted and not stored). ``grid_for_bits(bits, exact_zero=...)`` gives
    the GGUF grid of a bit-width. Per chunk of ``layers_at_once`` layers that still need
    entries::

        stats = one dense pass over calibration_windows (batches of batch_size), hooks on the
                chunk's layers that need statistics (wanda, sparsegpt, gptq) - H is in^2 floats
        for layer in chunk, level missing: compress_weight -> pack -> write entry atomically

    ``device`` (e.g. ``"cuda"``): each layer's weight and Hessian are moved there one layer at
    a time for compression (the result comes back to the CPU to be packed). The stats pass runs
    the model where the caller put it; with ``stream`` (the model on the CPU, larger than the
    device) it runs there one block at a time (``streaming.streamed``) and the Hessians
    accumulate on the device. ``progress(done, total, layer, level, seconds)``
    after each entry. Returns the database's ``DatabaseInfo`` with this call's figures.
    """
    started = time.perf_counter()
    root = Path(root)
    names = list(layer_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"layer_names must be non-empty and distinct, got {names}")
    if layers_at_once < 1 or batch_size < 1:
        raise ValueError(f"layers_at_once and batch_size must be >= 1, got {layers_at_once}, "
                         f"{batch_size}")
    windows = torch.as_tensor(calibration_windows, dtype=torch.long)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"calibration_windows must be [count, seq_len], got {tuple(windows.shape)}")
    per_layer = _levels_per_layer(names, levels)
    modules = dict(model.named_modules())
    grids: dict[str, str] = {}
    for name, lvls in per_layer.items():
        module = modules.get(name)
        if not is_oneshot_layer(module):
            raise ValueError(  # noqa: TRY004 - a bad name in layer_names, as above
                f"layer_names: {name!r} is {type(module).__name__ if module else 'absent'}, "
                "not an nn.Linear (or transformers Conv1D) of the model")
        for lv in lvls:
            if lv.bits is not None:
                grid = _grid(grid_for_bits, lv)
                check_shape(grid, layer_weight(module).shape, name)  # fail now, not hours in
                grids[_grid_key(lv)] = grid.name
    settings = CompressorSettings(blocksize, percdamp, act_order, batch_size)
    _prepare_manifest(root, model, windows, settings, grids, per_layer, modules)
    for stale in [*root.glob(".*.tmp"), *(root / ENTRIES).glob("*/.*.tmp")]:
        stale.unlink(missing_ok=True)  # a killed writer's leftovers (one builder per root)
    db = LevelDatabase(root)
    todo = {n: [lv for lv in lvls if not lv.is_dense and not db.has(n, lv)]
            for n, lvls in per_layer.items()}
    pending = [n for n in names if todo[n]]
    total, done, stats_seconds = sum(len(v) for v in todo.values()), 0, 0.0
    for i in range(0, len(pending), layers_at_once):
        chunk = pending[i:i + layers_at_once]
        wanted = [n for n in chunk if any(_needs_stats(lv) for lv in todo[n])]
        t0 = time.perf_counter()
        batches = windows.split(batch_size)
        stats = {}
        if wanted:
            with streamed(model, device if stream else None):
                stats = collect_layer_stats(model, wanted, batches, forward or lm_forward,
                                            stats_device=device if stream else None)
        stats_seconds += time.perf_counter() - t0
        for name in chunk:
            layer_stats = _on(stats.pop(name, None), device)
            # [out, in]; a Conv1D's transpose made contiguous, so it compresses bit for bit as
            # the equivalent Linear does
            weight = layer_weight(modules[name]).detach().contiguous()
            weight = weight.to(device) if device is not None else weight
            for lv in todo[name]:
                t0 = time.perf_counter()
                _, header, payload = compress_entry(weight, layer_stats, lv, grid_for_bits, settings)
                seconds = time.perf_counter() - t0
                header = {"format": FORMAT, "layer": name, "level": lv.key,
                          "shape": list(weight.shape), **header, "seconds": round(seconds, 4)}
                write_atomic(db.path(name, lv), entry_bytes(header, payload))
                done += 1
                if progress is not None:
                    progress(done, total, name, lv, seconds)
            del layer_stats, weight
    return replace(db.info(), built=done, seconds=time.perf_counter() - started,
                   stats_seconds=stats_seconds)


# ---------------------------------------------------------------------------------- assembly


class Assembled:
    """A context manager that puts stored levels into the model's Linear (and Conv1D) layers and restores the
    dense weights on exit (also when the body raises).

    Each assigned layer's ``weight.data`` is swapped for the level's weights (cast to the
    layer's dtype and device) and the dense tensor itself is kept aside - no copy of it, no
    copy of the model; unassigned and dense-assigned layers are untouched. Scoring only: the
    swapped-in tensors may be shared with the database's cache, so do not train inside. Nested
    uses restore in reverse order, as ``with`` blocks do. A weight tied to another module (one
    Parameter in both) changes in both, as it would in a file that stores it once.
    """

    def __init__(self, model: nn.Module, db: LevelDatabase,
                 assignment: Mapping[str, Level | str]) -> None:
        modules = dict(model.named_modules())
        known = set(db.layers)
        self.model, self.db = model, db
        self._plan: list[tuple[nn.Module, str, Level]] = []
        self._saved: list[tuple[nn.Module, torch.Tensor]] = []
        for name, level in assignment.items():
            module = modules.get(name)
            if not is_oneshot_layer(module) or name not in known:
                raise ValueError(f"assignment: {name!r} is not a Linear (or Conv1D) layer of "
                                 f"both the model and the level database")
            shape = tuple(layer_weight(module).shape)
            if shape != db.shape(name):
                raise ValueError(f"assignment: {name!r} has shape {shape}, the database "
                                 f"{db.shape(name)}")
            level = as_level(level)
            if not level.is_dense:
                self._plan.append((module, name, level))

    def __enter__(self) -> nn.Module:
        try:
            for module, name, level in self._plan:
                dense = module.weight.data
                new = self.db.weight(name, level).to(device=dense.device, dtype=dense.dtype)
                self._saved.append((module, swap_layer_weight(module, new)))
        except BaseException:
            self._restore()
            raise
        return self.model

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._saved:
            module, dense = self._saved.pop()
            module.weight.data = dense


def assemble(model: nn.Module, db: LevelDatabase, assignment: Mapping[str, Level | str]) -> Assembled:
    """``with assemble(model, db, {layer: level}):`` - the candidate, for the block's duration."""
    return Assembled(model, db, assignment)
