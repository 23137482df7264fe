"""The three splits every data source becomes: train, validation and test, with their shape.

Its own module so that the data loaders, the user's data factories and the built-in task data
can all return it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "validation", "test")


@dataclass
class DataSplits:
    """The three splits plus what a model builder needs to know about one sample.

    ``mean``/``std`` are the per-channel normalisation already applied to the tensors (kept so
    that an exported model can document its preprocessing); ``fingerprint`` identifies the data
    for caches (the dense model is cached per data set).
    """

    train: Dataset
    validation: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None
    fingerprint: str = ""
    batch_size: int = 256  # data.batch_size: evaluation batches (training: finetune.batch_size)
    # data.factory: train/validation/test are the user's own iterables of (x, y) batches, used
    # as given (their batching, shuffling and workers); ``loader`` hands them out unchanged
    user_loaders: bool = False
    sample_counts: dict[str, int] | None = None  # samples per split, where known without a pass
    pin_memory: bool = False  # set when the search runs on CUDA (faster host-to-GPU copies)
    # where the samples came from, for an export's split.json: ``raw`` (the data as loaded,
    # before any split), ``method`` (how it was split) and ``splits`` (per split, the indices
    # into the raw data actually used, or the files and window offsets of text); None for a
    # user's data.factory, whose loaders are their own recipe
    origin: dict | None = None

    def split(self, name: str) -> Dataset:
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def samples(self, name: str) -> int:
        """Samples in a split (a user's loader: counted once on load)."""
        if self.sample_counts is not None and name in self.sample_counts:
            return self.sample_counts[name]
        if self.user_loaders:
            raise ValueError(f"the {name} loader of data.factory has no known sample count")
        return len(self.split(name))

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> DataLoader:
        """A single-process loader with its own seeded generator.

        The generator makes shuffling repeatable, and even an unshuffled loader draws a base
        seed from its generator each epoch: with a private one, iterating never disturbs the
        caller's global torch RNG.
        """
        dataset = self.split(split)
        if self.user_loaders:  # the user's loader decides batching and shuffling
            return dataset  # type: ignore[return-value]
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0,
            pin_memory=self.pin_memory,
        )
