"""Cross-family pairing at input sizes that are not multiples of 32 (issue 10, section 6).

At 176 px a ResNet's stride-32 map is 6x6 and a ConvNeXt's 5x5; both are reduction 32 and must pair
(the student map is resized), instead of the pairing falling back to stride 16. The expected
reductions come from timm's ``feature_info``, not from cwkd's probe.
"""

from __future__ import annotations

import pytest
import torch

from cwkd import FeatureDistiller, create_model, pair_layers, probe

CNN_SIZES = (176, 100, 70)  # none a multiple of 32; test_vit needs a multiple of its patch (16)
VIT_SIZES = (176, 80)
PAIRS = [  # (teacher, student), each across families
    ("convnext_atto", "resnet10t"),
    ("test_convnext", "test_efficientnet"),
    ("test_resnet", "mobilenetv3_small_050"),
    ("regnetx_002", "test_convnext"),
    ("test_efficientnet", "regnetx_002"),
    ("mobilenetv3_small_050", "test_resnet"),
]
VIT_PAIRS = [("test_vit", "test_resnet"), ("test_convnext", "test_vit")]
CASES = [(t, s, size) for t, s in PAIRS for size in CNN_SIZES] + \
        [(t, s, size) for t, s in VIT_PAIRS for size in VIT_SIZES] + [("convnext_atto", "resnet10t", 224 + 16)]


def _timm_stages(model) -> dict[int, str]:
    """timm's deepest stage per nominal reduction: ``{reduction: module}``."""
    return {info["reduction"]: info["module"] for info in model.feature_info}


@pytest.mark.parametrize("teacher_name,student_name,size", CASES)
def test_every_shared_stride_pairs_and_the_distiller_runs(teacher_name, student_name, size):
    teacher, student = create_model(teacher_name, num_classes=3), create_model(student_name, num_classes=3)
    t_stages, s_stages = _timm_stages(teacher), _timm_stages(student)
    shared = sorted(set(t_stages) & set(s_stages))

    found = pair_layers(probe(student, size), probe(teacher, size), "all")
    assert [(p.student.name, p.teacher.name) for p in found] == [(s_stages[r], t_stages[r]) for r in shared]
    last = pair_layers(probe(student, size), probe(teacher, size), "last")
    assert [(p.student.name, p.teacher.name) for p in last] == [(s_stages[shared[-1]], t_stages[shared[-1]])]
    for pair in found:  # a pixel or so apart at most: the distiller resizes the student map
        assert abs(pair.student.height - pair.teacher.height) <= 1, pair.to_dict()

    distiller = FeatureDistiller(teacher, student, pairs="all", input_size=size)
    out = distiller(torch.randn(2, 3, size, size), torch.tensor([0, 2]))
    assert torch.isfinite(out["loss"]) and len([k for k in out if k.startswith("feat/")]) == len(shared)
    out["loss"].backward()


def test_convnext_and_resnet_pair_their_last_stage_at_the_default_176():
    """The case from the issue: `cwkd inspect --teacher convnext_atto --student resnet10t`."""
    from cwkd.inspection import propose_pairs

    report = propose_pairs("convnext_atto", "resnet10t")
    assert report["input_size"] == [3, 176, 176]
    (pair,) = report["pairs"]
    assert (pair["student"], pair["teacher"], pair["reduction"]) == ("layer4", "stages.3", 32)
    assert pair["student_shape"][1:] == [6, 6] and pair["teacher_shape"][1:] == [5, 5] and pair["resize"]


@pytest.mark.parametrize("size,feat,reduction", [(176, 6, 32), (176, 5, 32), (70, 5, 16), (70, 2, 32),
                                                 (224, 16, 14), (176, 121, None), (32, 33, None)])
def test_nominal_reduction(size, feat, reduction):
    from cwkd.core.features import _reduction

    assert _reduction(size, feat) == reduction
