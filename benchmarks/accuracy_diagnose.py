"""accuracy.py's ``--diagnose``: how strongly each loss term pulls on a student at initialisation, and the
teacher's top-1 on each student's input, as is and remapped."""

from __future__ import annotations

import math
import os

from accuracy_cells import teacher_normalization
from accuracy_data import prepare_data
from accuracy_plan import PAIRS, Plan
from common import write_json


def diagnose(plan: Plan, images: int = 256) -> dict:
    """At initialisation, how strongly does each term pull on the student? (A cheap look at "why".)

    For every student and feature method at the main alpha, on ``images`` training images with the trained
    teacher: the task and feature losses, the teacher map's mean square (the feature loss of an aligner
    that outputs zeros), and the gradient norm each term puts on the student's own weights.
    """
    import timm
    import torch

    from cwkd.core.distiller import FeatureDistiller
    from cwkd.data.transforms import build_transform, data_config
    from cwkd.tasks.classification.data import load_data
    from cwkd.training.build import build_teacher
    from cwkd.training.config import TrainConfig

    torch.set_num_threads(int(os.environ.get("CWKD_BENCH_THREADS", "1")))
    student_root, _ = prepare_data(plan)
    spec = load_data("fashion-mnist", root=str(student_root))
    teacher_ckpt = str(plan.runs / "teacher" / "last.safetensors")
    norm = teacher_normalization(plan.teacher, plan.input_size)
    rows = {}
    for name in plan.students:
        cfg = TrainConfig(data="fashion-mnist", student=name, teacher=teacher_ckpt, in_chans=1)
        teacher, _ = build_teacher(cfg, spec.num_classes, 1)
        for method in ("linear", "cwt", "mgd"):
            torch.manual_seed(0)
            student = timm.create_model(name, num_classes=spec.num_classes, in_chans=1)
            dcfg = data_config(student, input_size=plan.input_size, in_chans=1, **norm)  # as run_cell feeds it
            tf = build_transform(dcfg, train=False, channels=1)
            x = torch.stack([tf(spec.train[i][0]) for i in range(images)])
            y = torch.tensor([spec.train[i][1] for i in range(images)])
            d = FeatureDistiller(teacher, student, pairs=PAIRS[name], method=method, alpha=plan.alpha,
                                 input_size=plan.input_size)
            out = d(x, y)
            weights = [p for p in student.parameters() if p.requires_grad]
            logits_loss = torch.nn.functional.cross_entropy(out["outputs"], y)
            feat = out["loss"] - logits_loss  # alpha * feature loss, with its graph (the dict's parts are detached)
            g_task = torch.autograd.grad(logits_loss, weights, retain_graph=True, allow_unused=True)
            g_feat = torch.autograd.grad(feat, weights, allow_unused=True)
            with torch.no_grad():
                teacher(x)
                t_map = d._t_hooks.pop()[d.pairs[0].teacher.name]
            rows[f"{name}/{method}"] = {
                "task_loss": logits_loss.item(), "feat_loss": out["feat_loss"].item(),
                "teacher_mean_square": t_map.pow(2).mean().item(),
                "grad_task": _norm(g_task), "grad_feat_alpha": _norm(g_feat),
            }
            print(f"{name:24s} {method:7s} " + " ".join(f"{k}={v:.4g}" for k, v in rows[f'{name}/{method}'].items()))
    write_json(plan.results / "accuracy_diagnosis.json", {"alpha": plan.alpha, "images": images, "rows": rows,
                                                            "teacher_input": teacher_input_check(plan)})
    return rows


def teacher_input_check(plan: Plan, images: int = 3000) -> dict:
    """The teacher's test top-1 on batches normalised for each student, as is and remapped by cwkd.

    This is what the remap (``cwkd.Renormalize``) is for: a student whose timm statistics differ from the
    teacher's would otherwise distil from a teacher that sees the wrong input.
    """
    import timm
    import torch

    from cwkd.core.distiller import Renormalize
    from cwkd.data.loading import build_loaders
    from cwkd.data.transforms import data_config
    from cwkd.tasks.classification.data import load_data
    from cwkd.training.build import build_teacher
    from cwkd.training.config import TrainConfig

    student_root, _ = prepare_data(plan)
    spec = load_data("fashion-mnist", root=str(student_root))
    cfg = TrainConfig(data="fashion-mnist", student=plan.students[0], in_chans=1, method="none", kd_weight=1.0,
                      teacher=str(plan.runs / "teacher" / "last.safetensors"))
    teacher, source = build_teacher(cfg, spec.num_classes, 1)
    rows = {}
    for name in plan.students:
        dcfg = data_config(timm.create_model(name, num_classes=10, in_chans=1), input_size=plan.input_size, in_chans=1)
        remap = Renormalize.between((dcfg.mean, dcfg.std), (source.mean, source.std))
        _, loader = build_loaders(spec, dcfg, batch_size=500, workers=0)
        hits, seen = [0, 0], 0
        with torch.no_grad():
            for x, y in loader:
                if seen >= images:
                    break
                hits[0] += int((teacher(x).argmax(1) == y).sum())
                hits[1] += int((teacher(remap(x) if remap is not None else x).argmax(1) == y).sum())
                seen += len(y)
        rows[name] = {"student_mean": list(dcfg.mean), "student_std": list(dcfg.std), "images": seen,
                      "teacher_top1_as_is": 100 * hits[0] / seen, "teacher_top1_remapped": 100 * hits[1] / seen}
        print(f"{name:24s} mean/std {dcfg.mean}/{dcfg.std}: teacher top-1 on {seen} test images "
              f"{rows[name]['teacher_top1_as_is']:.1f}% as is, {rows[name]['teacher_top1_remapped']:.1f}% remapped")
    return {"teacher_mean": list(source.mean), "teacher_std": list(source.std), "rows": rows}


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
