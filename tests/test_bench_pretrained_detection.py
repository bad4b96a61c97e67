"""benchmarks/pretrained_detection.py's plans, cells and decision, and the shared helpers it added, without training."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import pretrained_detection

    yield pretrained_detection
    for name in ("pretrained_detection", "pretrained", "detection", "segmentation", "accuracy"):
        sys.modules.pop(name, None)


def test_every_plan_pretrains_its_bodies_and_the_gpu_one_needs_no_fashion_mnist(bench):
    for plan in bench.PLANS.values():
        assert {bench.body_of(m) for m in (plan.teacher, *plan.students)} <= set(plan.bodies)
        assert set(plan.arms) <= set(bench.ARMS)
    full, gpu, quick = bench.Plan(), bench.GPU, bench.QUICK
    assert full.arms == gpu.arms == ("none", "cwt", "mgd", "cwd")
    assert full.teacher == gpu.teacher == "fasterrcnn_resnet50" and gpu.students == ("fasterrcnn_resnet18",)
    assert len(gpu.seeds) == sys.modules["pretrained"].RULE_SEEDS and gpu.device == "cuda"
    for plan in (gpu, quick):  # the bundled set: no subset of the real one (it may be missing, as on the GPU)
        assert plan.source == plan.pretrain_data == "fashion-mnist-mini" and plan.pretrain_subset is None
    assert all(getattr(gpu, f) > getattr(quick, f) for f in ("canvas", "train_canvases", "val_canvases", "epochs",
                                                          "teacher_epochs", "pretrain_epochs"))
    assert bench.cells(replace(quick, seeds=(0, 1)))[:5] == [
        ("fasterrcnn_test_resnet", a, 0) for a in ("none", "cwt", "mgd", "cwd")] + [("fasterrcnn_test_resnet",
                                                                                       "none", 1)]


def test_the_plan_runs_each_arm_from_its_body_with_its_own_loss(bench, tmp_path, monkeypatch):
    plan = replace(bench.Plan(), seeds=(0, 1), results=tmp_path, runs=tmp_path)
    calls = []
    monkeypatch.setattr(bench, "pretrain_body", lambda plan, body: tmp_path / f"{body}.safetensors")
    monkeypatch.setattr(bench, "prepare_data", lambda plan, source: calls.append(("data", source)) or tmp_path)

    def teacher(plan, data, extra):
        calls.append(("teacher", extra))
        return {"scores": {"box_ap": 30.0}}

    def cell(plan, data, student, method, seed, *, name, distil, student_extra):
        calls.append((name, method, distil, student_extra))
        return {"scores": {"box_ap": 20.0}}

    monkeypatch.setattr(bench, "train_teacher", teacher)
    monkeypatch.setattr(bench, "run_cell", cell)
    (tmp_path / "fasterrcnn_resnet18-none-s1.json").write_text("{}")  # finished: not run again
    bench.run_plan(plan, jobs=3)
    clip = ("--clip-grad", 35)
    assert ("data", "fashion-mnist") in calls
    assert ("teacher", ("--backbone-weights", tmp_path / "resnet50.safetensors", *clip)) in calls
    body = ("--backbone-weights", tmp_path / "resnet18.safetensors")
    cells = {c[0]: c[1:] for c in calls if c[0].startswith("fasterrcnn")}
    assert cells["fasterrcnn_resnet18-none-s0"] == ("none", clip, (*body, *clip))
    assert cells["fasterrcnn_resnet18-cwt-s0"] == ("cwt", ("--reduction", "sum", "--alpha", 5e-7, *clip), body)
    assert cells["fasterrcnn_resnet18-mgd-s1"] == ("mgd", ("--reduction", "sum", "--alpha", 5e-7, *clip), body)
    assert cells["fasterrcnn_resnet18-cwd-s1"] == ("cwd", ("--alpha", 10, "--cwd-tau", 1, *clip), body)
    assert "fasterrcnn_resnet18-none-s1" not in cells and len(cells) == 2 * 4 - 1


def test_with_several_jobs_the_baselines_go_first_and_the_rest_seed_by_seed(bench, tmp_path):
    plan = replace(bench.Plan(), seeds=(0, 1), results=tmp_path)
    (tmp_path / "fasterrcnn_resnet18-mgd-s0.json").write_text("{}")  # finished: not queued

    def names(jobs: int) -> list[str]:
        return [f"{arm}-s{seed}" for _, arm, seed in bench.queue(plan, jobs)]

    assert names(1) == ["none-s0", "cwt-s0", "cwd-s0", "none-s1", "cwt-s1", "mgd-s1", "cwd-s1"]
    assert names(8) == ["none-s0", "none-s1", "cwt-s0", "cwd-s0", "cwt-s1", "mgd-s1", "cwd-s1"]


def test_a_failed_teacher_fails_the_distilled_cells_but_not_the_baselines(bench, tmp_path, monkeypatch, capsys):
    plan = replace(bench.QUICK, results=tmp_path, runs=tmp_path)
    monkeypatch.setattr(bench, "pretrain_body", lambda plan, body: tmp_path / "body.safetensors")
    monkeypatch.setattr(bench, "prepare_data", lambda plan, source: tmp_path)
    monkeypatch.setattr(bench, "train_teacher", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(bench, "run_cell", lambda *a, **k: {"scores": {"box_ap": 1.0}})
    with pytest.raises(SystemExit, match="4 run"):
        bench.run_plan(plan, jobs=2)
    out = capsys.readouterr().out
    assert "fasterrcnn_test_resnet-none-s0: val box AP 1.00" in out and "cwt-s0: FAILED (ZeroDivisionError" in out


def test_the_report_states_the_decision_in_box_ap(bench, tmp_path):
    plan = replace(bench.GPU, arms=("none", "cwt", "cwd"), results=tmp_path)
    (tmp_path / "teacher.json").write_text(json.dumps({"model": plan.teacher, "epochs": 10, "scores": {"box_ap": 28.0},
                                                       "history": [{"box_ap": 20.0}, {"box_ap": 28.0}]}))
    for seed, (base, cwt, cwd) in enumerate([(20, 22, 20), (21, 22.5, 21), (19, 20.8, 18), (20, 21, 20.5),
                                             (20, 19.9, 20)]):
        for arm, box in (("none", base), ("cwt", cwt), ("cwd", cwd)):
            (tmp_path / f"fasterrcnn_resnet18-{arm}-s{seed}.json").write_text(json.dumps({"scores": {"box_ap": box}}))
    text = bench.report(plan)
    assert "Teacher fasterrcnn_resnet50: val box AP 28.00 % after 10 epochs (per epoch: 20.0, 28.0)." in text
    assert "leads the student baseline (20.00) by +8.00 box AP." in text
    assert "| fasterrcnn_resnet18 | none | 5 | 20.00 ± 0.71 | | | | |" in text
    assert text.endswith("CWT (fasterrcnn_resnet18, box AP): pays: 4/5 positive, mean +1.24, 95 % interval above 0")
    assert "| cwd | 5 |" in text and "does not pay: positive in 1 of 5 seeds" in text


def test_a_detection_cell_passes_train_options_under_their_distill_names(bench, tmp_path, monkeypatch):
    import detection

    seen = []

    def run_in(out, args):
        seen.append([str(a) for a in args])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"config": {"alpha": 10.0}}))
        return [{"val_box_ap": 12.5, "epoch_s": 1.0, "train_loss": 1.0}]

    monkeypatch.setattr(detection, "run_in", run_in)
    plan = replace(bench.GPU, results=tmp_path, runs=tmp_path)
    body = ("--backbone-weights", "b.safetensors")
    result = detection.run_cell(plan, tmp_path, "fasterrcnn_resnet18", "cwd", 3, name="x",
                                distil=("--alpha", 10, "--clip-grad", 35), student_extra=body)
    distil = seen[0]
    assert distil[:2] == ["distill", "--teacher"] and "--student-backbone-weights" in distil
    assert distil[distil.index("--alpha") + 1] == "10" and "--reduction" not in distil
    assert "--clip-grad" in distil and "--student-clip-grad" not in distil and "--no-teacher-check" not in distil
    assert result["scores"] == {"box_ap": 12.5} and (tmp_path / "x.json").is_file()
    detection.run_cell(plan, tmp_path, "fasterrcnn_resnet18", "none", 3, name="y", student_extra=body)
    assert seen[1][:4] == ["train", "--model", "fasterrcnn_resnet18", "--backbone-weights"]
    detection.run_cell(plan, tmp_path, "fasterrcnn_resnet18", "cwt", 0)  # detection.py's own cells: unchanged
    assert seen[2][seen[2].index("--reduction"):seen[2].index("--reduction") + 4] == \
        ["--reduction", "sum", "--alpha", "5e-07"]


def test_pretraining_reads_the_plans_data_and_device(bench, tmp_path, monkeypatch):
    import pretrained

    seen = []

    def run_in(out, args):
        seen.append([str(a) for a in args])
        return [{"val_top1": 50.0, "epoch_s": 2.0}]

    monkeypatch.setattr(pretrained, "run_in", run_in)
    plan = replace(bench.GPU, results=tmp_path)
    pretrained.pretrain_body(plan, "resnet18")
    args = seen[0]
    assert args[args.index("--data") + 1] == "fashion-mnist-mini" and args[args.index("--device") + 1] == "cuda"
    assert "--data-root" not in args
    saved = json.loads((tmp_path / "bodies" / "resnet18" / "pretrain.json").read_text())
    assert saved["images"] == 6000 and saved["data"] == "fashion-mnist-mini"


def test_composited_data_from_the_bundled_set_has_its_own_folder(bench, tmp_path):
    import segmentation

    plan = replace(bench.QUICK, runs=tmp_path, canvas=48, train_canvases=2, val_canvases=1)
    root = segmentation.prepare_data(plan, source="fashion-mnist-mini")
    assert root.name == "fashion-mnist-mini-dense-48px-2-1" and (root / "done").is_file()
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert len(coco["images"]) == 1 and coco["annotations"]
