"""Seeds that are the same in every process (per trial, for every sampler that draws at random),
and fencing DEAP's use of the global ``random``."""

from __future__ import annotations

import hashlib
import random
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import optuna

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


def trial_seed(seed: int, number: int) -> int:
    """A numpy-sized (32-bit) seed for trial ``number`` of a search seeded with ``seed``."""
    return stable_seed(seed, number) % 2**32


class TrialSeededRandomSampler(optuna.samplers.RandomSampler):
    """Optuna's RandomSampler with its generator reseeded from ``(seed, trial.number)`` before
    each trial, as the GA does.

    One generator seeded once per process repeats its sequence in every process: a resumed
    search re-proposed its first trials (cache hits that spent the budget) and two workers, or
    two machines, proposed the same candidates side by side. Trial numbers are unique across
    all of a study's processes, so keying on them gives each trial its own draw while one
    process with a given seed still repeats exactly.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
        self._seed = seed

    def before_trial(self, study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
        super().before_trial(study, trial)
        if self._seed is not None:
            self._rng.rng.seed(trial_seed(self._seed, trial.number))


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPESampler whose generators (its own and its startup RandomSampler's) are reseeded from
    ``(seed, trial.number)`` before each trial: see :class:`TrialSeededRandomSampler`."""

    def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, seed=seed, **kwargs)
        self._trial_seed_base = seed

    def before_trial(self, study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
        super().before_trial(study, trial)
        if self._trial_seed_base is not None:
            self._rng.rng.seed(trial_seed(self._trial_seed_base, trial.number))
            self._random_sampler._rng.rng.seed(
                trial_seed(self._trial_seed_base + 1, trial.number))
