"""The level database's files: entry encoding, atomic writes, and the fingerprints that tie a
database to one model, one calibration set and one set of compressor settings.

Split from ``database`` (which opens, builds and assembles) so each stays small. Formats are
described in ``database``'s docstring; here is the byte-level code:

* entry file = ``MAGIC`` + uint32 LE header length + JSON header + payload; the header carries
  the payload's length (a short file is not a whole entry) and sha256 (checked on read);
* sparse payload = ``np.packbits(stored, bitorder="little")`` + stored values in the narrowest
  of F16, BF16, F32 that holds every one exactly; GGUF payload = ggml blocks as ``pack`` wrote;
* model fingerprint = per state-dict tensor ``"[shape]|dtype|digest"``, digest = sha256 of up
  to ``SAMPLE`` evenly strided elements (hashing every byte of a 7 B model would take seconds
  on every open; retrained weights differ everywhere, so a sample finds them).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from autosparse.compress.oneshot.levels import Level

FORMAT = 1
MAGIC = b"ASLEVEL1"
SAMPLE = 1 << 16  # elements of each tensor hashed into the model fingerprint
VALUE_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
TYPE_OF = {v: k for k, v in VALUE_TYPES.items()}


class DatabaseMismatch(ValueError):
    """The database on disk was built for another model, calibration set, settings or grids."""


@dataclass(frozen=True)
class CompressorSettings:
    """What, besides the level, decides an entry's weights."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    batch_size: int = 8  # calibration windows per forward: the Hessians' float sums depend on it


# ------------------------------------------------------------------------------ fingerprints


def tensor_digest(t: torch.Tensor, sample: int = SAMPLE) -> str:
    """sha256 (16 hex) of up to ``sample`` evenly strided elements' bytes."""
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // sample)
    part = flat[::stride][:sample].contiguous().cpu()
    return hashlib.sha256(part.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """``name -> "[shape]|dtype|digest"`` for every state-dict tensor of ``model``."""
    return {name: f"{list(t.shape)}|{str(t.dtype).removeprefix('torch.')}|{tensor_digest(t)}"
            for name, t in model.state_dict().items()}


def tokens_fingerprint(windows: torch.Tensor) -> str:
    """sha256 (16 hex) of a token tensor's shape and int64 values."""
    w = torch.as_tensor(windows, dtype=torch.long).detach().cpu().contiguous()
    digest = hashlib.sha256(json.dumps(list(w.shape)).encode())
    digest.update(w.numpy().tobytes())
    return digest.hexdigest()[:16]


def _names(items: Iterable[str], limit: int = 4) -> str:
    items = sorted(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _model_differences(stored: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    out = []
    if missing := set(stored) - set(now):
        out.append(f"tensors missing from the model: {_names(missing)}")
    if extra := set(now) - set(stored):
        out.append(f"tensors the database does not know: {_names(extra)}")
    common = set(stored) & set(now)
    shape = {n for n in common if stored[n].rsplit("|", 1)[0] != now[n].rsplit("|", 1)[0]}
    if shape:
        out.append(f"tensors whose shape or dtype differ: {_names(shape)}")
    if weights := {n for n in common - shape if stored[n] != now[n]}:
        out.append(f"tensors whose weights differ: {_names(weights)}")
    return out


def check_manifest(
    manifest: Mapping[str, Any], *, model: nn.Module | None = None,
    calibration_windows: torch.Tensor | None = None,
    settings: CompressorSettings | None = None, grids: Mapping[str, str] | None = None,
) -> list[str]:
    """What differs between ``manifest`` and the given model/calibration/settings/grids (the
    ones given; ``[]`` when all match)."""
    problems = []
    if model is not None:
        diff = _model_differences(manifest["model"], model_fingerprint(model))
        problems += [f"model: {d}" for d in diff]
    if calibration_windows is not None:
        calibration_windows = torch.as_tensor(calibration_windows)
        now = tokens_fingerprint(calibration_windows)
        old = manifest["calibration"]
        if now != old["fingerprint"]:
            problems.append(f"calibration tokens: built on windows {old['shape']} with fingerprint "
                            f"{old['fingerprint']}, given {list(calibration_windows.shape)} with "
                            f"fingerprint {now}")
    if settings is not None:
        old, new = manifest["settings"], asdict(settings)
        changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        if changed:
            problems.append(f"compressor settings: {', '.join(changed)}")
    if grids is not None:
        old = manifest["grids"]
        changed = [f"{k} bits {old[k]} -> {v}" for k, v in grids.items() if old.get(k, v) != v]
        if changed:
            problems.append(f"grids: {', '.join(changed)}")
    return problems


# ------------------------------------------------------------------------------- entry files


def as_level(level: Level | str) -> Level:
    return level if isinstance(level, Level) else Level.from_key(level)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, ``os.replace``: the name holds all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def entry_bytes(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps({**header, "payload_bytes": len(payload),
                       "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of an entry file and the payload's offset; ValueError if not a whole entry."""
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + 4)
        if len(start) < len(MAGIC) + 4 or start[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a level entry")
        (size,) = struct.unpack("<I", start[len(MAGIC):])
        header = json.loads(f.read(size))
    offset = len(MAGIC) + 4 + size
    if path.stat().st_size != offset + header["payload_bytes"]:
        raise ValueError(f"{path} is truncated")
    return header, offset


def sparse_payload(w: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    """Bitmask of the stored values (bits not +0.0) and those values in the narrowest exact type."""
    flat = w.reshape(-1)
    stored = flat.view(torch.int32) != 0
    values = flat[stored]
    for name, dtype in VALUE_TYPES.items():
        cast = values.to(dtype)
        if torch.equal(cast.float().view(torch.int32), values.view(torch.int32)):
            break
    mask = np.packbits(stored.numpy(), bitorder="little").tobytes()
    header = {"kind": "sparse", "values": name, "mask_bytes": len(mask), "kept": int(values.numel())}
    return header, mask + cast.contiguous().view(torch.uint8).numpy().tobytes()


def decode(header: Mapping[str, Any], payload: bytes) -> torch.Tensor:
    """The float32 weight an entry stores."""
    rows, cols = header["shape"]
    if header["kind"] == "gguf":
        qtype = GGMLQuantizationType[header["ggml_type"]]
        data = np.frombuffer(payload, dtype=np.uint8).reshape(rows, -1)
        return torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype), dtype=np.float32))
    n_mask = header["mask_bytes"]
    bits = np.unpackbits(np.frombuffer(payload, np.uint8, count=n_mask), count=rows * cols,
                         bitorder="little").astype(bool)
    out = torch.zeros(rows * cols)
    if header["kept"]:
        raw = bytearray(payload[n_mask:])
        out[torch.from_numpy(bits)] = torch.frombuffer(raw, dtype=VALUE_TYPES[header["values"]]).float()
    return out.reshape(rows, cols)


def tensor_bytes(t: torch.Tensor, type_name: str) -> bytes:
    return t.detach().to(VALUE_TYPES[type_name]).contiguous().cpu().view(torch.uint8).numpy().tobytes()
