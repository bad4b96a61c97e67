"""benchmarks/pretrained.py's plan and decision rule, without training anything."""

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
    import pretrained

    yield pretrained
    for name in ("pretrained", "segmentation", "accuracy"):
        sys.modules.pop(name, None)


def test_the_decision_rule_needs_four_of_five_positive_a_mean_of_one_and_an_interval_above_zero(bench):
    pays = bench.decide([1.0, 2.0, 3.0, 4.0, 5.0])
    assert pays.pays and pays.positive == 5 and pays.low == pytest.approx(3 - 2.776 * 1.5811 / 5 ** 0.5, abs=1e-3)
    assert bench.decide([1.5, 2.0, 0.8, 1.2, -0.1]).pays  # one seed below 0 is allowed
    three = bench.decide([2.0, 2.0, 2.0, -0.1, -0.1])
    assert three.pays is False and "positive in 3 of 5" in three.reason
    small = bench.decide([0.5, 0.6, 0.7, 0.8, 0.9])
    assert small.pays is False and "mean +0.70 < 1" in small.reason
    wide = bench.decide([6.0, 4.0, 3.0, 2.0, -9.0])  # mean 1.2, 4 positive, but the interval reaches below 0
    assert wide.pays is False and "95 % interval reaches" in wide.reason and "positive" not in wide.reason
    early = bench.decide([3.0, 3.0])
    assert early.pays is None and "2 of the 5" in early.reason


def test_every_plan_pretrains_the_bodies_its_models_use(bench):
    for plan in (bench.Plan(), bench.QUICK):
        assert {bench.body_of(m) for m in (plan.teacher, *plan.students)} <= set(plan.bodies)
        assert set(plan.arms) <= set(bench.ARMS)
    full = bench.Plan()
    assert len(full.seeds) == bench.RULE_SEEDS and full.arms == ("none", "cwt", "cwt-auto", "mgd", "cwd", "cwt+kd")
    assert full.body_runs == bench.RESULTS / "pretrained" / "bodies"


def test_the_plan_runs_each_arm_from_its_body(bench, tmp_path, monkeypatch):
    plan = replace(bench.Plan(), bodies=("resnet18", "resnet50"), seeds=(0, 1), results=tmp_path, runs=tmp_path)
    calls = []
    monkeypatch.setattr(bench, "pretrain_body", lambda plan, body: tmp_path / f"{body}.safetensors")
    monkeypatch.setattr(bench, "prepare_data", lambda plan: tmp_path / "data")
    monkeypatch.setattr(bench, "train_teacher", lambda plan, data, extra: calls.append(("teacher", extra))
                        or {"miou": 50.0})
    monkeypatch.setattr(bench, "teacher_alpha", lambda plan: (0.07, [2048, 8, 8]))

    def cell(plan, data, student, method, seed, alpha, *, name, extra, student_extra):
        calls.append((name, method, alpha, extra, student_extra))
        return {"miou": 1.0}

    monkeypatch.setattr(bench, "run_cell", cell)
    (tmp_path / "pspnet_resnet18-none-s1.json").write_text("{}")  # finished: not run again
    bench.run_plan(plan)
    assert calls[0] == ("teacher", ("--backbone-weights", tmp_path / "resnet50.safetensors"))
    body = ("--backbone-weights", tmp_path / "resnet18.safetensors")
    cells = {c[0]: c[1:] for c in calls[1:]}
    assert cells["pspnet_resnet18-none-s0"] == ("none", None, (), body)
    assert cells["pspnet_resnet18-cwt-s0"] == ("cwt", 0.07, (), body)
    assert cells["pspnet_resnet18-cwt-auto-s1"] == ("cwt", "auto", (), body)
    assert cells["pspnet_resnet18-cwt+kd-s0"] == ("cwt", 0.07, ("--kd-weight", bench.KD_WEIGHT), body)
    assert cells["pspnet_resnet18-cwd-s1"] == ("cwd", "5", ("--pairs", bench.CWD_PAIRS), body)
    assert "pspnet_resnet18-none-s1" not in cells
    assert len(cells) == 2 * 6 - 1


def test_the_decision_arms_run_first_seed_by_seed_then_each_other_arm_by_rows(bench):
    plan = replace(bench.Plan(), arms=("none", "cwt", "mgd", "cwd"), seeds=(0, 1))
    order = [(arm, seed) for _, arm, seed in bench.cell_order(plan)]
    assert order == [("none", 0), ("cwt", 0), ("none", 1), ("cwt", 1), ("mgd", 0), ("mgd", 1), ("cwd", 0),
                     ("cwd", 1)]


def test_the_report_states_the_decision_from_paired_seeds(bench, tmp_path):
    plan = replace(bench.Plan(), arms=("none", "cwt", "mgd"), results=tmp_path)
    (tmp_path / "teacher.json").write_text(json.dumps({"model": plan.teacher, "miou": 40.0, "epochs": 20,
                                                       "history": [30.0, 40.0]}))
    for seed, (base, cwt, mgd) in enumerate([(30, 32, 30), (31, 32.5, 31), (29, 30.8, 28), (30, 31, 30.5),
                                             (30, 29.9, 30)]):
        for arm, miou in (("none", base), ("cwt", cwt), ("mgd", mgd)):
            (tmp_path / f"pspnet_resnet18-{arm}-s{seed}.json").write_text(json.dumps(
                {"miou": miou, "history": [miou - 0.1, miou], "epoch_s": [10.0, 12.0] if arm != "mgd" else [30.0]}))
    text = bench.report(plan)
    assert "Median epoch time per arm (s, wall clock on the machine that ran the cells): none 11, cwt 11, mgd 30." \
        in text
    assert "leads the student baseline (30.00) by +10.00 mIoU." in text
    assert "CWT (pspnet_resnet18, mIoU): pays: 4/5 positive, mean +1.24" in text
    assert "| mgd | 5 |" in text and "does not pay: positive in 1 of 5 seeds" in text


def test_results_points_the_plan_and_the_report_at_another_folder(bench, tmp_path, capsys):
    (tmp_path / "teacher.json").write_text(json.dumps({"model": "pspnet_resnet50", "miou": 31.25, "epochs": 8,
                                                       "history": [30.0, 31.25]}))
    for arm, miou in (("none", 20.0), ("cwt", 21.5)):
        (tmp_path / f"pspnet_resnet18-{arm}-s0.json").write_text(json.dumps({"miou": miou, "history": [miou]}))
    assert bench.main(["--report", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "val mIoU 31.25 %" in out and "leads the student baseline (20.00) by +11.25" in out
    assert "| pspnet_resnet18 | cwt | 1 |" in out and "+1.50" in out and "undecided: 1 of the 5" in out


def test_results_record_the_cpu_model_and_the_kernels_torch_uses_on_it(bench, monkeypatch, tmp_path):
    import common
    import torch

    from cwkd import runtime

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\n")
    monkeypatch.setattr(runtime, "CPUINFO", info)
    found = common.versions()
    assert found["cpu"] == "Example CPU 9000"
    assert found["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
