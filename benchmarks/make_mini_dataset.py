"""Build ``cwkd/assets/fashion_mnist_mini.npz``, the small Fashion-MNIST subset bundled with cwkd.

Why: the mini set lets ``cwkd`` run its quick-start, tests and docs examples offline, with no download.
It holds 600 training images per class (6,000, from the train split) and 100 validation images per class
(1,000, from the test split), picked with a fixed seed so rebuilding gives the same file.

Usage (needs the real data, e.g. ``apt-get install dataset-fashion-mnist``)::

    python benchmarks/make_mini_dataset.py [--root DIR] [--out cwkd/assets/fashion_mnist_mini.npz]

Fashion-MNIST is (c) 2017 Zalando SE, MIT licence: https://github.com/zalandoresearch/fashion-mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cwkd.errors import DataError
from cwkd.tasks.classification.data import FASHION_MNIST_CLASSES, find_fashion_mnist, read_idx

SEED = 0
TRAIN_PER_CLASS = 600
VAL_PER_CLASS = 100


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random samples from each class, in ascending order."""
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "cwkd/assets/fashion_mnist_mini.npz"
    )
    args = parser.parse_args()

    files = find_fashion_mnist(args.root)
    if files is None:
        raise DataError("Fashion-MNIST not found; run `apt-get install dataset-fashion-mnist` or pass --root")
    rng = np.random.default_rng(SEED)
    out: dict[str, np.ndarray] = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        images, labels = read_idx(files[f"x_{split}"]), read_idx(files[f"y_{split}"])
        keep = balanced_subset(labels, per_class, rng)
        out[f"x_{split}"], out[f"y_{split}"] = images[keep].astype(np.uint8), labels[keep].astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out, classes=np.array(FASHION_MNIST_CLASSES))
    sizes = ", ".join(f"{k} {v.shape}" for k, v in out.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {sizes}")


if __name__ == "__main__":
    main()
