"""accuracy.py's data: seeded, class-balanced subsets of Fashion-MNIST written as IDX files, one for the
students and a superset for the teacher."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from accuracy_plan import Plan

FMNIST_TEST = 10000  # images in Fashion-MNIST's test split
INSTALL_HINT = ("Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the "
                "four IDX files in a folder and set CWKD_DATA to it")


def prepare_data(plan: Plan, teacher: bool = True) -> tuple[Path, Path]:
    """Write the seeded, class-balanced subsets as IDX files; return (student root, teacher root).

    The teacher's subset is written only when ``teacher`` is set, and Fashion-MNIST is read only when a subset
    is missing (its ``done`` file), so a machine given the subsets and the trained teacher needs no IDX files.
    """
    test_count = plan.test_subset or FMNIST_TEST
    roots = [plan.runs / "data" / f"fmnist-train{size}-test{test_count}"
             for size in (plan.train_subset, plan.teacher_subset)]
    wanted = roots if teacher else roots[:1]
    if all((root / "done").is_file() for root in wanted):
        return roots[0], roots[1]
    _write_subsets(plan, wanted)
    return roots[0], roots[1]


def _write_subsets(plan: Plan, roots: list[Path]) -> None:
    """Write the missing subsets among ``roots`` (student first, then teacher) from the Fashion-MNIST IDX files."""
    from cwkd.tasks.classification.data import find_fashion_mnist, read_idx

    files = find_fashion_mnist(None)
    if files is None:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(1)
    x, y = read_idx(files["x_train"]), read_idx(files["y_train"])
    x_test, y_test = read_idx(files["x_val"]), read_idx(files["y_val"])
    order = _balanced_order(y, seed=0)  # the student subset is a prefix of the teacher's: a superset
    test_idx = np.arange(len(y_test)) if plan.test_subset is None else _balanced_order(y_test, 0)[:plan.test_subset]
    for size, root in zip((plan.train_subset, plan.teacher_subset), roots, strict=False):
        idx = np.sort(order[:size])
        if not (root / "done").is_file():
            root.mkdir(parents=True, exist_ok=True)
            _write_idx(root / "train-images-idx3-ubyte", x[idx])
            _write_idx(root / "train-labels-idx1-ubyte", y[idx])
            _write_idx(root / "t10k-images-idx3-ubyte", x_test[test_idx])
            _write_idx(root / "t10k-labels-idx1-ubyte", y_test[test_idx])
            (root / "done").write_text(json.dumps({"train": int(size), "test": len(test_idx), "seed": 0}))


def _balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices ordered so that every prefix of 10*k holds k images per class (seeded shuffle)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    depth = min(len(p) for p in per_class)
    return np.stack([p[:depth] for p in per_class], axis=1).reshape(-1)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
