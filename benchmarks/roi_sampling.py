"""What cwkd's small-input ROI sampling saves: a detector's train step and eval forward, both ways (issue 12).

At ``input_size`` 320 or less cwkd's R-CNNs keep 150 test-time proposals, 1000/500 in training and sample
128 ROIs per image (``cwkd.tasks.detection.models._small_input``);
torchvision's defaults (2000 proposals, 512 ROIs) are made for
800 px images. This times, on one batch of random images with three boxes (and masks) each, the median train
step (forward, backward, SGD) and eval forward of each model built by cwkd at ``--size``, once as built and
once with torchvision's counts put back. Results go to ``benchmarks/results/roi_sampling.json``.

Usage:
    python benchmarks/roi_sampling.py                     # maskrcnn_resnet18 and maskrcnn_resnet50, 128 px, batch 8
    python benchmarks/roi_sampling.py --models fasterrcnn_test_resnet --batch 2 --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, write_json

sys.path.insert(0, str(ROOT))

from cwkd.tasks.detection.models import create_detection_model  # noqa: E402

#: torchvision's own counts (its FasterRCNN/MaskRCNN defaults).
TORCHVISION = {"pre_train": 2000, "post_train": 2000, "pre_test": 1000, "post_test": 1000, "rois": 512}


def _batch(batch: int, size: int, masks: bool) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    images = list(torch.rand(batch, 3, size, size, generator=gen))
    boxes = torch.tensor([[0.08, 0.08, 0.4, 0.4], [0.45, 0.45, 0.95, 0.85], [0.15, 0.55, 0.45, 0.95]]) * size
    targets = []
    for _ in images:
        target = {"boxes": boxes.clone(), "labels": torch.tensor([1, 2, 3])}
        if masks:
            target["masks"] = torch.zeros(3, size, size, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                target["masks"][i, y0:y1, x0:x1] = 1
        targets.append(target)
    return images, targets


def _torchvision_counts(model) -> None:
    model.rpn._pre_nms_top_n = {"training": TORCHVISION["pre_train"], "testing": TORCHVISION["pre_test"]}
    model.rpn._post_nms_top_n = {"training": TORCHVISION["post_train"], "testing": TORCHVISION["post_test"]}
    model.roi_heads.fg_bg_sampler.batch_size_per_image = TORCHVISION["rois"]


def time_model(name: str, size: int, batch: int, rounds: int, torchvision: bool) -> dict:
    """Median seconds of a train step and an eval forward (after one warm-up of each)."""
    torch.manual_seed(0)
    model = create_detection_model(name, num_classes=11, input_size=size)
    if torchvision:
        _torchvision_counts(model)
    images, targets = _batch(batch, size, masks=name.startswith("maskrcnn"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    train, evaluate = [], []
    for _ in range(rounds + 1):
        model.train()
        started = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train.append(time.perf_counter() - started)
        model.eval()
        with torch.no_grad():
            started = time.perf_counter()
            model(images)
            evaluate.append(time.perf_counter() - started)
    return {"train_step_s": round(statistics.median(train[1:]), 3), "eval_s": round(statistics.median(evaluate[1:]), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["maskrcnn_resnet18", "maskrcnn_resnet50"])
    parser.add_argument("--size", type=int, default=128, help="--input-size of the models and the images (px)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "roi_sampling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for name in args.models:
        for label, torchvision in (("torchvision", True), ("cwkd", False)):
            rows[f"{name}/{label}"] = row = time_model(name, args.size, args.batch, args.rounds, torchvision)
            print(f"{name:22s} {label:11s} train step {row['train_step_s']:.2f} s, eval {row['eval_s']:.2f} s",
                  flush=True)
    record = {"size": args.size, "batch": args.batch, "rounds": args.rounds, "threads": args.threads,
              "torchvision_counts": TORCHVISION, "rows": rows,
              "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
