"""FeatureDistiller: what trains, what stays frozen, what is saved, and what leaks."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

from cwkd import ConfigError, FeatureDistiller, Method, Renormalize, create_model
from cwkd.core.aligner import ChannelWiseTransform, LinearTransform, MaskedGenerator
from cwkd.core.distilltask import DistillTask
from cwkd.core.losses import convert_alpha, feature_loss

from .test_features import Tiny


def _pair(method="cwt", **kw):
    teacher = create_model("test_resnet", num_classes=5)
    student = create_model("test_efficientnet", num_classes=5)
    return FeatureDistiller(teacher, student, method=method, input_size=64, **kw)


def _batch(n=4, size=64):
    return torch.randn(n, 3, size, size), torch.randint(0, 5, (n,))


def test_gradients_reach_student_and_aligners_but_not_teacher():
    d = _pair()
    out = d(*_batch())
    out["loss"].backward()
    assert all(p.grad is not None for p in d.aligners.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())


def test_teacher_is_frozen_and_out_of_the_optimizer():
    d = _pair()
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    opt = torch.optim.SGD(d.parameters(), lr=0.5)
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in d.parameters()}
    d.train()
    assert not d.teacher.training and d.student.training
    for _ in range(2):
        opt.zero_grad()
        d(*_batch())["loss"].backward()
        opt.step()
    after = d.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert not any(k.startswith("teacher") for k in d.state_dict())


def test_forward_returns_all_loss_parts():
    d = _pair(kd_weight=0.5)
    out = d(*_batch())
    assert {"loss", "task_loss", "feat_loss", "kd_loss", "outputs", "feat/blocks.4->layer4"} <= set(out)
    expected = out["task_loss"] + d.alpha * out["feat_loss"] + 0.5 * out["kd_loss"]
    assert torch.allclose(out["loss"].detach(), expected)


@pytest.mark.parametrize("teacher,student,pairs,shapes", [
    ("test_resnet", "test_efficientnet", "last", [(64, 96, 96)]),
    ("test_resnet", "test_efficientnet", "all", [(16, 32, 32), (24, 32, 32), (32, 48, 48), (48, 192, 192),
                                                 (64, 96, 96)]),
    ("test_vit", "test_resnet", "last", [(192, 64, 64)]),
])
def test_aligner_shapes(teacher, student, pairs, shapes):
    d = FeatureDistiller(create_model(teacher), create_model(student), pairs=pairs, input_size=64)
    got = [(a.fc1.in_channels, a.fc1.out_channels, a.fc2.out_channels) for a in d.aligners.values()]
    assert got == shapes


def test_hidden_width_and_methods():
    assert _pair(hidden=7).aligners["pair0"].fc1.out_channels == 7
    assert isinstance(_pair("cwt").aligners["pair0"], ChannelWiseTransform)
    assert isinstance(_pair("linear").aligners["pair0"], LinearTransform)
    assert isinstance(_pair("mgd").aligners["pair0"], MaskedGenerator)
    assert len(_pair("none", kd_weight=1.0).aligners) == 0


def test_hand_made_modules_work():
    d = FeatureDistiller(Tiny(), Tiny(), input_size=32)
    out = d(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    out["loss"].backward()
    assert [p.key for p in d.pairs] == ["body->body"]


class _Halved(DistillTask):
    """A task of one's own: the classifier's loss, halved, and no logits for KD."""

    logits = None

    def loss(self, outputs, targets, *, label_smoothing=0.0):
        return {"task_loss": 0.5 * F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)}


def test_no_task_is_a_plain_classifier_with_label_smoothing_and_a_task_replaces_its_answers():
    images, targets = _batch()
    student = create_model("test_efficientnet", num_classes=5)
    smoothed = FeatureDistiller(None, student, method="none", label_smoothing=0.2)(images, targets)
    assert torch.equal(smoothed["task_loss"],
                       F.cross_entropy(smoothed["outputs"].float(), targets, label_smoothing=0.2))
    halved = FeatureDistiller(None, student, method="none", label_smoothing=0.2, task=_Halved())(images, targets)
    assert torch.equal(halved["task_loss"], 0.5 * smoothed["task_loss"])
    with pytest.raises(ConfigError, match="needs class logits"):
        _pair(kd_weight=0.5, task=_Halved())


def test_student_state_dict_has_no_aligners():
    d = _pair()
    keys = set(d.student_state_dict())
    assert keys == set(d.student.state_dict())
    assert not any("fc1" in k or "aligner" in k for k in keys)


def test_no_feature_tensors_leak_between_steps():
    d = _pair()
    d(*_batch())["loss"].backward()
    assert len(d._s_hooks) == 0 and len(d._t_hooks) == 0
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gc.get_objects() touches deprecated torch attributes
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[0] == 4]
    assert live == []  # nothing of batch size 4 (a feature map) survives the step


def test_spatial_mismatch_is_resized():
    d = FeatureDistiller(create_model("test_resnet"), create_model("test_efficientnet"),
                         pairs="blocks.3:layer4", input_size=64)
    assert d.pairs[0].needs_resize
    d(*_batch())["loss"].backward()


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError):
        _pair(alpha=-1.0)
    with pytest.raises(ConfigError):
        _pair(alpha=float("nan"))
    with pytest.raises(ConfigError):
        FeatureDistiller(None, create_model("test_resnet"), method=Method.cwt)


def test_feature_loss_reductions_convert():
    s, t = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    mean, total = feature_loss(s, t, "mean"), feature_loss(s, t, "sum")
    assert torch.allclose(total * convert_alpha(1.0, 8, 3, 3, to="sum"), mean)


def test_bf16_autocast_on_cpu():
    d = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(*_batch())
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_renormalize_matches_normalising_the_raw_image():
    raw = torch.rand(2, 3, 8, 8)
    s_mean, s_std, t_mean, t_std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)

    def norm(x, mean, std):
        return (x - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)

    remap = Renormalize.between((s_mean, s_std), (t_mean, t_std))
    torch.testing.assert_close(remap(norm(raw, s_mean, s_std)), norm(raw, t_mean, t_std))
    assert Renormalize.between((s_mean, s_std), (s_mean, s_std)) is None


def test_teacher_input_reaches_the_teacher_only():
    teacher, student = create_model("test_resnet"), create_model("test_efficientnet")
    remap = Renormalize((0.0,) * 3, (1.0,) * 3, (0.5,) * 3, (2.0,) * 3)
    d = FeatureDistiller(teacher, student, input_size=64, teacher_input=remap).to(torch.float64)
    seen = {}
    teacher.register_forward_pre_hook(lambda m, a: seen.update(teacher=a[0]))
    student.register_forward_pre_hook(lambda m, a: seen.update(student=a[0]))
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    d(images, torch.tensor([0, 1]))
    torch.testing.assert_close(seen["student"], images)
    torch.testing.assert_close(seen["teacher"], (images - 0.5) / 2.0)
    assert remap.scale.dtype == torch.float64  # .to() reached the remap held outside the module tree
    assert not any(n.startswith("teacher_input") for n in d.state_dict())


@pytest.mark.parametrize("option, value, needle", [
    ("kd_weight", float("inf"), "kd_weight must be a finite number"),
    ("alpha", -1.0, "alpha must be at least 0"),
    ("hidden", 70000, "hidden must be from 1 to 65536 channels"),  # the CLI's limit, now the library's too
    ("label_smoothing", 1.0, "label_smoothing must be below 1"),
])
def test_bad_options_are_refused_by_the_same_checks_as_the_cli(option, value, needle):
    with pytest.raises(ConfigError, match=needle):
        _pair(**{option: value})
