"""The vocabulary a config and a hardware profile name: sparsity patterns, bit-widths, criteria.

Plain constants and checks (stdlib only), so that validating a config never needs the search
space; ``space.candidate`` builds candidates from the same words.
"""

from __future__ import annotations

import re

UNSTRUCTURED = "unstructured"
CHANNEL = "channel"
DENSE = "dense"
CRITERIA = ("magnitude", "taylor")
FLOAT_BITS = 32
_NM_RE = re.compile(r"^(\d+):(\d+)$")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (keep N of every M weights); anything else -> None."""
    match = _NM_RE.match(pattern)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2))


def is_valid_pattern(pattern: str) -> bool:
    nm = parse_nm(pattern)
    if nm is not None:
        n, m = nm
        return 0 < n < m <= 32
    return pattern in (UNSTRUCTURED, CHANNEL, DENSE)


def is_valid_bits(bits: int) -> bool:
    """Integer weights from 2 to 16 bits, or 32 meaning float32 (not quantized)."""
    return bits == FLOAT_BITS or 2 <= bits <= 16
