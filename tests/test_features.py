"""Feature discovery and pairing, on tiny timm models and hand-made modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cwkd import LayerError, PairingError, create_model, pair_layers, probe
from cwkd.core.features import FeatureHooks, to_map


def _stages(model, size=64):
    return {layer.name: layer for layer in probe(model, size) if layer.is_stage}


def test_timm_stages_come_from_feature_info():
    stages = _stages(create_model("test_resnet"), 64)
    assert list(stages) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert [s.reduction for s in stages.values()] == [2, 4, 8, 16, 32]
    assert stages["layer4"].channels == 96 and (stages["layer4"].height, stages["layer4"].width) == (2, 2)


def test_probe_restores_mode_and_removes_hooks():
    model = create_model("test_resnet").train()
    model.layer1.eval()  # a mixed state must come back exactly
    probe(model, 32)
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(not m._forward_hooks for m in model.modules())


def test_vit_tokens_become_maps():
    layers = {layer.name: layer for layer in probe(create_model("test_vit"), 160)}
    block = layers["blocks.5"]
    assert block.layout == "nlc" and block.prefix_tokens == 1
    assert (block.channels, block.height, block.width, block.reduction) == (64, 10, 10, 16)
    tokens = torch.randn(2, 101, 64)
    fmap = to_map(tokens, block)
    assert fmap.shape == (2, 64, 10, 10)
    assert torch.equal(fmap[:, :, 0, 0], tokens[:, 1, :])  # the prefix token is dropped, grid is row-major


class Tiny(nn.Module):
    """A hand-made CNN: no feature_info, so stages are derived from the probe."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))).flatten(1))


def test_plain_module_stages_are_last_layer_per_reduction():
    stages = _stages(Tiny(), 32)
    assert list(stages) == ["stem", "body"]
    assert [(s.channels, s.reduction) for s in stages.values()] == [(8, 2), (16, 4)]


@pytest.mark.parametrize("teacher,student,expected", [
    ("test_resnet", "test_efficientnet", [("blocks.4", "layer4", 64, 96)]),
    ("test_efficientnet", "test_resnet", [("layer4", "blocks.4", 96, 64)]),
    ("test_vit", "test_resnet", [("layer3", "blocks.5", 192, 64)]),
    ("test_resnet", "test_vit", [("blocks.5", "layer3", 64, 192)]),
])
def test_pairing_last_across_families(teacher, student, expected):
    pairs = pair_layers(probe(create_model(student), 64), probe(create_model(teacher), 64), "last")
    assert [(p.student.name, p.teacher.name, p.student.channels, p.teacher.channels) for p in pairs] == expected


def test_pairing_all_uses_every_shared_reduction():
    pairs = pair_layers(probe(create_model("test_efficientnet"), 64), probe(create_model("test_resnet"), 64), "all")
    assert [p.teacher.reduction for p in pairs] == [2, 4, 8, 16, 32]


def test_pairing_with_no_shared_reduction_says_what_to_do():
    with pytest.raises(PairingError, match="--pairs"):
        pair_layers(probe(Tiny(), 32), probe(create_model("test_vit"), 32), "last")


def test_explicit_pairs_are_validated():
    s, t = probe(create_model("test_efficientnet"), 64), probe(create_model("test_resnet"), 64)
    assert [p.key for p in pair_layers(s, t, "blocks.3:layer3")] == ["blocks.3->layer3"]
    with pytest.raises(LayerError, match="cwkd inspect"):
        pair_layers(s, t, "blocks.3:layer9")
    with pytest.raises(LayerError, match="STUDENT_LAYER:TEACHER_LAYER"):
        pair_layers(s, t, "blocks.3")
    with pytest.raises(PairingError, match="resize"):
        pair_layers(s, t, "blocks.0:layer4")  # 32x32 onto 2x2 is 16x apart


def test_feature_hooks_clear_after_read():
    model = create_model("test_resnet").eval()
    with FeatureHooks(model, ["layer2"]) as hooks:
        model(torch.randn(1, 3, 32, 32))
        assert len(hooks) == 1
        assert set(hooks.pop()) == {"layer2"}
        assert len(hooks) == 0
    assert not model.layer2._forward_hooks
