"""``cwkd compare``: one table across run folders, runs that differ only in seed grouped, paired by seed
against a baseline.

A run folder is what ``cwkd train|distill --out`` writes: ``config.json`` says what was trained and
``metrics.jsonl`` holds one record per finished epoch, with the task's metrics as ``val_<name>``. The
task decides the metric (its ``best_metric``: top-1, mIoU, box AP or mask AP). Reported per run: the best
epoch's value and the last epoch's; the paired difference uses the last epoch's (picking the best epoch
selects on the validation data).

Example:
    >>> result = compare_runs(["runs/cwt-s0", "runs/cwt-s1"], baseline=["runs/base-s*"])  # doctest: +SKIP
    >>> result.groups[0].paired.mean  # doctest: +SKIP
    1.69
"""

from __future__ import annotations

import glob
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cwkd.errors import ConfigError

#: config.json keys that say how a run ran, not what it trained: runs that differ only in these (and the
#: seed) are repeats of one setting.
HOW_IT_RAN = ("seed", "out", "overwrite", "quiet", "workers", "device", "data_root", "download", "skip_corrupt",
              "skip_nonfinite", "made_by", "compile")
#: Student's t 0.975 quantiles for 1-30 degrees of freedom (a 95 % two-sided interval).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass(frozen=True)
class RunSummary:
    """One run folder: what it trained and how it scored."""

    path: Path
    task: str
    model: str
    teacher: str
    method: str
    alpha: str
    pairs: str
    seed: int
    best: float | None
    final: float | None
    epochs: int
    planned_epochs: int
    images_per_s: float | None
    curve: list[float | None]
    setting: str  # the config without HOW_IT_RAN, as JSON: equal for repeats that differ only in seed
    made_with: str | None = None  # the software (cwkd and its git commit, torch, torchvision, timm) and device

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "setting"}, "path": str(self.path)}


@dataclass(frozen=True)
class Paired:
    """Differences of the last epoch's metric against the baseline run of the same seed."""

    diffs: list[float]
    mean: float
    std: float
    low: float | None  # the 95 % t-interval of the mean; None for a single pair
    high: float | None

    @classmethod
    def of(cls, diffs: list[float]) -> Paired:
        """Mean, sample std and 95 % t-interval of ``diffs``.

        Example:
            >>> p = Paired.of([1.0, 2.0, 3.0]); (p.mean, p.std, round(p.low, 3), round(p.high, 3))
            (2.0, 1.0, -0.484, 4.484)
        """
        mean = statistics.fmean(diffs)
        if len(diffs) < 2:
            return cls(diffs, mean, 0.0, None, None)
        std = statistics.stdev(diffs)
        half = t975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        return cls(diffs, mean, std, mean - half, mean + half)

    def to_dict(self) -> dict:
        return {"n": len(self.diffs), "diffs": self.diffs, "mean": self.mean, "std": self.std,
                "ci95": None if self.low is None else [self.low, self.high]}


@dataclass
class Group:
    """Runs of one setting (they differ only in seed), and their pairing with the baseline."""

    runs: list[RunSummary]
    is_baseline: bool = False
    paired: Paired | None = None

    def values(self, key: str) -> list[float]:
        return [v for v in (getattr(r, key) for r in self.runs) if v is not None]

    def to_dict(self) -> dict:
        first = self.runs[0]
        stats = {key: mean_std(self.values(key)) for key in ("best", "final", "images_per_s")}
        return {"runs": [str(r.path) for r in self.runs], "seeds": [r.seed for r in self.runs], "n": len(self.runs),
                **{k: getattr(first, k) for k in ("model", "teacher", "method", "alpha", "pairs", "epochs")},
                **{k: {"mean": m, "std": s} for k, (m, s) in stats.items()}, "baseline": self.is_baseline,
                "paired": self.paired.to_dict() if self.paired else None}


@dataclass
class Comparison:
    """Everything ``cwkd compare`` shows: the task's metric, the groups, and their pairing."""

    task: str
    metric: str
    label: str
    groups: list[Group] = field(default_factory=list)
    #: What a reader must know before trusting a paired difference (runs paired across software versions).
    warnings: list[str] = field(default_factory=list)

    @property
    def runs(self) -> list[RunSummary]:
        return [r for g in self.groups for r in g.runs]

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``cwkd compare --json``."""
        return {"task": self.task, "metric": self.metric, "label": self.label,
                "groups": [g.to_dict() for g in self.groups], "runs": [r.to_dict() for r in self.runs],
                "warnings": self.warnings}


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then Cornish-Fisher).

    Example:
        >>> t975(2), round(t975(60), 3)
        (4.303, 2.0)
    """
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def find_runs(patterns: list[str]) -> list[Path]:
    """Run folders from paths or globs; a folder holding run folders (``runs/demo``) gives those."""
    found: list[Path] = []
    for pattern in patterns:
        paths = [Path(p) for p in sorted(glob.glob(pattern))] if glob.has_magic(pattern) else [Path(pattern)]
        if not paths:
            raise ConfigError(f"{pattern} matches no folder; pass run folders that `cwkd train|distill --out` wrote")
        for path in paths:
            inner = sorted(p.parent for p in path.glob("*/config.json")) if path.is_dir() else []
            found += inner if inner and not (path / "config.json").exists() else [path]
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [next(p for p in found if p.resolve() == u) for u in unique]


def read_run(path: Path) -> RunSummary:
    """One run folder's summary, or a ConfigError saying why it is not one."""
    from cwkd.tasks import get_task

    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass run folders that `cwkd train|distill --out` wrote")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a cwkd run folder (no config.json); pass folders that "
                          "`cwkd train|distill --out` wrote")
    try:
        record = json.loads((path / "config.json").read_text())
        cfg = record["config"]
        task = get_task(cfg.get("task"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}/config.json is not a cwkd run config ({exc}); restore it or leave the run "
                          "out") from None
    epochs = _metrics(path)
    key = f"val_{task.best_metric}"
    curve = [e.get(key) if isinstance(e.get(key), int | float) else None for e in epochs]
    scored = [v for v in curve if v is not None]
    speeds = [e["images_per_s"] for e in epochs if isinstance(e.get("images_per_s"), int | float)]
    setting = {k: v for k, v in cfg.items() if k not in HOW_IT_RAN}
    if cfg.get("alpha_auto"):
        setting["alpha"] = "auto"
    return RunSummary(
        path=path, task=task.name.value, model=str(cfg.get("student")), teacher=_teacher(record),
        method=_method(cfg), alpha=_alpha(cfg), pairs=_pairs(record), seed=int(cfg.get("seed", 0)),
        best=max(scored) if scored else None, final=curve[-1], epochs=len(epochs),
        planned_epochs=int(cfg.get("epochs", len(epochs))),
        images_per_s=statistics.fmean(speeds) if speeds else None, curve=curve,
        setting=json.dumps(setting, sort_keys=True), made_with=_made_with(record))


def _made_with(record: dict) -> str | None:
    """``cwkd 0.1.0 (git 1a2b3c4), torch 2.14.1, torchvision 0.29.1, timm 1.0.20, on cpu``; None when config.json
    does not say (an older run)."""
    versions = record.get("versions")
    if not isinstance(versions, dict) or not versions:
        return None
    git = f" (git {str(record['git'])[:7]})" if record.get("git") else ""
    names = [f"{name} {versions[name]}{git if name == 'cwkd' else ''}" for name in ("cwkd", "torch", "torchvision",
                                                                                    "timm") if name in versions]
    return ", ".join(names) + f", on {record.get('device') or record['config'].get('device', '?')}"


def _metrics(path: Path) -> list[dict]:
    file = path / "metrics.jsonl"
    try:
        lines = file.read_text().splitlines() if file.is_file() else []
        epochs = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file} cannot be read ({exc}); leave the run out") from None
    if not epochs:
        raise ConfigError(f"{path} has no finished epoch (metrics.jsonl is missing or empty); compare it once "
                          "an epoch has finished, or leave it out")
    return epochs


def _teacher(record: dict) -> str:
    cfg = record["config"]
    if not cfg.get("teacher") or not (cfg.get("method") != "none" or cfg.get("kd_weight")):
        return "-"
    source = record.get("teacher") or {}
    if source.get("checkpoint"):
        return f"{source.get('model', '?')} ({Path(source['checkpoint']).parent.name})"
    return str(source.get("model") or cfg["teacher"])


def _method(cfg: dict) -> str:
    method = cfg.get("method", "none")
    if cfg.get("kd_weight"):
        return "kd" if method == "none" else f"{method}+kd"
    return method


def _alpha(cfg: dict) -> str:
    if cfg.get("method", "none") == "none":
        return "-"
    alpha = f"{cfg['alpha']:.4g}" if isinstance(cfg.get("alpha"), int | float) else str(cfg.get("alpha"))
    alpha = f"auto ({alpha})" if cfg.get("alpha_auto") else alpha
    return f"{alpha} sum" if cfg.get("reduction") == "sum" else alpha


def _pairs(record: dict) -> str:
    pairs = record.get("pairs") if record["config"].get("method", "none") != "none" else None
    if not pairs:
        return "-"
    if len(pairs) > 2:
        return f"{len(pairs)} pairs ({record['config'].get('pairs')})"
    return ", ".join(f"{p['student']}->{p['teacher']}" for p in pairs)


def compare_runs(runs: list[str], baseline: list[str] | None = None) -> Comparison:
    """Read ``runs`` (and the ``baseline`` runs), group the repeats, and pair each group with the baseline by seed."""
    from cwkd.tasks import get_task

    base_paths = find_runs(baseline or [])
    paths = find_runs(runs)
    resolved = {p.resolve() for p in paths}
    summaries = [read_run(p) for p in paths + [p for p in base_paths if p.resolve() not in resolved]]
    tasks = sorted({s.task for s in summaries})
    if len(tasks) > 1:
        named = ", ".join(f"{next(s.path for s in summaries if s.task == t)} is {t}" for t in tasks)
        raise ConfigError(f"runs of different tasks have no common metric ({named}); compare each task's runs apart")
    task = get_task(tasks[0])
    result = Comparison(task.name.value, task.best_metric, task.metrics[task.best_metric])
    by_setting: dict[str, Group] = {}
    for summary in summaries:
        group = by_setting.setdefault(summary.setting, Group([]))
        group.runs.append(summary)
    result.groups = list(by_setting.values())
    if base_paths:
        result.warnings += _pair(result.groups, {p.resolve() for p in base_paths})
    return result


def _pair(groups: list[Group], base: set[Path]) -> list[str]:
    """Mark the baseline runs' groups and give every other group its paired differences by seed; return a
    warning when runs were paired with a baseline made with other software or on another device (their
    difference then holds float-level changes of that too, which move a short run's score by itself)."""
    by_seed: dict[int, RunSummary] = {}
    for run in (r for g in groups for r in g.runs if r.path.resolve() in base):
        if run.seed in by_seed:
            raise ConfigError(f"baseline runs {by_seed[run.seed].path} and {run.path} both have seed {run.seed}; "
                              "pass one baseline setting (its runs differ only in seed)")
        by_seed[run.seed] = run
    for group in groups:
        group.is_baseline = all(r.path.resolve() in base for r in group.runs)
        diffs = [r.final - by_seed[r.seed].final for r in group.runs if r.path.resolve() not in base
                 and r.seed in by_seed and None not in (r.final, by_seed[r.seed].final)]
        group.paired = Paired.of(diffs) if diffs else None
    unlike = [(r, by_seed[r.seed]) for g in groups for r in g.runs if r.path.resolve() not in base
              and r.seed in by_seed and None not in (r.made_with, by_seed[r.seed].made_with)
              and r.made_with != by_seed[r.seed].made_with]
    if not unlike:
        return []
    run, twin = unlike[0]
    more = f" (and {len(unlike) - 1} more pair(s))" if len(unlike) > 1 else ""
    return [f"{run.path} was made with {run.made_with}, but its baseline {twin.path} with {twin.made_with}{more}: "
            "a paired difference then mixes the method's effect with the software's and device's own; pair runs "
            "made alike"]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """The mean and sample standard deviation (0 for one value; None, None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_curves(result: Comparison, out: Path) -> None:
    """Draw each run's validation metric per epoch into the image ``out`` (one colour per setting)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise ConfigError("--plot needs matplotlib, an optional extra: pip install 'cwkd[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, group in enumerate(result.groups):
        colour = f"C{index % 10}"
        for number, run in enumerate(group.runs):
            epochs = [e for e, v in enumerate(run.curve, 1) if v is not None]
            label = group_label(group) if number == 0 else None
            ax.plot(epochs, [v for v in run.curve if v is not None], marker="o", color=colour, label=label,
                    linestyle="--" if group.is_baseline else "-")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {result.label} (%)")
    ax.set_title(f"cwkd compare: val {result.label} per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--plot {out}: cannot write it ({exc}); choose a writable .png path") from None
    finally:
        plt.close(fig)


def group_label(group: Group) -> str:
    """A setting in a few words: ``mobilenetv3_small_050 cwt alpha 7 (3 seeds)``."""
    run = group.runs[0]
    what = run.method if run.alpha == "-" else f"{run.method} alpha {run.alpha}"
    seeds = f" ({len(group.runs)} seeds)" if len(group.runs) > 1 else ""
    return f"{run.model} {what}{seeds}" + (" [baseline]" if group.is_baseline else "")
