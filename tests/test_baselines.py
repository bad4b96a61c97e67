"""The comparison methods as their references do them: pixel-wise logit KD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cwkd.losses import kd_loss


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
