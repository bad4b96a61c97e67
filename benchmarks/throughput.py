"""End-to-end distillation throughput on real JPEG files: does the input keep the model fed? (issue 27)

For the paper's pair (resnet50 -> mobilenetv1_100, 224 px) it times the engine's own training step
(``cwkd.training.engine.train_one_epoch``, on pieces built by ``cwkd.training.build.build_pieces``) three ways:

    model_bound   the same batches, read once and held on the device: the step alone, no input at all
                  (timed before and after the others; the faster counts, as the bound is a ceiling)
    workers_2     end to end from the JPEG files with ``--workers 2`` (the old default)
    workers_auto  end to end with ``--workers auto`` (the default: this process's share of the cores)

and reports images/s, the ratio to ``model_bound``, and the data-wait share: the part of the measured
time the loop spent waiting for the loader's next batch (the engine's ``data_wait``, host clock around
the fetch, no device sync). Each variant runs ``warmup`` steps, then ``steps`` measured steps on the same
loader iterator, so the measured steps start with the workers' prefetch queue full (a new epoch's refill
is a per-epoch cost, small over an ImageNet epoch; it is left out here).

Data: an ImageFolder of JPEGs, made on demand and cached (``--data-dir``, default
``~/.cache/cwkd/throughput``; never in git): Fashion-MNIST items (``/usr/share/datasets/fashion-mnist``,
else the bundled 7,000-image mini set, reused with fresh noise) tinted per class to RGB, upscaled to
400x350 (ImageNet's typical size), with pixel noise (+-32) so the files are not unrealistically easy
to decode, saved at JPEG quality 90: about 65 KiB a file, recorded in the JSON (ImageNet's photos average
~110 KiB, so these decode somewhat faster: the test errs in the input's favour).
The files are read from the page cache (they were just written): the benchmark measures decoding and
augmentation, not the disk.

Targets (set before any result, checked and printed; a benchmark, not a test):
    GPU (bf16, cuda):  workers_auto end to end >= 90 % of model_bound, with the defaults.
    CPU:               workers_auto never slower than workers_2 (>= 95 % of it: the 5 % is timing noise).
Decision rule for the GPU decode path (``torchvision.io.decode_jpeg`` on CUDA, issue 27's second bullet):
build it only if on the GPU machine workers_auto is below 90 % of model_bound AND its data-wait share is
above 10 % (the loop is waiting on PIL workers); if the ratio misses with little data wait, the cost is
elsewhere (copies, the step) and GPU decoding would not help. Nothing GPU-side is built before that run.

Usage:
    python benchmarks/throughput.py --quick           # tiny models, 64 px, CPU: well under a minute (a test)
    python benchmarks/throughput.py --plan cpu        # the pair at 224 px on the CPU, a few steps: minutes
    python benchmarks/throughput.py --plan gpu        # the pair in bf16 on CUDA: sized for ~3 minutes
                                                      # (benchmarks/gpu_check.py --only machine,throughput)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from types import SimpleNamespace

from common import RESULTS, ROOT, write_json

sys.path.insert(0, str(ROOT))  # cwkd from this checkout

#: The targets and the decision rule above, as numbers.
GPU_TARGET = 0.90          # workers_auto / model_bound on the GPU, bf16
CPU_NOISE = 0.95           # workers_auto / workers_2 on the CPU: "never slower", less timing noise
INPUT_BOUND_WAIT = 0.10    # data-wait share above which a missed GPU target is the input's


@dataclass(frozen=True)
class Plan:
    """One measurement: models, sizes, steps and the device."""

    name: str
    teacher: str
    student: str
    input_size: int
    batch: int
    warmup: int        # steps before the measured ones, on the same iterator
    steps: int         # measured steps per variant
    preload: int       # distinct batches held on the device for model_bound
    device: str
    precision: str
    image: tuple[int, int] = (400, 350)  # width, height of the JPEG files
    val_per_class: int = 1

    @property
    def train_files(self) -> int:
        """One epoch holds every step of a variant: warmup and measured."""
        return (self.warmup + self.steps) * self.batch


PLANS = {
    "quick": Plan("quick", "test_resnet", "test_efficientnet", 64, 8, 1, 3, 2, "cpu", "fp32"),
    "cpu": Plan("cpu", "resnet50", "mobilenetv1_100", 224, 16, 2, 16, 2, "cpu", "fp32"),  # 4 steps: +-15 % noise
    "gpu": Plan("gpu", "resnet50", "mobilenetv1_100", 224, 128, 15, 60, 8, "cuda", "bf16"),
}


# ----------------------------------------------------------------------------- the JPEG folder


def _source_images():
    """Fashion-MNIST's images and labels: the system copy, else the bundled mini set; and which it was."""
    import numpy as np

    from cwkd.tasks.classification.data import find_fashion_mnist, read_idx

    files = find_fashion_mnist()
    if files is not None:
        return read_idx(files["x_train"]), read_idx(files["y_train"]), "fashion-mnist (system)"
    with np.load(ROOT / "cwkd" / "assets" / "fashion_mnist_mini.npz") as npz:
        images = np.concatenate([npz["x_train"], npz["x_val"]])
        labels = np.concatenate([npz["y_train"], npz["y_val"]])
    return images, labels, "fashion-mnist-mini (bundled)"


def _write_jpeg(job: tuple) -> int:
    """One file: the 28 px item tinted by class, upscaled, with noise, at quality 90; returns its size."""
    import numpy as np
    from PIL import Image

    pixels, label, path, size, seed = job
    tint = np.array([0.6 + 0.4 * ((label >> b) & 1) for b in range(3)], dtype=np.float32)
    big = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng(seed).integers(-32, 33, (size[1], size[0], 3), dtype=np.int16)
    rgb = np.clip(big[..., None] * tint + 20 + noise, 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return path.stat().st_size


def make_folder(plan: Plan, root: Path) -> dict:
    """The plan's ImageFolder under ``root`` (made once, then reused), and what it holds."""
    folder = root / f"fmnist-{plan.image[0]}x{plan.image[1]}-q90-{plan.train_files}"
    info = folder / "info.json"
    if info.is_file():
        return json.loads(info.read_text())
    images, labels, source = _source_images()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    by_class = [[int(k) for k in (labels == c).nonzero()[0]] for c in range(10)]
    jobs = []
    for offset, (split, count) in enumerate((("train", plan.train_files), ("val", plan.val_per_class * 10))):
        for i in range(count):  # classes in turn, so every class has files; val from the other end
            items = by_class[i % 10]
            k = items[(i // 10) % len(items)] if split == "train" else items[-1 - (i // 10) % len(items)]
            target = tmp / split / f"class{i % 10}"
            target.mkdir(parents=True, exist_ok=True)
            jobs.append((images[k], i % 10, target / f"{i:06d}.jpg", plan.image, offset * 10**8 + i))
    sizes = _write_all(jobs)
    record = {"dir": str(folder), "source": source, "train_files": plan.train_files, "image": list(plan.image),
              "quality": 90, "mean_kib": round(sum(sizes) / len(sizes) / 1024, 1)}
    (tmp / "info.json").write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, folder)  # whole or not at all: a cut-short run leaves only a .tmp folder
    return record


def _write_all(jobs: list[tuple]) -> list[int]:
    if len(jobs) < 500:
        return [_write_jpeg(job) for job in jobs]
    with Pool(os.cpu_count()) as pool:
        return pool.map(_write_jpeg, jobs, chunksize=64)


# ----------------------------------------------------------------------------- the measurement


class _Continuing:
    """One iterator across ``train_one_epoch`` calls: the measured steps start where the warmup stopped."""

    def __init__(self, iterable) -> None:
        self.it = iter(iterable)

    def __iter__(self):
        return self.it


def _pieces(plan: Plan, folder: str, work: Path, device):
    """The engine's pieces for the plan (``cwkd.training.build.build_pieces``: data, models, optimizer), the config
    and the run's context (device, console)."""
    from cwkd.runtime import setup_distributed
    from cwkd.training.build import RunContext, build_pieces
    from cwkd.training.config import TrainConfig
    from cwkd.training.console import RunConsole
    from cwkd.training.rundir import RunDir

    cfg = TrainConfig(data=folder, student=plan.student, teacher=plan.teacher, allow_random_teacher=True,
                      input_size=plan.input_size, batch_size=plan.batch, precision=plan.precision, workers=0,
                      device=str(device), lr=1e-4, epochs=1, out=str(work / "run"), overwrite=True, quiet=True)
    with RunDir(Path(cfg.out)) as out:
        ctx = RunContext(out, device, setup_distributed(device), RunConsole(quiet=True))
        return build_pieces(cfg, ctx), cfg, ctx


def _timed(p, cfg, ctx, source, plan: Plan) -> dict:
    """Warm up, then time ``plan.steps`` engine steps fed by ``source`` (one iterator for both)."""
    from cwkd.training.engine import Steps, train_one_epoch

    p.train_loader = _Continuing(source)
    go = SimpleNamespace(requested=False)
    train_one_epoch(p, cfg, ctx, go, Steps("warmup", plan.warmup))
    done = train_one_epoch(p, cfg, ctx, go, Steps("measured", plan.steps))
    p.train_loader = None  # the loader's iterator goes, and with it its workers
    gc.collect()
    return {"images_per_s": done["images_per_s"], "data_wait": done["data_wait"], "steps": done["batches"]}


def measure(plan: Plan, folder: str, work: Path) -> dict:
    """Every variant's images/s and data-wait share, on pieces built once."""
    import torch

    from cwkd.data.feed import resolve_workers
    from cwkd.data.loading import build_loaders
    from cwkd.runtime import resolve_device

    device = resolve_device(plan.device, plan.precision)
    p, cfg, ctx = _pieces(plan, folder, work, device)

    def loader(workers: int | str):
        """A train loader as the engine builds it, with ``workers``."""
        return build_loaders(p.spec, p.dcfg, batch_size=plan.batch, workers=workers, device=device, seed=0,
                             datasets=p.task.datasets(p.spec, p.dcfg))[0]

    held = [(images, labels.to(device)) for images, labels in itertools.islice(loader(0), plan.preload)]
    first = _timed(p, cfg, ctx, itertools.cycle(held), plan)
    rows = {}
    for name, workers in (("workers_2", 2), ("workers_auto", "auto")):
        rows[name] = {"workers": resolve_workers(workers), **_timed(p, cfg, ctx, loader(workers), plan)}
    last = _timed(p, cfg, ctx, itertools.cycle(held), plan)
    del held
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows = {"model_bound": {"workers": None, **max(first, last, key=lambda r: r["images_per_s"]),
                            "images_per_s_before_after": [first["images_per_s"], last["images_per_s"]]}, **rows}
    bound = rows["model_bound"]["images_per_s"]
    for row in rows.values():
        row["ratio_to_model_bound"] = row["images_per_s"] / bound
    return rows


def verdict(plan: Plan, rows: dict) -> dict:
    """The plan's target, whether it was met, and for the GPU the decision on GPU decoding."""
    auto, two = rows["workers_auto"], rows["workers_2"]
    if plan.device == "cuda":
        met = auto["ratio_to_model_bound"] >= GPU_TARGET
        bound = not met and auto["data_wait"] > INPUT_BOUND_WAIT
        decision = ("met: GPU decode is not needed" if met else
                    "input-bound: build the opt-in GPU decode (torchvision.io.decode_jpeg on CUDA)" if bound else
                    "missed with little data wait: the cost is not the PIL input; GPU decode would not help")
        return {"target": f"workers_auto >= {GPU_TARGET:.0%} of model_bound", "met": met, "gpu_decode": decision}
    return {"target": f"workers_auto >= {CPU_NOISE:.0%} of workers_2 (never slower, less noise)",
            "met": auto["images_per_s"] >= CPU_NOISE * two["images_per_s"],
            "same_worker_count": auto["workers"] == two["workers"]}


def _machine(device: str) -> dict:
    import torch

    from cwkd.data.feed import local_processes, usable_cores

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(), "local_processes": local_processes(),
            "torch_threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="cpu", help="quick (a test), cpu or gpu")
    parser.add_argument("--quick", action="store_true", help="the same as --plan quick")
    parser.add_argument("--device", default=None, help="override the plan's device (cpu, cuda, cuda:N)")
    parser.add_argument("--data-dir", type=Path, default=Path.home() / ".cache" / "cwkd" / "throughput",
                        help="where the JPEG folders are made and kept (default: ~/.cache/cwkd/throughput)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON (default: benchmarks/results/throughput_<plan>.json)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else args.plan]
    plan = plan if args.device is None else replace_device(plan, args.device)
    out = args.out or RESULTS / f"throughput_{plan.name}.json"
    started = time.perf_counter()
    data = make_folder(plan, args.data_dir)
    print(f"data: {data['dir']} ({data['train_files']} train JPEGs, {data['mean_kib']} KiB mean, {data['source']})")
    rows = measure(plan, data["dir"], args.data_dir)
    report = {"plan": asdict(plan), "machine": _machine(plan.device), "data": data, "variants": rows,
              "targets": {"gpu_bf16": GPU_TARGET, "cpu_auto_vs_2": CPU_NOISE, "input_bound_wait": INPUT_BOUND_WAIT},
              "verdict": verdict(plan, rows), "wall_s": round(time.perf_counter() - started, 1)}
    write_json(out, report)
    for name, row in rows.items():
        print(f"{name:13s} workers {str(row['workers']):>4s}  {row['images_per_s']:8.1f} img/s  "
              f"{row['ratio_to_model_bound']:6.1%} of model-bound  data wait {row['data_wait']:6.1%}")
    print(f"target: {report['verdict']['target']}: {'met' if report['verdict']['met'] else 'MISSED'}; wrote {out}")
    return 0


def replace_device(plan: Plan, device: str) -> Plan:
    """The plan on another device (the CPU plans keep fp32; a CUDA device keeps the plan's precision)."""
    from dataclasses import replace

    return replace(plan, device=device)


if __name__ == "__main__":
    sys.exit(main())
