"""The benchmarks' options for a GPU machine: data found without Fashion-MNIST, --alphas, --results, --device."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def accuracy(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import accuracy

    return accuracy


def test_the_student_subset_alone_needs_no_fashion_mnist(accuracy, tmp_path, monkeypatch):
    import cwkd.tasks.classification.data

    # as on the GPU machine
    monkeypatch.setattr(cwkd.tasks.classification.data, "find_fashion_mnist", lambda root=None: None)
    plan = replace(accuracy.Plan(), runs=tmp_path)
    student = tmp_path / "data" / "fmnist-train5000-test10000"
    student.mkdir(parents=True)
    (student / "done").write_text("{}")
    roots = accuracy.prepare_data(plan, teacher=False)
    assert roots == (student, tmp_path / "data" / "fmnist-train10000-test10000")
    with pytest.raises(SystemExit):  # the teacher must be trained: its subset is missing and cannot be written
        accuracy.prepare_data(plan)


def test_a_teacher_with_all_its_epochs_counts_as_trained(accuracy, tmp_path):
    plan = replace(accuracy.Plan(), runs=tmp_path, results=tmp_path / "results", teacher_epochs=2)
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "last.safetensors").write_bytes(b"")
    (out / "metrics.jsonl").write_text('{"val_top1": 1}\n')
    assert not accuracy.teacher_trained(plan)  # one epoch of two: a stopped run, trained again
    (out / "metrics.jsonl").write_text('{"val_top1": 1}\n{"val_top1": 2}\n')
    assert accuracy.teacher_trained(plan)


def test_alpha_options_pick_device_results_and_sweep(accuracy, tmp_path, monkeypatch, capsys):
    import alpha

    seen = {}
    monkeypatch.setattr(accuracy, "run_grid", lambda plan, cells, jobs: seen.update(plan=plan, cells=cells))
    monkeypatch.setattr(alpha, "report", lambda plan: None)
    alpha.main(["--device", "cuda", "--students", "mobilenetv1_100", "--alphas", "0.5,20", "--results",
                str(tmp_path)])
    plan = seen["plan"]
    assert plan.device == "cuda" and plan.alphas == (0.5, 20.0) and plan.results == tmp_path.resolve()
    assert {c.alpha for c in seen["cells"] if c.group == "alpha"} == {0.5, 20.0}
    assert accuracy.cell_path(plan, seen["cells"][0]).parent == tmp_path.resolve() / "accuracy"
    with pytest.raises(SystemExit, match="--alphas"):
        alpha.main(["--alphas", "7,x"])


def test_detection_options_reach_every_command(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import detection

    seen = {}
    monkeypatch.setattr(detection, "run_grid", lambda plan, jobs: seen.update(plan=plan, jobs=jobs))
    monkeypatch.setattr(detection, "report", lambda plan: "")
    detection.main(["--device", "cuda", "--jobs", "6", "--methods", "none", "cwt", "linear", "mgd",
                    "--results", str(tmp_path / "r"), "--runs", str(tmp_path / "w")])
    plan = seen["plan"]
    assert seen["jobs"] == 6 and plan.methods == ("none", "cwt", "linear", "mgd")
    assert plan.results == tmp_path / "r" and plan.runs == tmp_path / "w"
    assert "cuda" in detection._common(plan, tmp_path, 0, 1)
    assert "cpu" in detection._common(detection.Plan(), tmp_path, 0, 1)  # the default stays the CPU
    sys.modules.pop("detection", None)


def _fake_grid(detection, tmp_path, monkeypatch, teacher_fails: bool = False) -> list[str]:
    """Run detection.run_grid with a slow fake teacher and instant fake cells; return the event order."""
    import threading
    import time

    events, lock = [], threading.Lock()

    def log(event: str) -> None:
        with lock:
            events.append(event)

    def teacher(plan, data):
        log("teacher start")
        time.sleep(0.3)
        log("teacher end")
        if teacher_fails:
            raise RuntimeError("teacher broke")
        return {"scores": {"box_ap": 1.0}}

    def cell(plan, data, student, method, seed, auto=False):
        log(f"{method}-s{seed}")
        return {"scores": {"box_ap": 1.0}, "epoch_s": [0.0]}

    monkeypatch.setattr(detection, "prepare_data", lambda plan: tmp_path)
    monkeypatch.setattr(detection, "train_teacher", teacher)
    monkeypatch.setattr(detection, "run_cell", cell)
    plan = replace(detection.CPU, students=("fasterrcnn_resnet18",), results=tmp_path / "r", runs=tmp_path / "w")
    detection.run_grid(plan, jobs=2)
    return events


def test_detection_none_cells_train_beside_the_teacher(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import detection

    events = _fake_grid(detection, tmp_path, monkeypatch)
    end = events.index("teacher end")
    assert {"none-s0", "none-s1", "none-s2"} <= set(events[:end])  # they need no teacher
    assert {"cwt-s0", "cwt-s1", "cwt-s2"} <= set(events[end:])  # these distil from it
    sys.modules.pop("detection", None)


def test_detection_a_failed_teacher_keeps_the_none_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import detection

    with pytest.raises(SystemExit, match="4 run.*teacher, "):
        _fake_grid(detection, tmp_path, monkeypatch, teacher_fails=True)
    out = capsys.readouterr().out
    nones = [line for line in out.splitlines() if "none-s" in line]
    assert len(nones) == 3 and not any("FAILED" in line for line in nones)
    assert out.count("FAILED (RuntimeError: teacher broke)") == 4  # the teacher's line and its three cells
    sys.modules.pop("detection", None)


def test_detection_cpu_plan_is_a_faster_rcnn_pair(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import detection

    seen = {}
    monkeypatch.setattr(detection, "run_grid", lambda plan, jobs: seen.update(plan=plan))
    monkeypatch.setattr(detection, "report", lambda plan: "")
    detection.main(["--plan", "cpu"])
    plan = seen["plan"]
    assert plan.teacher == "fasterrcnn_resnet50" and plan.students == ("fasterrcnn_resnet18", "maskrcnn_resnet18")
    assert plan.results.name == "detection_cpu"
    assert plan.epochs_of("fasterrcnn_resnet18") == plan.epochs == 6 and plan.epochs_of("maskrcnn_resnet18") == 4
    sys.modules.pop("detection", None)


def test_detection_cell_trains_its_students_own_epochs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import detection

    commands = []

    def run_in(out, command):
        commands.append([str(c) for c in command])
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"config": {"alpha": 5e-7}}))
        return [{"val_box_ap": 1.0, "val_mask_ap": 2.0, "epoch_s": 1.0}]

    monkeypatch.setattr(detection, "run_in", run_in)
    plan = replace(detection.CPU, results=tmp_path / "r", runs=tmp_path / "w")
    result = detection.run_cell(plan, tmp_path, "maskrcnn_resnet18", "cwt", 0)
    detection.run_cell(plan, tmp_path, "fasterrcnn_resnet18", "none", 0)
    epochs = [command[command.index("--epochs") + 1] for command in commands]
    assert epochs == ["4", "6"] and result["scores"] == {"box_ap": 1.0, "mask_ap": 2.0}
    assert json.loads((tmp_path / "r" / "maskrcnn_resnet18-cwt-s0.json").read_text())["alpha"] == 5e-7
    sys.modules.pop("detection", None)


def test_detection_report_shows_mask_ap_only_where_measured(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import detection

    plan = replace(detection.CPU, results=tmp_path)
    (tmp_path / "teacher.json").write_text('{"model": "t", "scores": {"box_ap": 30.0}, "epochs": 1}')
    for method, ap in (("none", 20.0), ("cwt", 21.5)):
        record = {"student": "fasterrcnn_resnet18", "method": method, "seed": 0, "scores": {"box_ap": ap}}
        (tmp_path / f"fasterrcnn_resnet18-{method}-s0.json").write_text(json.dumps(record))
    table = detection.report(plan)
    assert "mask AP" not in table and "| 21.50 ± 0.00 | +1.50 ± 0.00 (1 paired) |" in table
    mask = replace(plan, students=("maskrcnn_resnet18",))
    record = {"student": "maskrcnn_resnet18", "method": "none", "seed": 0, "scores": {"box_ap": 1.0, "mask_ap": 2.0}}
    (tmp_path / "maskrcnn_resnet18-none-s0.json").write_text(json.dumps(record))
    assert "val mask AP (%)" in detection.report(mask)
    sys.modules.pop("detection", None)


def test_accuracy_report_of_results_outside_the_checkout(accuracy, tmp_path, capsys):
    """``--report --results DIR`` away from the checkout prints and saves paths as they are (it crashed on the
    plot's path, made relative to the checkout)."""
    import shutil

    results = tmp_path / "elsewhere"
    shutil.copytree(BENCH / "results" / "accuracy_mgd_channel", results)
    plan = replace(accuracy.Plan(), results=results)
    accuracy.report(plan)
    out = capsys.readouterr().out
    assert "| mgd" in out
    summary = json.loads((results / "accuracy_summary.json").read_text())
    assert summary["plan"]["results"] == str(results.resolve())
    if (results / "accuracy.png").is_file():  # matplotlib is optional
        assert f"plot: {results.resolve() / 'accuracy.png'}" in out


def test_segmentation_variant_runs_in_its_own_folders(tmp_path, monkeypatch, capsys):
    """``--students/--methods/--results``: a rerun (MGD's own mask) with its own teacher and baseline, apart from
    the grid's results and run directories."""
    monkeypatch.syspath_prepend(str(BENCH))
    import segmentation

    seen = []
    monkeypatch.setattr(segmentation, "run_grid", seen.append)
    results = tmp_path / "segmentation_mgd_faithful"
    assert segmentation.main(["--students", "pspnet_resnet18", "--methods", "mgd", "none", "--results",
                              str(results)]) == 0
    (plan,) = seen
    assert plan.students == ("pspnet_resnet18",) and plan.methods == ("none", "mgd")  # the grid's order
    assert plan.results == results and plan.runs == segmentation.RUNS / "segmentation_mgd_faithful"
    assert "no results yet" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        segmentation.main(["--methods", "cwd"])  # not one of the grid's methods
