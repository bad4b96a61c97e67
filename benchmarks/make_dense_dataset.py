"""Write the composited Fashion-MNIST data set for the dense tasks (segmentation, detection, instance).

Every canvas holds 2-6 real Fashion-MNIST items (train split for train, test split for val, never mixed),
scaled, tinted and overlapping, with a per-pixel class mask in the VOC layout and one box, class and mask
per item in COCO JSON. See :mod:`cwkd.composite`.

Usage (needs the real data, e.g. ``apt-get install dataset-fashion-mnist``; ``--data fashion-mnist-mini``
uses the subset bundled with cwkd instead)::

    python benchmarks/make_dense_dataset.py --out data/fm-dense [--canvas 96] [--train 2000] [--val 500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cwkd.composite import items_from_spec, write_dense_dataset
from cwkd.errors import CwkdError
from cwkd.tasks.classification.data import load_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default) or fashion-mnist-mini")
    parser.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--canvas", type=int, default=96, help="canvas side in pixels (default 96)")
    parser.add_argument("--train", type=int, default=2000, help="train canvases (default 2000)")
    parser.add_argument("--val", type=int, default=500, help="val canvases (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.canvas < 32 or min(args.train, args.val) < 1:
        parser.error("--canvas must be at least 32 and --train/--val at least 1")
    started = time.perf_counter()
    try:
        items = items_from_spec(load_data(args.data, root=args.data_root))
    except CwkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_dense_dataset(args.out, items, canvas=args.canvas, counts={"train": args.train, "val": args.val},
                        seed=args.seed)
    print(f"wrote {args.train} train and {args.val} val canvases of {args.canvas} px to {args.out} "
          f"(VOC and COCO layouts) in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
