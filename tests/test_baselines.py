"""The comparison methods as their references do them: MGD's masks per task, CWD's loss, pixel-wise logit KD."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cwkd import ConfigError, FeatureDistiller, create_model
from cwkd.core.aligner import ChannelAlign, MaskedGenerator, aligner_macs, build_aligner
from cwkd.core.losses import channel_divergence, kd_loss
from cwkd.files.metadata import CheckpointMeta
from cwkd.training.config import TrainConfig


def _mask(kind: str, ratio: float, shape=(4, 32, 16, 16), seed: int = 0) -> torch.Tensor:
    gen = MaskedGenerator(shape[1], shape[1], kind, ratio)
    torch.manual_seed(seed)
    return gen.keep(torch.ones(shape))


def test_channel_mask_drops_whole_channels_per_image_at_the_ratio():
    keep = _mask("channel", 0.15, shape=(64, 256, 4, 4))
    assert keep.shape == (64, 256, 1, 1)
    assert 1 - keep.mean().item() == pytest.approx(0.15, abs=0.01)
    assert not torch.equal(keep[0], keep[1])  # drawn anew for each image
    assert torch.equal(keep, _mask("channel", 0.15, shape=(64, 256, 4, 4)))  # the seed decides it


def test_pixel_mask_drops_whole_positions_per_image_at_the_ratio():
    keep = _mask("pixel", 0.75, shape=(16, 8, 32, 32))
    assert keep.shape == (16, 1, 32, 32)
    assert 1 - keep.mean().item() == pytest.approx(0.75, abs=0.01)
    assert not torch.equal(keep[0], keep[1])
    assert torch.equal(keep, _mask("pixel", 0.75, shape=(16, 8, 32, 32)))
    assert not torch.equal(keep, _mask("pixel", 0.75, shape=(16, 8, 32, 32), seed=1))


def test_mgd_masks_in_training_only_and_aligns_channels_only_where_they_differ():
    gen = build_aligner("mgd", 8, 8, mgd_mask="pixel", mgd_ratio=0.5)
    assert isinstance(gen.align, torch.nn.Identity) and gen.mask.value == "pixel"
    x = torch.randn(2, 8, 6, 6)
    gen.eval()
    assert torch.equal(gen(x), gen.generate(x))
    gen.train()
    torch.manual_seed(0)
    masked = gen(x)
    assert not torch.allclose(masked, gen.generate(x))
    assert isinstance(build_aligner("mgd", 4, 8).align, torch.nn.Conv2d)
    assert build_aligner("mgd", 4, 8).mask.value == "channel"  # the library default: MGD's classification


@pytest.mark.parametrize("student,mask,ratio", [
    ("test_resnet", "channel", 0.15),
    ("pspnet_resnet18", "pixel", 0.75),
    ("fasterrcnn_resnet18", "pixel", 0.45),
    ("maskrcnn_resnet18", "pixel", 0.45),
    ("retinanet_resnet18", "pixel", 0.65),
])
def test_mgd_takes_the_mask_of_mgds_config_for_the_task(student, mask, ratio):
    cfg = TrainConfig(data="d", student=student, teacher="t.safetensors", method="mgd")
    assert (cfg.mgd_mask.value, cfg.mgd_ratio) == (mask, ratio)
    assert cfg.method_options == {"mgd_mask": cfg.mgd_mask, "mgd_ratio": ratio}
    assert cfg.cwd_tau is None


def test_mgd_options_override_the_default_and_the_old_mask_stays_reachable():
    cfg = TrainConfig(data="d", student="test_resnet", teacher="t.safetensors", method="mgd", mgd_mask="pixel",
                      mgd_ratio=0.15)
    assert (cfg.mgd_mask.value, cfg.mgd_ratio) == ("pixel", 0.15)
    cfg = TrainConfig(data="d", student="pspnet_resnet18", teacher="t.safetensors", method="mgd", mgd_ratio=0.5)
    assert (cfg.mgd_mask.value, cfg.mgd_ratio) == ("pixel", 0.5)


def test_a_config_saved_before_mgd_had_options_resumes_with_the_old_mask():
    saved = TrainConfig(data="d", student="test_resnet", teacher="t.safetensors", method="mgd").to_dict()
    assert TrainConfig.from_dict(saved).mgd_mask.value == "channel"
    del saved["mgd_mask"], saved["mgd_ratio"], saved["cwd_tau"]
    old = TrainConfig.from_dict(saved)
    assert (old.mgd_mask.value, old.mgd_ratio) == ("pixel", 0.15)


@pytest.mark.parametrize("options,message", [
    ({"method": "cwt", "mgd_ratio": 0.5}, "--mgd-ratio is an option of --method mgd"),
    ({"method": "cwt", "mgd_mask": "pixel"}, "--mgd-mask is an option of --method mgd"),
    ({"method": "mgd", "cwd_tau": 2.0}, "--cwd-tau is an option of --method cwd"),
    ({"method": "mgd", "mgd_ratio": 1.0}, "--mgd-ratio is the share masked, below 1"),
    ({"method": "cwd", "cwd_tau": 0.0}, "--cwd-tau must be at least"),
    ({"method": "cwd", "alpha": "auto"}, "--alpha auto is calibrated on the L2 feature loss"),
    ({"method": "cwd", "reduction": "sum"}, "--reduction sum is for the L2 feature loss"),
])
def test_method_options_are_refused_where_they_cannot_apply(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(data="d", student="test_resnet", teacher="t.safetensors", **options)


def test_checkpoint_metadata_records_the_method_options():
    meta = CheckpointMeta.from_dict({"model": "m", "num_classes": 2, "in_chans": 3, "input_size": [3, 8, 8],
                                     "mean": [0.5] * 3, "std": [0.5] * 3, "mgd_mask": "pixel", "mgd_ratio": 0.75})
    assert (meta.mgd_mask, meta.mgd_ratio, meta.cwd_tau) == ("pixel", 0.75, None)
    assert json.loads(json.dumps(meta.to_dict()))["mgd_ratio"] == 0.75


def _cwd_reference(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    """The CWD loss written out channel by channel."""
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            p_t = torch.softmax(t[i, j].flatten() / tau, 0)
            p_s = torch.softmax(s[i, j].flatten() / tau, 0)
            total += float((p_t * (p_t.log() - p_s.log())).sum())
    return total * tau * tau / (n * c)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_channel_divergence_matches_the_written_out_definition(tau):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert channel_divergence(s, t, tau).item() == pytest.approx(_cwd_reference(s, t, tau), rel=1e-5)
    assert channel_divergence(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)


def test_cwd_aligns_with_a_1x1_conv_only_where_channels_differ():
    assert isinstance(build_aligner("cwd", 8, 8).align, torch.nn.Identity)
    conv = build_aligner("cwd", 4, 8)
    assert isinstance(conv, ChannelAlign) and conv.align.kernel_size == (1, 1)
    assert aligner_macs("cwd", 4, 8, 2, 2) == 4 * 4 * 8 and aligner_macs("cwd", 8, 8, 2, 2) == 0


def test_a_cwd_distiller_reports_the_channel_divergence():
    torch.manual_seed(0)
    d = FeatureDistiller(create_model("test_efficientnet"), create_model("test_resnet"), method="cwd", cwd_tau=2.0,
                         input_size=64)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    out = d(images, labels)
    (key,) = [k for k in out if k.startswith("feat/")]
    _, maps, _ = d.paired_maps(images, labels)
    (s, t), = maps
    assert out[key].item() == pytest.approx(channel_divergence(d.align(0, s), t, 2.0).item(), rel=1e-4)
    out["loss"].backward()


def test_pixel_kd_averages_over_the_labelled_pixels_only():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    targets = torch.randint(0, 5, (2, 3, 4))
    targets[0, 0] = 255
    keep = targets != 255
    temp = 2.0
    per_pixel = (F.softmax(t / temp, 1) * (F.log_softmax(t / temp, 1) - F.log_softmax(s / temp, 1))).sum(1)
    expected = per_pixel[keep].mean() * temp * temp
    assert kd_loss(s, t, temp, keep).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(s, t, temp, torch.zeros_like(keep)).item() == 0.0


def test_kd_on_class_logits_is_hintons_batchmean_kl():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    hinton = F.kl_div(F.log_softmax(s / 4, -1), F.log_softmax(t / 4, -1), reduction="batchmean", log_target=True) * 16
    assert kd_loss(s, t, 4.0).item() == pytest.approx(hinton.item(), rel=1e-5)
