"""Seeds that are the same in every process, and fencing DEAP's use of the global ``random``."""

from __future__ import annotations

import hashlib
import random
import threading
from contextlib import contextmanager
from typing import Any, Iterator

# DEAP's operators draw from Python's global ``random``; swapping its state in and out must not
# interleave between threads (Optuna's ``n_jobs``), whichever sampler instance does it.
_GLOBAL_RANDOM_LOCK = threading.Lock()


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (unlike salted ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextmanager
def isolated_global_random(rng: random.Random) -> Iterator[None]:
    """Run a block with the global ``random`` state taken from ``rng``; restore the caller's after.

    The block must draw only from the global ``random`` module (as DEAP does); its draws advance
    ``rng``, and the caller's global state is exactly as before.
    """
    with _GLOBAL_RANDOM_LOCK:
        saved = random.getstate()
        random.setstate(rng.getstate())
        try:
            yield
        finally:
            rng.setstate(random.getstate())
            random.setstate(saved)
