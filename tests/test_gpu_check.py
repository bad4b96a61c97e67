"""benchmarks/gpu_check.py: its CPU dry run end to end, and how it keeps one step from sinking the rest."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
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


def test_grids_link_carried_data_and_snapshot_results_atomically(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_grids

    carried = tmp_path / "carry"
    (carried / "fm-dense-128px-400-100").mkdir(parents=True)
    (carried / "fm-dense-128px-400-100" / "done").write_text("ok\n")
    (carried / "half-written").mkdir()  # no done file: not linked
    monkeypatch.setattr(gpu_grids, "DETECTION_CARRY", carried)
    data = tmp_path / "runs" / "data"
    assert gpu_grids._link_carried_data(data) == [data / "fm-dense-128px-400-100"]
    assert (data / "fm-dense-128px-400-100" / "done").is_file() and not (data / "half-written").exists()

    class Check:  # what _snapshot reads of gpu_check.Check
        out, logs = tmp_path / "out", tmp_path / "out" / "logs"
    Check.logs.mkdir(parents=True)
    (Check.logs / "grids_alpha.log").write_text("cell done\n")
    results = {"detection": tmp_path / "results" / "detection", "alpha": tmp_path / "results" / "accuracy_gpu"}
    (results["alpha"] / "accuracy").mkdir(parents=True)
    (results["alpha"] / "accuracy" / "cell.json").write_text("{}")
    gpu_grids._snapshot(Check, results)
    with tarfile.open(Check.out / gpu_grids.TARBALL) as tar:
        names = tar.getnames()
    assert "results/accuracy_gpu/accuracy/cell.json" in names and "logs/grids_alpha.log" in names
    assert sorted(p.name for p in Check.out.iterdir()) == ["grids_results.tar.gz", "logs"]  # no temp file left
    assert gpu_grids._result_files(results["alpha"]) == 1 and gpu_grids._result_files(results["detection"]) == 0


@pytest.mark.slow
def test_dry_run_of_the_throughput_step_measures_every_variant(tmp_path):
    """``--only machine,throughput`` runs benchmarks/throughput.py --plan quick: end to end from JPEG files with 2 and
    auto workers against the model-bound rate, each with its data-wait share, and a verdict on the CPU target."""
    from cwkd.data.feed import resolve_workers

    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "machine,throughput", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["throughput"]
    assert step["status"] == "passed", step.get("reason")
    rows = step["summary"]
    assert list(rows) == ["model_bound", "workers_2", "workers_auto"]
    assert rows["workers_2"]["workers"] == 2 and rows["workers_auto"]["workers"] == resolve_workers("auto")
    for row in rows.values():
        assert row["images_per_s"] > 0 and 0 <= row["data_wait"] <= 1
    assert rows["model_bound"]["ratio_to_model_bound"] == 1.0
    assert "workers_2" in step["verdict"]["target"] and isinstance(step["verdict"]["met"], bool)
    assert step["data"]["train_files"] == 32 and step["data"]["mean_kib"] > 20  # real JPEGs, not blank ones
    assert (tmp_path / "throughput_quick.json").is_file()


def test_throughput_verdict_decides_the_gpu_decode_path_by_ratio_and_data_wait(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import throughput

    def rows(ratio: float, wait: float) -> dict:
        return {"workers_2": {"images_per_s": 1.0, "workers": 2},
                "workers_auto": {"ratio_to_model_bound": ratio, "data_wait": wait, "images_per_s": 1.0, "workers": 16}}

    gpu = throughput.PLANS["gpu"]
    assert throughput.verdict(gpu, rows(0.93, 0.05))["gpu_decode"].startswith("met")
    assert throughput.verdict(gpu, rows(0.60, 0.40))["gpu_decode"].startswith("input-bound: build")
    assert throughput.verdict(gpu, rows(0.80, 0.02))["gpu_decode"].startswith("missed with little data wait")
    cpu = throughput.PLANS["cpu"]
    slow = {**rows(1, 0), "workers_auto": {"images_per_s": 0.9, "workers": 2}}
    assert throughput.verdict(cpu, rows(1, 0))["met"] and not throughput.verdict(cpu, slow)["met"]


_FAKE_BENCH = """import sys, time
from pathlib import Path
results = Path(sys.argv[sys.argv.index("--results") + 1])
(results / "bodies" / "resnet18").mkdir(parents=True, exist_ok=True)
(results / "bodies" / "resnet18" / "last.safetensors").write_bytes(b"weights")
(results / "bodies" / "resnet18" / "pretrain.json").write_text("{}")
(results / "fasterrcnn_resnet18-none-s0.json").write_text("{}")
(results / "report.md").write_text("| table |\\nCWT (fasterrcnn_resnet18, box AP): undecided\\n")
print("args", " ".join(sys.argv[1:]), flush=True)
time.sleep(30 if (Path(__file__).parent / "sleep").is_file() else 0)
"""


def test_pretrained_detection_step_keeps_its_results_and_decision_even_when_cut_short(gpu_check, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_pretrained

    fake = tmp_path / "bench"
    fake.mkdir()
    (fake / "pretrained_detection.py").write_text(_FAKE_BENCH)
    monkeypatch.setattr(gpu_pretrained, "BENCH", fake)
    monkeypatch.setattr(gpu_pretrained, "END_MARGIN_S", 0)
    check = gpu_check.Check(gpu_check.DRY, tmp_path / "out", budget=60, deps=None, dry_run=True)
    entry = gpu_pretrained.pretrained_detection(check, 30, gpu_check._failed_command)
    assert entry["status"] == "passed" and not entry["timed_out"], entry.get("reason")
    assert entry["cells"] == ["fasterrcnn_resnet18-none-s0"] and entry["decision"].endswith("box AP): undecided")
    assert "args --quick --device cpu --jobs 1" in entry["commands"][0]["tail"]
    with tarfile.open(check.out / gpu_pretrained.TARBALL) as tar:
        names = tar.getnames()
    assert "results/report.md" in names and "results/bodies/resnet18/pretrain.json" in names
    assert "logs/pretrained_detection.log" in names and not any(n.endswith(".safetensors") for n in names)
    (fake / "sleep").write_text("")  # past its limit: killed, and what it wrote is still kept
    cut = gpu_pretrained.pretrained_detection(check, 4, gpu_check._failed_command)
    assert cut["status"] == "passed" and cut["timed_out"] and cut["commands"][0]["wall_s"] < 15
    assert cut["cells"] == entry["cells"]
    assert sorted(p.name for p in check.out.iterdir()) == ["logs", gpu_pretrained.TARBALL]  # no temp file left


@pytest.mark.slow
def test_dry_run_of_the_pretrained_detection_step_runs_every_arm(tmp_path):
    """``--only machine,pretrained_detection`` runs benchmarks/pretrained_detection.py --quick on the CPU: a body
    pretrained on the bundled set, the teacher from it, and one seed of none, cwt, mgd and cwd, with the report."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "machine,pretrained_detection", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["pretrained_detection"]
    assert step["status"] == "passed", step.get("reason")
    assert step["cells"] == [f"fasterrcnn_test_resnet-{arm}-s0" for arm in ("cwd", "cwt", "mgd", "none")]
    assert "Body test_resnet: Fashion-MNIST top-1" in step["report"] and "on 6000 images" in step["report"]
    assert step["decision"].startswith("CWT (fasterrcnn_test_resnet, box AP): undecided")
    with tarfile.open(tmp_path / "pretrained_detection.tar.gz") as tar:
        assert "results/teacher.json" in tar.getnames()
