"""The run directory: config.json, metrics.jsonl, last/best.safetensors and state.pt.

Every file is written atomically, so a kill at any moment leaves the previous files loadable.
``state.pt`` holds the whole training state (weights included) in one file, so resuming never
mixes weights and optimizer state from different epochs; :mod:`cwkd.training.resume` reads it back.
Under DDP only rank 0 touches the folder: a :class:`RunDir` made with ``writes=False`` does nothing.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cwkd import __version__
from cwkd.errors import ConfigError
from cwkd.files.checkpoint import (
    append_jsonl,
    atomic_write_text,
    check_writable,
    save_checkpoint,
    save_state,
)
from cwkd.files.metadata import CheckpointMeta, is_int
from cwkd.runtime import device_name
from cwkd.training import runinputs
from cwkd.training.config import TrainConfig
from cwkd.training.optim import Stepper
from cwkd.training.resume import TrainState, state_record
from cwkd.training.runlock import RunLock

if TYPE_CHECKING:  # rundir needs only their types
    from cwkd.core.distiller import FeatureDistiller
    from cwkd.data.spec import DataSpec
    from cwkd.data.transforms import DataConfig
    from cwkd.training.teachercheck import TeacherSource

_RUN_FILES = ("config.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "state.pt")


class RunDir:
    """A run's directory, locked while the run holds it (``with RunDir(...)``); ``resuming``: ``--resume`` continues it.

    Only the process with ``writes`` (rank 0) checks, locks or writes it: on every other rank each method
    below returns at once, so the engine saves without asking which rank it is on.
    """

    def __init__(self, path: Path, *, resuming: bool = False, writes: bool = True) -> None:
        self.path, self.resuming, self.writes = Path(path), resuming, writes
        self.lock = RunLock(self.path, enabled=writes)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def prepare(self, cfg: TrainConfig, *, check_only: bool = False) -> None:
        """Check the run directory before any training: writable, and not another run's (unless allowed).

        ``cfg.overwrite`` deletes cwkd's run files only; anything else in the folder stays, and a run file
        that ``cfg`` reads (a teacher checkpoint, a weights file) is refused rather than deleted. Temp files
        that a killed write left behind are removed. ``check_only`` refuses what would be refused but
        changes nothing on disk: the engine calls it first, and the real thing once data and models are
        known to be good, so a bad option never costs an old run or leaves an empty folder. The lock is
        taken as soon as the folder exists (at the check for an existing folder), before anything is deleted.
        """
        if not self.writes:
            return
        out = self.path
        if self.resuming:
            if not (out / "config.json").is_file():
                raise ConfigError(f"--resume {out}: no config.json there; point --resume at a cwkd run directory")
        if not check_only and not out.is_dir():
            check_writable(out, flag="--out")  # makes the folder, or says why it cannot
        if out.is_dir():
            self.lock.acquire()
        if not self.resuming and out.is_dir():
            found = run_files(out)
            if found and not cfg.overwrite and not _never_finished_an_epoch(found):
                raise ConfigError(
                    f"{out} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
                    "replace it with --overwrite, or choose another --out"
                )
            runinputs.check_not_inputs([out / name for name in found], cfg, out)
            if check_only:
                return
            for name in found:
                (out / name).unlink()
        if check_only:
            return
        if self.resuming:
            self._record_new_places(cfg)
        for name in _RUN_FILES:  # atomic_write's temp names: .<name>.<8 hex>.tmp
            for stale in out.glob(f".{name}.????????.tmp"):
                stale.unlink(missing_ok=True)
        check_writable(out, flag="--out")

    def _record_new_places(self, cfg: TrainConfig) -> None:
        """Save where a resume found the run's inputs (``--data NEW``), so that the next resume finds them too."""
        saved = json.loads((self.path / "config.json").read_text())["config"]
        moved = {key: getattr(cfg, key) for key in runinputs.INPUT_KEYS if saved.get(key) != getattr(cfg, key)}
        if moved:
            entries = runinputs.record(cfg)
            self.update_config(inputs={key: entries[key] for key in moved if key in entries}, **moved)

    def check_space(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Refuse to start when the folder has no room for this run's last, best and state files.

        The estimate counts the files not yet there, plus one temp copy of the largest (atomic writes
        write the new file before removing the old one).
        """
        if not self.writes:
            return
        weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            slots = 2  # exp_avg and exp_avg_sq per parameter
        else:
            slots = int(any(group.get("momentum", 0) for group in optimizer.param_groups))
        sizes = {"last.safetensors": weights, "best.safetensors": weights, "state.pt": weights * (1 + slots)}
        need = sum(size for name, size in sizes.items() if not (self.path / name).exists()) + max(sizes.values())
        need += 16 * 2**20  # metrics, config and slack
        free = shutil.disk_usage(self.path).free
        if free < need:
            raise ConfigError(
                f"{self.path} needs about {need / 2**20:.0f} MiB for this run's checkpoints but only "
                f"{free / 2**20:.0f} MiB are free there; free some space or choose another --out"
            )

    def write_config(self, cfg: TrainConfig, distiller, dcfg: DataConfig, spec,
                     teacher_source: TeacherSource | None, device: torch.device) -> None:
        """config.json: the resolved config, versions, git hash, the device it ran on, data settings and layer
        pairs."""
        if not self.writes:
            return
        record = {
            "config": cfg.to_dict(),
            "cwkd_version": __version__,
            "versions": _versions(),
            "git": _git_hash(),
            "device": device_name(device),
            "data": {"name": spec.name, "classes": spec.classes, "input_size": list(dcfg.input_size),
                     "mean": list(dcfg.mean), "std": list(dcfg.std)},
            "teacher": teacher_source.to_dict() if teacher_source else {},
            "inputs": runinputs.record(cfg),
            "body": body.to_dict() if (body := getattr(distiller.student, "cwkd_body", None)) is not None else {},
            "pairs": distiller.describe(),
            "trainable_params": sum(p.numel() for p in distiller.parameters()),
            "aligner_params": sum(p.numel() for p in distiller.aligners.parameters()),
        }
        atomic_write_text(self.path / "config.json", json.dumps(record, indent=2) + "\n")

    def update_config(self, inputs: dict | None = None, **changes) -> None:
        """Rewrite config.json with ``changes`` to its ``config`` section (``alpha`` after an auto back-off) and
        ``inputs`` to its record of the inputs (a resume's new place for a moved data folder)."""
        if not self.writes:
            return
        record = json.loads((self.path / "config.json").read_text())
        record["config"].update(changes)
        record.setdefault("inputs", {}).update(inputs or {})
        atomic_write_text(self.path / "config.json", json.dumps(record, indent=2) + "\n")

    def append_metrics(self, record: dict) -> None:
        """One epoch's line in metrics.jsonl."""
        if self.writes:
            append_jsonl(self.path / "metrics.jsonl", record)

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop metric lines of epochs the saved state has not finished (written just before a kill)."""
        path = self.path / "metrics.jsonl"
        if not self.writes or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if _epoch_of(line) <= epochs_done]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def save_epoch(self, distiller, stepper: Stepper, meta: CheckpointMeta, state: TrainState) -> None:
        """After an epoch (``state.last``): its metrics line, last (and best, if it is) checkpoint, then the state."""
        if not self.writes:
            return
        record, metric = state.last, state.best["metric"]
        meta = meta.replace(epoch=record["epoch"], best_metric=metric, scores={metric: record[f"val_{metric}"]})
        tensors = distiller.state_dict()
        self.append_metrics(record)
        save_checkpoint(self.path / "last.safetensors", tensors, meta)
        if state.last_is_best:
            save_checkpoint(self.path / "best.safetensors", tensors, meta)
        save_state(self.path / "state.pt", state_record(distiller, stepper, state))

    def save_interrupted(self, distiller, stepper: Stepper, meta: CheckpointMeta, state: TrainState) -> None:
        """After a stop signal mid-epoch: the current weights as last, and the state to resume from."""
        if not self.writes:
            return
        save_checkpoint(self.path / "last.safetensors", distiller.state_dict(),
                        meta.replace(epoch=state.epoch, step=state.step))
        save_state(self.path / "state.pt", state_record(distiller, stepper, state))


def run_metadata(cfg: TrainConfig, distiller: FeatureDistiller, dcfg: DataConfig, spec: DataSpec, in_chans: int,
                 teacher_source: TeacherSource | None) -> CheckpointMeta:
    """What every checkpoint of a run carries so it can be evaluated and exported on its own."""
    return CheckpointMeta(
        model=getattr(distiller.student, "cwkd_name", cfg.student),
        num_classes=spec.num_classes,
        in_chans=in_chans,
        input_size=tuple(dcfg.input_size),
        mean=tuple(float(v) for v in dcfg.mean),
        std=tuple(float(v) for v in dcfg.std),
        interpolation=dcfg.interpolation,
        crop_pct=float(dcfg.crop_pct),
        pairs=tuple(distiller.describe()),
        method=cfg.method.value,
        alpha=cfg.alpha,
        alpha_auto=cfg.alpha_auto,
        **{k: getattr(v, "value", v) for k, v in cfg.method_options.items()},
        task=cfg.task.value,
        dataset=spec.name,
        classes=tuple(spec.classes),
        cwkd_version=__version__,
        kind="distill",
        teacher=teacher_source.model if teacher_source else None,
        teacher_metric=teacher_source.metric if teacher_source else None,
        teacher_score=teacher_source.score if teacher_source else None,
        backbone_weights=cfg.student_backbone_weights or ("pretrained" if cfg.student_pretrained and
                                                          not cfg.student_weights else None),
    )


def run_files(out: Path) -> list[str]:
    """The names of the cwkd run files in ``out`` (empty for a new or foreign folder)."""
    return [name for name in _RUN_FILES if (out / name).exists()]


def _never_finished_an_epoch(found: list[str]) -> bool:
    """Whether the run files ``found`` are only what a start that failed before its first save leaves.

    Such a start (out of memory, a Ctrl-C, a kill, a first epoch that diverged) leaves config.json and maybe
    metrics.jsonl, but no checkpoint and no state.pt (``--resume`` would start over anyway); a rerun replaces
    them without --overwrite.
    """
    return set(found) <= {"config.json", "metrics.jsonl"}


def _epoch_of(line: str) -> int:
    """The epoch a metrics line records; 0 for a line that is not a cwkd record (it is kept)."""
    try:
        record = json.loads(line)
    except ValueError:
        return 0
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if is_int(epoch) else 0


def _versions() -> dict:
    import timm
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "cwkd": __version__}


def _git_hash() -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
