"""An example ``data.factory``: your own Dataset and DataLoader, plugged into a search.

``search_spaces/custom-loader.yaml`` points at :func:`make_loaders`. It serves scikit-learn's
8x8 digits through a user-written ``Dataset`` with an augmentation (a random one-pixel shift)
on the train split only, as a training pipeline of one's own would: the search uses the
loaders exactly as returned (their batch size, shuffling and normalisation).

Copy this file next to your config, replace the Dataset, and set
``data.factory: "my_module:make_loaders"``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class DigitsDataset(Dataset):
    """8x8 digit images as (1, 8, 8) float tensors in [0, 1], optionally shifted at random."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, shift: bool = False):
        self.images = torch.from_numpy(images.astype(np.float32)[:, None] / 16.0)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.shift = shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.shift:  # torch's RNG: seeded by the DataLoader's generator and worker seeds
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,)))
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        return image, self.labels[index]


def make_loaders(batch_size: int = 64, augment: bool = True, seed: int = 0,
                 limit: int | None = None) -> dict[str, DataLoader]:
    """Train / validation / test loaders over a fixed 60/20/20 split of the digits.

    ``limit`` keeps only the first samples of each split (for quick tests).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = [0, int(0.6 * len(order)), int(0.8 * len(order)), len(order)]
    loaders = {}
    for i, name in enumerate(("train", "validation", "test")):
        index = order[cut[i]:cut[i + 1]][:limit]
        train = name == "train"
        dataset = DigitsDataset(digits.images[index], digits.target[index], shift=train and augment)
        # train draws its shuffle from torch's global RNG, which the search seeds per
        # fine-tune (finetune.seed): every candidate then sees the same batches, and a rebuild
        # for export repeats the trial. Validation and test keep a private generator, so
        # passing over them never moves the global RNG.
        generator = None if train else torch.Generator().manual_seed(seed)
        loaders[name] = DataLoader(dataset, batch_size=batch_size, shuffle=train,
                                   generator=generator)
    return loaders
