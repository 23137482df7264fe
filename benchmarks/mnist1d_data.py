"""MNIST-1D as an npz the ``npz`` data source reads: a benchmark model with a test split five
times larger than digits', so one test image moves accuracy by 0.05 point instead of 0.28.

    .venv/bin/pip install -e ".[bench]"          # the mnist1d package
    python benchmarks/mnist1d_data.py            # writes runs/data/mnist1d-10000.npz

The ``mnist1d`` package (Greydanus, 2020) generates the signals from its ten templates on this
machine (its seed 42; nothing is downloaded). Its train and test parts are joined into one
``x`` (N, 40) float32 and ``y`` int64: the config's ``data.split`` fractions split them, as for
digits. Read with ``layout: NCL`` (one channel, 40 steps): ``digits-conv1d`` takes it as is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def generate(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The package's dataset at ``samples`` signals; numpy's global RNG (which the package
    seeds) is put back afterwards."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    try:
        args = get_dataset_args()
        args.num_samples = samples
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=None,
                        help="default runs/data/mnist1d-<samples>.npz")
    args = parser.parse_args(argv)
    out = args.out or Path("runs/data") / f"mnist1d-{args.samples}.npz"
    x, y = generate(args.samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=x, y=y)
    print(f"wrote {out}: x {x.shape} {x.dtype}, y {y.shape}, classes {np.bincount(y).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
