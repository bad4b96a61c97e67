"""Run-length encoding of boolean images, uncompressed, in the JSON layout instance annotations use.

Written by :mod:`cwkd.composite` and read by the data loaders when pycocotools is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def rle_encode(mask: np.ndarray) -> dict:
    """The uncompressed run-length encoding of a boolean image: run lengths in column-major order, starting with
    the 0s (the ``{"counts", "size"}`` layout instance annotation files use)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"counts": runs, "size": list(mask.shape)}


def rle_decode(rle: Mapping) -> np.ndarray:
    """The boolean image of an uncompressed run-length encoding (the inverse of :func:`rle_encode`)."""
    height, width = rle["size"]
    values = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in rle["counts"]:
        values[position:position + run] = value
        position, value = position + run, not value
    return values.reshape((height, width), order="F")
