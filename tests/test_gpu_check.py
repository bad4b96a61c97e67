"""benchmarks/gpu_check.py: its CPU dry run end to end, and how it keeps one step from sinking the rest."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.slow
def test_dry_run_passes_every_step_or_says_why_not(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["finished"]
    machine = report["machine"]
    assert machine["torch"] and machine["cuda_available"] is False and "nvidia_smi" in machine
    assert machine["cwkd_from"].startswith(str(SCRIPT.parents[1]))  # the working tree, not an installed copy
    steps = report["steps"]
    assert list(steps) == ["machine", "tests", "cli_fp16", "cli_bf16", "speed_bf16", "speed_fp16"]
    for name, step in steps.items():
        assert step["status"] in ("passed", "skipped"), (name, step.get("reason"))
        assert step["status"] == "passed" or step["reason"], name
        assert step["wall_s"] >= 0
    assert steps["cli_fp16"]["status"] == steps["speed_fp16"]["status"] == "skipped"  # fp16 needs CUDA
    assert steps["tests"]["counts"]["PASSED"] >= 5 and not steps["tests"]["counts"]["FAILED"]
    assert steps["cli_bf16"]["student"]["train_feat_loss"] > 0 and "top1" in steps["cli_bf16"]["eval"]
    bf16 = report["headline"]["bf16"]
    for key in ("student_ms", "teacher_ms", "cwkd_ms", "ratio", "cwkd_images_per_s", "nonfinite_check_cost",
                "timm_logit_ms"):
        assert bf16[key] > 0, key
    assert report["headline"]["fp32"]["cwkd_peak_mib"] > 0
    assert (tmp_path / "speed_bf16.json").is_file()


def test_a_step_past_its_time_is_killed_with_its_children(gpu_check, tmp_path):
    check = gpu_check.Check(gpu_check.DRY, tmp_path, budget=60, deps=None, dry_run=True)
    child = tmp_path / "child.pid"
    done = check.run("sleepy", ["sh", "-c", f"sleep 30 & echo $! > {child}; echo started; sleep 30"], limit=2)
    assert done["timed_out"] and done["rc"] != 0 and done["wall_s"] < 10
    assert "started" in done["tail"] and "timed out after" in gpu_check._failed_command([done])
    time.sleep(0.2)
    stat = Path(f"/proc/{child.read_text().strip()}/stat")  # gone, or a zombie waiting to be reaped
    assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")


def test_a_broken_step_is_recorded_and_an_out_of_time_one_skipped(gpu_check, tmp_path):
    check = gpu_check.Check(gpu_check.DRY, tmp_path, budget=60, deps=None, dry_run=True)
    check.step("tests", lambda limit: 1 / 0)
    check.deadline -= 60  # the budget is spent
    check.step("speed_bf16", lambda limit: pytest.fail("must not start"))
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]  # saved after every step
    assert steps["tests"]["status"] == "failed" and "ZeroDivisionError" in steps["tests"]["reason"]
    assert steps["speed_bf16"] == {"status": "skipped", "reason": steps["speed_bf16"]["reason"],
                                   "wall_s": steps["speed_bf16"]["wall_s"]}
    assert "time budget was spent" in steps["speed_bf16"]["reason"]
