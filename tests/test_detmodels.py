"""Detectors by name (offline), their train/eval outputs, and FPN levels paired by measured stride."""

from __future__ import annotations

import pytest
import torch

from cwkd.errors import ConfigError, ModelNotFoundError, PairingError
from cwkd.tasks.detection.fpn import FPNLevel, fpn_levels, pair_fpn_levels, teacher_backbone_features
from cwkd.tasks.detection.models import (
    TORCHVISION_DETECTORS,
    TORCHVISION_INSTANCE,
    create_detection_model,
    detection_task,
    list_detection_models,
)


def _classes(model) -> int:
    if hasattr(model, "roi_heads"):
        return model.roi_heads.box_predictor.cls_score.out_features
    return model.head.classification_head.num_classes


@pytest.mark.parametrize("name", TORCHVISION_DETECTORS + TORCHVISION_INSTANCE)
def test_every_torchvision_detector_builds_offline_with_our_classes_and_size(name, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a builder tried to download weights")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = create_detection_model(name, num_classes=11, input_size=96)
    assert _classes(model) == 11 and model.cwkd_name == name
    assert model.transform.min_size == (96,) and model.transform.max_size == 160
    assert hasattr(model, "roi_heads") == (not name.startswith("retinanet"))
    assert (model.roi_heads.has_mask() if hasattr(model, "roi_heads") else False) == name.startswith("maskrcnn")


@pytest.mark.parametrize("name", ["fasterrcnn_resnet18", "retinanet_resnet18", "maskrcnn_resnet50"])
def test_timm_bodies_get_torchvision_heads(name):
    model = create_detection_model(name, num_classes=5, input_size=128)
    assert _classes(model) == 5 and model.backbone.out_channels == 256
    assert model.backbone.body.feature_info.reduction()[-1] == 32


@pytest.mark.parametrize("name", ["fasterrcnn_test_resnet", "maskrcnn_resnet50_fpn"])
def test_small_inputs_keep_fewer_proposals_and_sample_fewer_rois(name):
    small = create_detection_model(name, num_classes=5, input_size=128)
    assert small.rpn._pre_nms_top_n == {"training": 1000, "testing": 150}
    assert small.rpn._post_nms_top_n == {"training": 500, "testing": 150}
    assert small.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    for large in (create_detection_model(name, num_classes=5, input_size=640),
                  create_detection_model(name, num_classes=5)):  # torchvision's own counts
        assert large.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
        assert large.roi_heads.fg_bg_sampler.batch_size_per_image == 512


def test_retinanet_has_no_roi_stage_to_shrink():
    small, large = (create_detection_model("retinanet_test_resnet", num_classes=5, input_size=s) for s in (128, 640))
    assert small.topk_candidates == large.topk_candidates and small.detections_per_img == large.detections_per_img


def test_task_of_a_name_and_the_name_list():
    assert detection_task("maskrcnn_resnet50_fpn") == detection_task("maskrcnn_convnext_tiny") == "instance"
    assert detection_task("retinanet_resnet50_fpn") == detection_task("fasterrcnn_resnet18") == "detection"
    assert detection_task("resnet18") is None and detection_task("pspnet_resnet18") is None
    assert "maskrcnn_<timm name>" in list_detection_models("instance")
    assert "fasterrcnn_resnet50_fpn" not in list_detection_models("instance")
    assert set(TORCHVISION_DETECTORS) < set(list_detection_models())


def test_bad_names_and_sizes_are_clear_errors():
    with pytest.raises(ModelNotFoundError, match="unknown detection model 'yolo_resnet18'"):
        create_detection_model("yolo_resnet18", 3)
    with pytest.raises(ModelNotFoundError, match="'nosuchnet' in 'fasterrcnn_nosuchnet' is not a timm model"):
        create_detection_model("fasterrcnn_nosuchnet", 3)
    with pytest.raises(ConfigError, match="background plus at least one class"):
        create_detection_model("fasterrcnn_test_resnet", 1)
    with pytest.raises(ConfigError, match="--input-size 16 is too small"):
        create_detection_model("fasterrcnn_test_resnet", 3, input_size=16)


def _targets(masks: bool) -> list[dict]:
    one = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([3])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # an image with no objects
    if masks:
        one["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        one["masks"][0, 10:50, 8:40] = 1
        empty["masks"] = torch.zeros(0, 64, 64, dtype=torch.uint8)
    return [one, empty]


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_test_resnet",
                                  "retinanet_test_resnet", pytest.param("maskrcnn_test_resnet",
                                                                        marks=pytest.mark.slow)])
def test_train_mode_gives_a_loss_dict_and_eval_mode_detections(name):
    torch.manual_seed(0)
    model = create_detection_model(name, num_classes=11, input_size=64)
    images, masks = list(torch.rand(2, 3, 64, 64)), name.startswith("maskrcnn")
    losses = model.train()(images, _targets(masks))
    assert ("loss_mask" in losses) == masks and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 2
    assert {"boxes", "labels", "scores"} <= set(detections[0]) and ("masks" in detections[0]) == masks


def test_levels_pair_by_measured_stride_not_by_index():
    images = list(torch.rand(2, 3, 64, 80))
    teacher = create_detection_model("maskrcnn_test_resnet", 11, input_size=64)
    student = create_detection_model("retinanet_test_resnet", 11, input_size=64)
    t_levels, s_levels = fpn_levels(teacher, images), fpn_levels(student, images)
    assert [(lv.name, lv.stride) for lv in t_levels] == [("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64)]
    assert [(lv.name, lv.stride) for lv in s_levels] == [("0", 8), ("1", 16), ("2", 32), ("p6", 64), ("p7", 128)]
    pairs = pair_fpn_levels(t_levels, s_levels)
    assert [(p.teacher, p.student, p.stride) for p in pairs] == [("1", "0", 8), ("2", "1", 16), ("3", "2", 32)]
    # the other way round: RetinaNet's p6 (a conv) never meets the R-CNN's max-pooled level at 64
    assert [p.stride for p in pair_fpn_levels(s_levels, t_levels)] == [8, 16, 32]
    assert teacher.training and student.training  # probing put the modes back


def test_two_levels_at_one_stride_take_the_deeper_and_no_shared_stride_is_an_error():
    mobile = create_detection_model("fasterrcnn_mobilenet_v3_large_320_fpn", 11, input_size=64)
    levels = fpn_levels(mobile, [torch.rand(3, 64, 64)])
    assert [(lv.name, lv.stride) for lv in levels] == [("0", 32), ("1", 32), ("pool", 64)]
    teacher = [FPNLevel(str(i), 4 * 2**i, 256) for i in range(4)]
    assert [(p.teacher, p.student) for p in pair_fpn_levels(teacher, levels)] == [("3", "1")]
    with pytest.raises(PairingError, match="share no stride"):
        pair_fpn_levels(teacher[:2], levels)


def test_teacher_neck_on_the_student_batch_matches_its_own_view_after_remapping_mean_and_std():
    torch.manual_seed(0)
    images = list(torch.rand(2, 3, 64, 80))
    teacher = create_detection_model("fasterrcnn_test_resnet", 11, input_size=64).eval()  # mean/std 0.5
    student = create_detection_model("fasterrcnn_mobilenet_v3_large_320_fpn", 11, input_size=64).eval()  # ImageNet
    batch, _ = student.transform(images)
    got = teacher_backbone_features(teacher, student, batch.tensors, batch.image_sizes)
    with torch.no_grad():
        own = teacher.backbone(teacher.transform(images)[0].tensors)
    assert list(got) == list(own)
    for name in own:
        assert not got[name].is_inference() and torch.allclose(got[name], own[name], atol=1e-4)
    unmasked = teacher_backbone_features(teacher, student, batch.tensors)  # padding not zeroed: differs
    assert not torch.allclose(unmasked["0"], own["0"], atol=1e-4)
