"""The machine a profile is measured on: its fingerprint, and the cache a single core really has.

A measured profile is only true on the CPU it was fitted on: int8 on a CPU with VNNI ran
1.35-3.2x faster than a profile fitted on one without predicts (issue 10). So calibrate records
a fingerprint (CPU model, the ISA flags kernels dispatch on, runtime versions) and using the
profile on another CPU warns.

Cache capacities come from sysfs, but a VM's sysfs reports the host's whole L3 (300-480 MiB) as
this core's; a 25 MB model was then predicted 4.8x too fast. An implausible level is rejected
and the last-level capacity measured instead: a streaming-copy sweep over working sets from
16 KiB to 256 MiB, whose bandwidth knee is the capacity this core actually sees.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

CPUINFO = Path("/proc/cpuinfo")
SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")

# The ISA features CPU kernels (onnxruntime's MLAS, oneDNN) dispatch on, in display order.
KERNEL_FLAGS = ("fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile",
                "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "i8mm", "sve")
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}

# A cache level is implausible for one core when it exceeds 4 MiB per logical CPU this OS sees,
# with a floor of 16 MiB. Bare-metal CPUs stay below it (server parts ~1-2 MiB of L3 per thread;
# 32 MiB per 8-core CCX is 2 MiB per thread); a 2-vCPU VM that reports its host's 300 MiB L3
# does not. A false rejection (a big-L3 desktop part) costs only the sweep: measuring is never
# wrong, just slower than reading.
PLAUSIBLE_BYTES_PER_CPU = 4 * 1024 ** 2
PLAUSIBLE_FLOOR_BYTES = 16 * 1024 ** 2
# The bandwidth beyond the last trusted level must exceed the DRAM plateau by this factor for a
# knee to exist at all; else no faster level lies beyond it.
KNEE_MIN_RATIO = 1.25


class ProfileMachineWarning(UserWarning):
    """A measured profile is used on a CPU other than the one it was fitted on."""


# --- fingerprint ---------------------------------------------------------------------------------

def _cpuinfo_fields(path: Path) -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo (the first processor's block)."""
    fields: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    return fields


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fingerprint(cpuinfo: str | os.PathLike = CPUINFO,
                logical_cpus: int | None = None) -> dict[str, Any]:
    """CPU model, vendor, kernel-relevant ISA flags, logical CPUs and runtime versions.

    ``cpuinfo`` is a path so tests can give a fake file; versions are read from package
    metadata (importing torch just to read its version would cost seconds)."""
    fields = _cpuinfo_fields(Path(cpuinfo))
    model = next((fields[k] for k in ("model name", "Model", "Hardware", "cpu model")
                  if fields.get(k)), "") or platform.processor() or platform.machine() or "unknown"
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "cpu": re.sub(r"\s+", " ", model),
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer") or "unknown",
        "arch": platform.machine(),
        "flags": [flag for flag in KERNEL_FLAGS if flag in present],
        "logical_cpus": logical_cpus if logical_cpus is not None else os.cpu_count(),
        "onnxruntime": _version("onnxruntime"),
        "torch": _version("torch"),
    }


@lru_cache(maxsize=1)
def this_machine() -> dict[str, Any]:
    """The fingerprint of the machine running now (read once per process)."""
    return fingerprint()


def recorded_fingerprint(fitted: Mapping[str, Any], measured: bool = True) -> dict | None:
    """The fingerprint a profile's ``fitted`` section records, or None (datasheet profiles).

    Profiles calibrated before fingerprints existed record only ``fitted.cpu``: the CPU model
    is then compared alone."""
    machine = fitted.get("machine")
    if isinstance(machine, Mapping) and machine.get("cpu"):
        return dict(machine)
    if measured and isinstance(fitted.get("cpu"), str) and fitted["cpu"]:
        return {"cpu": fitted["cpu"]}
    return None


def _describe(fp: Mapping[str, Any]) -> str:
    if "flags" not in fp:
        return f"{fp['cpu']} (flags not recorded)"
    flags = list(fp["flags"])
    int8 = [] if VNNI_FLAGS & set(flags) else ["no VNNI"]
    return f"{fp['cpu']} ({', '.join(flags + int8) or 'no kernel flags'})"


def fingerprint_mismatch(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """One line saying why a profile measured on ``recorded`` may not hold on ``current``, or
    None when the CPU model and (where both record them) the kernel-relevant flags agree."""
    same_model = (re.sub(r"\s+", " ", str(recorded.get("cpu", ""))).strip()
                  == re.sub(r"\s+", " ", str(current.get("cpu", ""))).strip())
    both_flags = "flags" in recorded and "flags" in current
    same_flags = not both_flags or set(recorded["flags"]) == set(current["flags"])
    if same_model and same_flags:
        return None
    return (f"profile measured on {_describe(recorded)}; this machine is {_describe(current)}: "
            "its fp32 and int8 latencies may differ 1.3-3x (int8 most: VNNI and AMX change its "
            "kernels); run `autosparse calibrate` on this machine")


_WARNED: set[tuple[str, str]] = set()


def warn_if_other_machine(profile: Any, source: str | None = None,
                          current: Mapping[str, Any] | None = None) -> str | None:
    """Warn (once per profile and reason in this process) when a measured ``profile`` was fitted
    on another CPU; return the reason, or None. Datasheet profiles record no machine: silent."""
    recorded = recorded_fingerprint(profile.fitted, profile.measured)
    if recorded is None:
        return None
    reason = fingerprint_mismatch(recorded, current if current is not None else this_machine())
    if reason is None:
        return None
    message = f"hardware profile {source or profile.name}: {reason}"
    if (profile.name, reason) not in _WARNED:
        _WARNED.add((profile.name, reason))
        warnings.warn(message, ProfileMachineWarning, stacklevel=2)
    return reason


# --- cache capacities ----------------------------------------------------------------------------

def _size_bytes(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    return int(text.rstrip("KMGB")) * scale


def sysfs_caches(root: str | os.PathLike = SYSFS_CACHE) -> dict[int, int]:
    """Data/unified cache capacity per level as sysfs reports it for this core (empty where
    sysfs is absent)."""
    sizes: dict[int, int] = {}
    for index in sorted(Path(root).glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _size_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and size > 0:
            sizes[level] = size
    return dict(sorted(sizes.items()))


def plausible_limit(logical_cpus: int) -> int:
    """The largest cache capacity believed for one core (see PLAUSIBLE_BYTES_PER_CPU)."""
    return max(PLAUSIBLE_FLOOR_BYTES, PLAUSIBLE_BYTES_PER_CPU * max(1, logical_cpus))


@dataclass(frozen=True)
class Sweep:
    """The streaming sweep's working sets (bytes, increasing) and effort. The default took
    0.4-1.1 s on a 2-vCPU Xeon VM; tests pass a tiny one."""

    sizes: tuple[int, ...] = tuple(16 * 1024 * 2 ** i for i in range(15))  # 16 KiB .. 256 MiB
    repeats: int = 5
    bytes_per_repeat: int = 64 * 1024 ** 2

    def __post_init__(self) -> None:
        if not self.sizes or list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 2:
            raise ValueError(f"sweep sizes {self.sizes} must be distinct, increasing, >= 2 bytes")
        if self.repeats < 1 or self.bytes_per_repeat < 1:
            raise ValueError(f"repeats {self.repeats} and bytes_per_repeat "
                             f"{self.bytes_per_repeat} must be >= 1")


def bandwidth_sweep(sweep: Sweep = Sweep()) -> list[tuple[int, float]]:
    """(working set bytes, copy bandwidth bytes/s) for each size of ``sweep``.

    A working set of ``n`` bytes is a copy of n/2 bytes into another n/2: each call reads and
    writes it all. Each repeat times enough calls to move ``bytes_per_repeat``; the fastest
    repeat is kept, because on a shared machine a neighbour only ever slows a repeat down."""
    largest = sweep.sizes[-1] // 2
    src = np.ones(largest, dtype=np.uint8)
    dst = np.zeros(largest, dtype=np.uint8)  # both touched: no page faults in the timing
    points = []
    for size in sweep.sizes:
        half = max(1, size // 2)
        s, d = src[:half], dst[:half]
        calls = max(1, sweep.bytes_per_repeat // size)
        np.copyto(d, s)
        best = math.inf
        for _ in range(sweep.repeats):
            start = time.perf_counter()
            for _ in range(calls):
                np.copyto(d, s)
            best = min(best, (time.perf_counter() - start) / calls)
        points.append((size, 2 * half / max(best, 1e-12)))
    return points


def last_level_capacity(points: Sequence[tuple[int, float]], above: int = 0) -> int | None:
    """The working set at which bandwidth falls from the fastest level beyond ``above`` bytes
    to the DRAM plateau, or None when no faster level lies beyond ``above``.

    DRAM is the largest working set's bandwidth (the sweep must reach past every cache); the
    cache plateau the fastest point beyond ``above`` before it. The knee is where bandwidth,
    from that peak upwards, crosses their geometric mean, interpolated in log size and log
    bandwidth between the two sizes around it: caches are not perfect LRU, so bandwidth falls
    gradually, and half-way (in log) is where the level stops holding the working set. The
    interpolation keeps one noisy point from moving the answer by a whole factor of 2."""
    beyond = [(s, bw) for s, bw in points if s > above]
    if len(beyond) < 3:
        return None
    dram = beyond[-1][1]
    head = beyond[:-1]
    peak_index = max(range(len(head)), key=lambda i: head[i][1])
    peak = head[peak_index][1]
    if peak < KNEE_MIN_RATIO * dram:
        return None
    threshold = math.sqrt(peak * dram)
    for (s0, bw0), (s1, bw1) in zip(beyond[peak_index:], beyond[peak_index + 1:]):
        if bw1 < threshold:
            share = (math.log(bw0) - math.log(threshold)) / (math.log(bw0) - math.log(bw1))
            return int(round(math.exp(math.log(s0) + share * (math.log(s1) - math.log(s0)))))
    return head[-1][0]


@dataclass(frozen=True)
class CacheReport:
    """The cache capacities a calibration uses, closest first, and where they came from.

    source: ``sysfs`` (every level plausible, used as reported), ``measured`` (sysfs levels
    rejected as a VM's host-wide figures; the last level is the sweep's knee, the closer
    plausible levels stay sysfs's), ``none`` (no sysfs: the base profile's capacities stay)."""

    sizes: list[int]
    source: str
    sysfs: dict[int, int]
    rejected: dict[int, int] = field(default_factory=dict)
    limit: int = 0
    sweep: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """For the profile's ``fitted`` section (YAML: plain ints, floats and lists)."""
        data: dict[str, Any] = {
            "source": self.source,
            "sizes_bytes": [int(s) for s in self.sizes],
            "sysfs_bytes": {f"L{level}": int(size) for level, size in self.sysfs.items()},
        }
        if self.rejected:
            data["sysfs_rejected"] = {f"L{level}": int(size)
                                      for level, size in self.rejected.items()}
            data["rule"] = (f"a level above {self.limit / 1024 ** 2:.0f} MiB (4 MiB per "
                            "logical CPU, at least 16 MiB) is a VM's host-wide figure")
        if self.sweep:
            data["sweep_kib_gb_per_s"] = [[int(s // 1024), round(bw / 1e9, 2)]
                                          for s, bw in self.sweep]
        return data


def effective_caches(root: str | os.PathLike = SYSFS_CACHE, logical_cpus: int | None = None,
                     sweep: Sweep = Sweep()) -> CacheReport:
    """This core's cache capacities: sysfs's where plausible, else the measured knee."""
    reported = sysfs_caches(root)
    if not reported:
        return CacheReport([], "none", {})
    cpus = logical_cpus if logical_cpus is not None else (os.cpu_count() or 1)
    limit = plausible_limit(cpus)
    kept = []
    for level, size in reported.items():
        if size > limit:
            break
        kept.append(size)
    if len(kept) == len(reported):
        return CacheReport(kept, "sysfs", reported, limit=limit)
    rejected = dict(list(reported.items())[len(kept):])
    points = bandwidth_sweep(sweep)
    above = kept[-1] if kept else 0
    knee = last_level_capacity(points, above)
    last = knee if knee is not None else (above or points[0][0])
    return CacheReport([*kept, last], "measured", reported, rejected, limit, points)
