"""Segmentation models by name: torchvision's builders offline, PSPNet/DeepLabV3 heads on timm bodies."""

from __future__ import annotations

import pytest
import torch

from cwkd.errors import ConfigError, ModelNotFoundError
from cwkd.tasks.segmentation.models import create_segmentation_model, is_segmentation_name


@pytest.mark.parametrize("name", ["pspnet_test_resnet", "deeplabv3_test_resnet", "pspnet_mobilenetv3_small_050"])
def test_timm_heads_return_out_and_aux_at_input_size(name):
    model = create_segmentation_model(name, num_classes=11).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 70, 50))
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 11, 70, 50)
    assert model.cwkd_name == name


def test_timm_body_is_dilated_to_stride_8_under_its_own_layer_names():
    model = create_segmentation_model("pspnet_resnet18", num_classes=3)
    assert model.backbone.feature_info.reduction() == [8, 8]
    seen = {}
    layer = dict(model.named_modules())["backbone.layer4"]  # timm's name, where discovery looks
    layer.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model.eval()(torch.randn(1, 3, 64, 64))
    assert seen["shape"] == (1, 512, 8, 8)


def test_a_body_that_cannot_dilate_still_builds_at_its_own_stride():
    model = create_segmentation_model("pspnet_ghostnet_050", num_classes=4, aux=False).eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert set(out) == {"out"} and out["out"].shape == (1, 4, 64, 64)


def test_gray_input_on_a_timm_body():
    model = create_segmentation_model("pspnet_test_resnet", num_classes=2, in_chans=1).eval()
    assert model(torch.randn(1, 1, 32, 32))["out"].shape == (1, 2, 32, 32)


@pytest.mark.parametrize("name", ["fcn_resnet50", "lraspp_mobilenet_v3_large"])
def test_torchvision_builders_run_offline_with_random_weights(name):
    model = create_segmentation_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, 5, 64, 64)
    assert ("aux" in out) == name.startswith("fcn")


def test_names_and_clear_errors():
    assert is_segmentation_name("pspnet_resnet18") and is_segmentation_name("deeplabv3_resnet101")
    assert not is_segmentation_name("resnet18")
    with pytest.raises(ModelNotFoundError, match="pspnet_<timm name>"):
        create_segmentation_model("unet_resnet18", num_classes=2)
    with pytest.raises(ModelNotFoundError, match="not a timm model"):
        create_segmentation_model("pspnet_resnet19", num_classes=2)
    with pytest.raises(ConfigError, match="3 input channels"):
        create_segmentation_model("fcn_resnet50", num_classes=2, in_chans=1)
    with pytest.raises(ConfigError, match="at least one class"):
        create_segmentation_model("pspnet_test_resnet", num_classes=0)
