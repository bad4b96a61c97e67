"""The benchmarks' options for a GPU machine: data found without Fashion-MNIST, --alphas, --results, --device."""

from __future__ import annotations

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
    import cwkd.data

    monkeypatch.setattr(cwkd.data, "find_fashion_mnist", lambda root=None: None)  # as on the GPU machine
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
