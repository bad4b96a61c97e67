"""The run directory: config.json, metrics.jsonl, last/best.safetensors and state.pt.

Every file is written atomically, so a kill at any moment leaves the previous files loadable.
``state.pt`` holds the whole training state (weights included) in one file, so resuming never
mixes weights and optimizer state from different epochs.
"""

from __future__ import annotations

import json
import platform
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import torch
import torch.distributed as dist

import cwkd
from cwkd.checkpoint import (
    append_jsonl,
    atomic_write_text,
    check_writable,
    load_state,
    save_checkpoint,
    save_state,
)
from cwkd.config import TrainConfig
from cwkd.errors import CheckpointError, ConfigError

_RUN_FILES = ("config.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "state.pt")


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run at a step boundary after saving; ``exit_code`` is 128 + signal."""

    def __init__(self, out: Path, signal_number: int) -> None:
        self.out, self.exit_code = out, 128 + signal_number
        name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {name}; saved {out / 'last.safetensors'} and {out / 'state.pt'}; "
                         f"continue with --resume {out}")


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a request to stop at the next step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signal_number = 0
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        """True once a signal arrived on any rank (ranks agree, so DDP never hangs on a collective)."""
        flag = self.signal_number
        if dist.is_initialized():
            t = torch.tensor([flag], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
            self.signal_number = self.signal_number or flag
        return flag != 0

    def _handle(self, signum, _frame) -> None:
        if self.signal_number and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def prepare(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Check the run directory before any training: writable, and not another run's (unless allowed)."""
    if resume:
        if not (out / "state.pt").is_file():
            raise ConfigError(f"--resume {out}: no state.pt there; point --resume at a cwkd run directory")
    elif out.exists():
        found = [name for name in _RUN_FILES if (out / name).exists()]
        if found and not overwrite:
            raise ConfigError(
                f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
                "replace it with --overwrite, or choose another --out"
            )
        for name in found:
            (out / name).unlink()
    check_writable(out)


def load_config(out: str | Path, *, epochs: int | None = None) -> TrainConfig:
    """The config a run was started with (``epochs`` may raise the total when resuming)."""
    path = Path(out) / "config.json"
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--resume {out}: cannot read {path} ({exc}); is this a cwkd run directory?") from exc
    cfg = TrainConfig.from_dict(saved)
    if epochs is not None:
        cfg.epochs = epochs
    cfg.out, cfg.overwrite = str(out), False
    return cfg


def write_config(out: Path, cfg: TrainConfig, distiller, dcfg: dict, spec, teacher_source: dict) -> None:
    """config.json: the resolved config, versions, git hash, data settings and layer pairs."""
    record = {
        "config": cfg.to_dict(),
        "cwkd_version": cwkd.__version__,
        "versions": _versions(),
        "git": _git_hash(),
        "data": {"name": spec.name, "classes": spec.classes, "input_size": list(dcfg["input_size"]),
                 "mean": list(dcfg["mean"]), "std": list(dcfg["std"])},
        "teacher": teacher_source,
        "pairs": distiller.describe(),
        "trainable_params": sum(p.numel() for p in distiller.parameters()),
        "aligner_params": sum(p.numel() for p in distiller.aligners.parameters()),
    }
    atomic_write_text(out / "config.json", json.dumps(record, indent=2) + "\n")


def checkpoint_metadata(cfg: TrainConfig, distiller, dcfg: dict, spec, in_chans: int, teacher_source: dict) -> dict:
    """What every checkpoint carries so it can be evaluated and exported on its own."""
    return {
        "model": getattr(distiller.student, "cwkd_name", cfg.student),
        "num_classes": spec.num_classes,
        "in_chans": in_chans,
        "input_size": list(dcfg["input_size"]),
        "mean": [float(v) for v in dcfg["mean"]],
        "std": [float(v) for v in dcfg["std"]],
        "interpolation": dcfg.get("interpolation", "bilinear"),
        "crop_pct": float(dcfg.get("crop_pct", 1.0)),
        "pairs": distiller.describe(),
        "method": cfg.method.value,
        "dataset": spec.name,
        "classes": list(spec.classes),
        "cwkd_version": cwkd.__version__,
        "kind": "distill",
        "teacher": teacher_source.get("model"),
    }


def save_epoch(out: Path, distiller, optimizer, scheduler, scaler, meta: dict, record: dict, best: dict) -> dict:
    """After an epoch: metrics line, last (and maybe best) checkpoint, then the resume state."""
    epoch = record["epoch"] - 1
    meta = {**meta, "epoch": record["epoch"], "val_top1": record["val_top1"]}
    tensors = distiller.state_dict()
    append_jsonl(out / "metrics.jsonl", record)
    save_checkpoint(out / "last.safetensors", tensors, meta)
    if record["val_top1"] > best["val_top1"]:
        best = {"val_top1": record["val_top1"], "epoch": epoch}
        save_checkpoint(out / "best.safetensors", tensors, meta)
    _save_state(out, distiller, optimizer, scheduler, scaler, epoch + 1, 0, best)
    return best


def save_interrupted(out: Path, distiller, optimizer, scheduler, scaler, meta: dict, epoch: int, step: int,
                     best: dict) -> None:
    """After a stop signal mid-epoch: the current weights as last, and the state to resume from."""
    save_checkpoint(out / "last.safetensors", distiller.state_dict(), {**meta, "epoch": epoch, "step": step})
    _save_state(out, distiller, optimizer, scheduler, scaler, epoch, step, best)


def _save_state(out: Path, distiller, optimizer, scheduler, scaler, epoch: int, step: int, best: dict) -> None:
    save_state(out / "state.pt", {
        "model": distiller.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "epoch": epoch, "step": step, "best": best, "format_version": 1,
    })


def restore(out: Path, distiller, optimizer, scheduler, scaler, device) -> tuple[int, int, dict]:
    """Load state.pt into the run's objects; return (epoch, step, best) to continue from."""
    state = load_state(out / "state.pt")
    try:
        distiller.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, best = int(state["epoch"]), int(state["step"]), dict(state["best"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{out / 'state.pt'} does not match this run ({exc}); start a new run") from exc
    _truncate_metrics(out / "metrics.jsonl", epoch)
    return epoch, step, best


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs the saved state has not finished (written just before a kill)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epochs_done]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _versions() -> dict:
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "cwkd": cwkd.__version__}


def _git_hash() -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
