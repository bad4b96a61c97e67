"""`cwkd compare RUN...`: one table across run folders, repeats grouped, paired by seed against a baseline (issue 26).

Most run folders here are written by ``_write_run`` in the layout a real run has (config.json from a real
TrainConfig, one metrics.jsonl record per epoch); one test trains a real tiny run and checks that the two
layouts agree, so they cannot drift apart.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cwkd import runtime
from cwkd.cli.app import app
from cwkd.compare import Paired, compare_runs, t975
from cwkd.runtime import device_name
from cwkd.training.config import TrainConfig

from .helpers import cli_fails, cli_ok, read_metrics


def _write_run(root: Path, name: str, curve: list[float], *, seed: int = 0, method: str = "cwt",
               student: str = "test_efficientnet", task: str = "classification", alpha: float = 7.0,
               alpha_auto: bool = False, versions: dict | None = None) -> Path:
    """A run folder as `cwkd train|distill` leaves it after ``len(curve)`` epochs scoring ``curve``."""
    out = root / name
    out.mkdir(parents=True)
    teacher = str(root / "teacher" / "best.safetensors") if method != "none" else None
    cfg = TrainConfig(data="d", student=student, teacher=teacher, method=method, alpha=alpha, seed=seed,
                      epochs=len(curve), out=str(out), task=task, alpha_auto=alpha_auto)
    metric = {"classification": "top1", "segmentation": "miou"}[task]
    record = {"config": cfg.to_dict(), "cwkd_version": "0.1.0", "data": {}, "inputs": {},
              "teacher": {"checkpoint": teacher, "model": "test_resnet"} if teacher else {},
              "pairs": [{"student": "blocks.4", "teacher": "layer4"}] if teacher else []}
    if versions is not None:
        record.update(versions=versions, git="1a2b3c4d5e")
    (out / "config.json").write_text(json.dumps(record))
    lines = [json.dumps({"epoch": i, "train_loss": 1.0, "train_task_loss": 1.0, "val_loss": 1.0, f"val_{metric}": v,
                         "lr": 0.01, "images_per_s": 100.0 + i, "epoch_s": 1.0}) for i, v in enumerate(curve, 1)]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return out


@pytest.fixture
def grid(tmp_path) -> Path:
    """cwt and a baseline over seeds 0-2: cwt's last epoch 1, 2 and 3 points above the baseline's (its best is
    its first epoch)."""
    for seed in range(3):
        _write_run(tmp_path, f"base-s{seed}", [50.0, 60.0 + seed], seed=seed, method="none")
        _write_run(tmp_path, f"cwt-s{seed}", [66.0 + seed, 61.0 + 2 * seed], seed=seed)
    return tmp_path


def test_repeats_are_grouped_and_paired_by_seed_with_a_t_interval(grid):
    result = compare_runs([str(grid / "cwt-s*")], baseline=[str(grid / "base-s*")])
    cwt, base = result.groups
    assert [r.seed for r in cwt.runs] == [0, 1, 2] and base.is_baseline and not cwt.is_baseline
    assert cwt.paired.diffs == [1.0, 2.0, 3.0]
    assert (cwt.paired.mean, cwt.paired.std) == (2.0, 1.0)
    half = 4.303 * 1.0 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
    assert cwt.paired.low == pytest.approx(2 - half) and cwt.paired.high == pytest.approx(2 + half)
    assert statistics.fmean(cwt.values("final")) == pytest.approx(63.0)
    assert (result.task, result.metric, result.label) == ("classification", "top1", "top-1")


def test_the_table_shows_each_setting_and_its_difference(grid):
    args = ["compare", grid / "cwt-s0", grid / "cwt-s1", grid / "cwt-s2", "--baseline", grid / "base-s*"]
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})  # one line per row
    assert result.exit_code == 0, result.output
    cwt = next(line for line in result.output.splitlines() if "cwt-s0, cwt-s1, cwt-s2" in line)
    for cell in ("test_resnet (teacher)", "blocks.4->layer4", "67.00 ± 1.00", "63.00 ± 2.00",
                 "+2.00 [-0.48, +4.48] (3 pairs)"):
        assert cell in cwt, cwt
    assert "base-s0, base-s1, base-s2 (baseline)" in result.output
    # What every row shares is said once, in the title, so the table fits a narrow terminal.
    assert "— model test_efficientnet, seed 0, 1, 2, n 3" in result.output and "test_efficientnet" not in cwt


def test_json_holds_groups_runs_and_pairs(grid):
    data = json.loads(cli_ok(["compare", grid, "--baseline", grid / "base-s*", "--json"]))
    assert data["metric"] == "top1" and len(data["runs"]) == 6 and len(data["groups"]) == 2
    cwt = next(g for g in data["groups"] if not g["baseline"])
    assert cwt["n"] == 3 and cwt["final"]["mean"] == pytest.approx(63.0) and cwt["alpha"] == "7"
    assert cwt["paired"]["diffs"] == [1.0, 2.0, 3.0] and cwt["paired"]["ci95"][0] == pytest.approx(-0.4843, abs=1e-3)
    assert data["runs"][0]["curve"] and data["runs"][0]["epochs"] == 2


def test_settings_that_differ_in_more_than_the_seed_stay_apart(tmp_path):
    _write_run(tmp_path, "a7", [50.0], alpha=7.0)
    _write_run(tmp_path, "a50", [52.0], alpha=50.0)
    _write_run(tmp_path, "auto-s0", [53.0], alpha=51.7, alpha_auto=True)
    _write_run(tmp_path, "auto-s1", [54.0], alpha=48.2, alpha_auto=True, seed=1)  # auto picks its own per seed
    groups = compare_runs([str(tmp_path)]).groups
    assert sorted(len(g.runs) for g in groups) == [1, 1, 2]


def test_runs_paired_across_software_versions_are_warned_about(tmp_path):
    """Float-level changes of another torch (or cwkd, or device) move a short run by themselves: a paired
    difference across them is flagged, one line, naming the first such pair."""
    old = {"cwkd": "0.1.0", "torch": "2.13.0", "torchvision": "0.28.0", "timm": "1.0.19"}
    new = {**old, "torch": "2.14.1"}
    for seed in range(2):
        _write_run(tmp_path, f"base-s{seed}", [60.0], seed=seed, method="none", versions=old)
        _write_run(tmp_path, f"cwt-s{seed}", [61.0], seed=seed, versions=new if seed else old)
    _write_run(tmp_path, "legacy-s0", [61.0], alpha=3.0)  # an older config.json without versions: no claim either way
    result = compare_runs([str(tmp_path / "cwt-s*"), str(tmp_path / "legacy-s0")], baseline=[str(tmp_path / "base-s*")])
    (warning,) = result.warnings
    assert f"{tmp_path / 'cwt-s1'} was made with cwkd 0.1.0 (git 1a2b3c4), torch 2.14.1" in warning
    assert f"its baseline {tmp_path / 'base-s1'} with cwkd 0.1.0 (git 1a2b3c4), torch 2.13.0" in warning
    assert warning.count("timm 1.0.19, on auto") == 2  # the device each config.json names
    assert "pair runs made alike" in warning and "more pair" not in warning
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "cwt-s*"), "--baseline", str(tmp_path / "base-s*")])
    assert result.exit_code == 0 and "warning: " in result.output and "torch 2.14.1" in result.output
    assert json.loads(cli_ok(["compare", tmp_path / "cwt-s*", "--baseline", tmp_path / "base-s*", "--json"])
                      )["warnings"] == [warning]
    alike = compare_runs([str(tmp_path / "cwt-s0")], baseline=[str(tmp_path / "base-s*")])
    assert alike.warnings == []


def test_a_cpu_is_named_by_its_model_and_kernel_level_so_runs_from_two_cpus_are_warned_about(tmp_path,
                                                                                             monkeypatch):
    """The same seed trains to other numbers on another CPU (its kernels round differently): config.json names
    the CPU, and a pair across two CPUs is flagged like one across two torch versions."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\n")
    monkeypatch.setattr(runtime, "CPUINFO", info)
    level = torch.backends.cpu.get_cpu_capability()
    assert device_name(torch.device("cpu")) == f"cpu (Example CPU 9000, {level})"
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "missing")  # no /proc: platform's name, never empty
    assert device_name(torch.device("cpu")).startswith("cpu (") and runtime.cpu_model()
    same = {"cwkd": "0.1.0", "torch": "2.14.1", "torchvision": "0.29.1", "timm": "1.0.31"}
    for name, cpu in (("base-s0", "cpu (Example CPU 9000, AVX512)"), ("cwt-s0", "cpu (Other CPU, AVX2)")):
        run = _write_run(tmp_path, name, [60.0], method="none" if name.startswith("base") else "cwt", versions=same)
        record = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**record, "device": cpu}))
    (warning,) = compare_runs([str(tmp_path / "cwt-s0")], baseline=[str(tmp_path / "base-s0")]).warnings
    assert "on cpu (Other CPU, AVX2)" in warning and "on cpu (Example CPU 9000, AVX512)" in warning


def test_t_quantiles():
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert abs(t975(31) - 2.040) < 2e-3 and abs(t975(120) - 1.980) < 2e-3
    assert Paired.of([1.5]).low is None


@pytest.mark.parametrize("case, needles", [
    ("missing", ["does not exist"]),
    ("not_a_run", ["is not a cwkd run folder", "no config.json"]),
    ("no_metrics", ["has no finished epoch"]),
    ("mixed_tasks", ["different tasks", "segmentation", "classification"]),
    ("two_baselines_one_seed", ["both have seed 0"]),
])
def test_bad_inputs_are_one_clean_line(tmp_path, case, needles):
    run = _write_run(tmp_path, "run", [50.0])
    args = ["compare", run]
    if case == "missing":
        args = ["compare", tmp_path / "nope"]
    elif case == "not_a_run":
        (tmp_path / "data" / "x").mkdir(parents=True)
        args = ["compare", tmp_path / "data"]
    elif case == "no_metrics":
        (run / "metrics.jsonl").write_text("")
    elif case == "mixed_tasks":
        args.append(_write_run(tmp_path, "seg", [20.0], student="pspnet_resnet18", task="segmentation"))
    else:
        _write_run(tmp_path, "b1", [40.0], method="none")
        _write_run(tmp_path, "b2", [41.0], method="none", student="test_resnet")
        args += ["--baseline", tmp_path / "b*"]
    cli_fails(args, *needles)


def test_plot_without_matplotlib_is_one_line(grid, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    cli_fails(["compare", grid, "--plot", tmp_path / "curves.png"], "--plot needs matplotlib", "cwkd[plot]")
    assert not (tmp_path / "curves.png").exists()


def test_plot_draws_the_curves(grid, tmp_path):
    pytest.importorskip("matplotlib")
    out = cli_ok(["compare", grid, "--baseline", grid / "base-s*", "--plot", tmp_path / "curves.png"])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "curves:" in out


@pytest.mark.slow
def test_a_real_run_reads_like_the_synthetic_ones(folder, tmp_path):
    """The synthetic layout above is the real one: same config.json sections, same metrics keys."""
    real = tmp_path / "real"
    cli_ok(["train", "--model", "test_efficientnet", "--data", folder, "--epochs", "2", "--batch-size", "4",
            "--input-size", "32", "--workers", "0", "--device", "cpu", "--out", real, "-q"])
    fake = _write_run(tmp_path, "fake", [50.0, 60.0], method="none")
    real_record, fake_record = (json.loads((p / "config.json").read_text()) for p in (real, fake))
    assert set(fake_record) <= set(real_record) and set(fake_record["config"]) == set(real_record["config"])
    assert set(read_metrics(fake)[0]) <= set(read_metrics(real)[0])
    data = json.loads(cli_ok(["compare", real, fake, "--json"]))
    row = next(r for r in data["runs"] if r["path"] == str(real))
    assert row["epochs"] == 2 and row["final"] == read_metrics(real)[-1]["val_top1"] and row["images_per_s"] > 0
    assert row["method"] == "none" and row["teacher"] == "-"
    assert real_record["device"] == device_name(torch.device("cpu")) and real_record["device"].startswith("cpu (")
    assert row["made_with"].startswith("cwkd ") and row["made_with"].endswith(f", on {real_record['device']}")
    assert "torch " in row["made_with"]
