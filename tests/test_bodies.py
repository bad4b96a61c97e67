"""Dense models started from a classifier's body: --pretrained and --backbone-weights, files and refusals."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import safetensors
import timm
import torch
from safetensors.torch import save_file
from torchvision.models import mobilenet_v3_large

from cwkd.composite import Items, write_dense_dataset
from cwkd.errors import CheckpointError
from cwkd.tasks import get_task
from cwkd.tasks.bodies import match_keys
from cwkd.tasks.classification.models import create_model
from cwkd.tasks.segmentation.models import create_segmentation_model

from .helpers import cli_fails, cli_ok, make_image_folder, read_metrics

SEG, DET = get_task("segmentation"), get_task("detection")
FAST = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"]


def _classifier(name: str = "test_resnet", in_chans: int = 3, **kwargs) -> torch.nn.Module:
    """A classifier whose weights are nothing like a fresh model's, so a body that has them is told apart."""
    model = timm.create_model(name, num_classes=7, in_chans=in_chans, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name_, b in model.named_buffers():
            if name_.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return model.eval()


def _save(model: torch.nn.Module, path, prefix: str = "") -> str:
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if str(path).endswith(".safetensors") else torch.save(state, path)
    return str(path)


def test_a_classifier_body_in_a_pspnet_gives_the_classifier_features(tmp_path):
    clf = _classifier(output_stride=8)  # the segmenter dilates its body to stride 8: the same weights, same maps
    path = _save(clf, tmp_path / "clf.safetensors")
    seg = SEG.build_model("pspnet_test_resnet", num_classes=5, backbone_weights=path).eval()
    body = seg.cwkd_body
    assert body.matched == body.total and body.skipped == ("fc.bias", "fc.weight") and not body.fresh
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = clf.forward_intermediates(x, intermediates_only=True)[-2:]
        for got, want in zip(seg.backbone(x), expected, strict=True):
            torch.testing.assert_close(got, want)
    fresh = create_segmentation_model("pspnet_test_resnet", 5).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.backbone(x)[-1], expected[-1])


def test_a_classifier_body_in_a_faster_rcnn_gives_the_classifier_features(tmp_path):
    clf = _classifier()
    path = _save(clf, tmp_path / "clf.pth", prefix="module.")  # a .pth with DDP's prefix: both handled
    det = DET.build_model("fasterrcnn_test_resnet", num_classes=5, input_size=64, backbone_weights=path).eval()
    assert det.cwkd_body.matched == det.cwkd_body.total
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = clf.forward_intermediates(x, intermediates_only=True)[-4:]
        for got, want in zip(det.backbone.body(x), expected, strict=True):
            torch.testing.assert_close(got, want)


def test_a_gray_classifier_body_is_adapted_to_rgb_input(tmp_path):
    path = _save(_classifier(in_chans=1), tmp_path / "gray.safetensors")
    seg = SEG.build_model("pspnet_test_resnet", num_classes=5, backbone_weights=path)
    assert seg.cwkd_body.adapted == ("conv1.0.weight",) and seg.cwkd_body.matched == seg.cwkd_body.total


def test_another_architecture_is_refused_naming_both(tmp_path):
    path = _save(_classifier(), tmp_path / "test_resnet.safetensors")
    with pytest.raises(CheckpointError, match=r"fit only .* resnet18 backbone .* at least 90%"):
        SEG.build_model("pspnet_resnet18", num_classes=5, backbone_weights=path)
    with pytest.raises(CheckpointError, match="torchvision mobilenet_v3_large backbone"):
        SEG.build_model("lraspp_mobilenet_v3_large", num_classes=5, backbone_weights=path)


def test_torchvision_builders_take_torchvision_and_timm_resnet_bodies(tmp_path):
    mobile = mobilenet_v3_large(num_classes=9)  # torchvision names its trunk `features.`; the body has none
    det = DET.build_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, backbone_weights=_save(
        mobile, tmp_path / "mobile.safetensors"))
    assert det.cwkd_body.matched == det.cwkd_body.total and det.cwkd_body.arch == "torchvision mobilenet_v3_large"
    torch.testing.assert_close(det.backbone.body["0"][0].weight, mobile.features[0][0].weight)
    timm_r50 = create_model("resnet50", num_classes=3)  # timm's ResNet names its layers as torchvision's does
    seg = SEG.build_model("fcn_resnet50", num_classes=3, backbone_weights=_save(timm_r50, tmp_path / "r50.pth"))
    assert seg.cwkd_body.matched == seg.cwkd_body.total
    torch.testing.assert_close(seg.backbone.layer4[2].conv3.weight, timm_r50.layer4[2].conv3.weight)


def test_torchvision_pretrained_fetches_the_builder_default_and_fails_offline_in_one_error(monkeypatch):
    source = mobilenet_v3_large()
    asked = []

    def fake_download(url, **kwargs):
        asked.append(url)
        return source.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    seg = SEG.build_model("lraspp_mobilenet_v3_large", num_classes=4, pretrained=True)
    assert asked and "mobilenet_v3_large" in asked[0] and seg.cwkd_body.source == "ImageNet (torchvision)"
    torch.testing.assert_close(seg.backbone["16"][0].weight, source.features[16][0].weight)

    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="could not fetch torchvision's .* --backbone-weights FILE"):
        DET.build_model("fasterrcnn_resnet50_fpn", num_classes=3, pretrained=True)


def test_keys_match_under_wrapper_prefixes_and_timm_feature_names():
    pairs, prefix = match_keys(["stem_0.weight", "stages_1.blocks.0.conv.weight"],
                               ["model.stem.0.weight", "model.stages.1.blocks.0.conv.weight", "model.head.fc.weight"])
    assert prefix == "model." and pairs == {"stem_0.weight": "model.stem.0.weight",
                                            "stages_1.blocks.0.conv.weight": "model.stages.1.blocks.0.conv.weight"}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, (20, 28, 28)).astype(np.uint8) for s in ("train", "val")}
    labels = {s: rng.integers(0, 10, 20) for s in ("train", "val")}
    return write_dense_dataset(tmp_path_factory.mktemp("seg") / "voc", Items(images, labels, [f"c{i}" for i in
                               range(10)]), canvas=48, counts={"train": 8, "val": 4})


def test_pretrained_offline_is_one_line_naming_the_local_route(voc, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    cli_fails(["train", "--model", "pspnet_test_resnet", "--pretrained", "--data", voc, "--out", tmp_path / "r",
               *FAST], "test_resnet", "--backbone-weights")
    assert not (tmp_path / "r").exists()


def test_conflicting_and_misplaced_backbone_options_are_one_line(voc, tmp_path):
    cli_fails(["train", "--model", "pspnet_test_resnet", "--pretrained", "--backbone-weights", tmp_path / "x.pth",
               "--data", voc, *FAST], "give one of them")
    folder = make_image_folder(tmp_path / "cls")
    cli_fails(["train", "--model", "test_resnet", "--backbone-weights", tmp_path / "x.pth", "--data", folder,
               "--out", tmp_path / "c", *FAST], "no separate backbone", "--weights")


@pytest.mark.slow
def test_a_trained_classifier_starts_a_distilled_pspnet_recorded_and_resumed(voc, tmp_path):
    classifier = tmp_path / "cls"
    cli_ok(["train", "--model", "test_resnet", "--data", make_image_folder(tmp_path / "images"), "--input-size", "32",
            "--out", classifier, "-q", *FAST])
    out = tmp_path / "seg"
    weights = classifier / "best.safetensors"
    text = cli_ok(["distill", "--teacher", "pspnet_test_resnet", "--allow-random-teacher", "--student",
                   "pspnet_test_resnet", "--student-backbone-weights", weights, "--data", voc, "--out", out, *FAST])
    assert "student: backbone test_resnet from" in text and "75 of 75 body tensors loaded" in text
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["student_backbone_weights"] == str(weights)
    assert record["inputs"]["student_backbone_weights"]["sha256"] and record["body"]["source_arch"] == "test_resnet"
    meta = json.loads(safetensors.safe_open(str(out / "last.safetensors"), "pt").metadata()["cwkd"])
    assert meta["backbone_weights"] == str(weights)
    text = cli_ok(["distill", "--resume", out, "--epochs", "2"])
    assert "body tensors loaded" not in text  # the saved state is the student now, not the classifier again
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert json.loads((out / "config.json").read_text())["config"]["student_backbone_weights"] == str(weights)
    text = cli_ok(["train", "--model", "pspnet_test_resnet", "--backbone-weights", weights, "--data", voc,
                   "--out", tmp_path / "plain", *FAST])
    assert "model: backbone test_resnet from" in text and "student:" not in text  # plain training has no student
    cli_fails(["train", "--model", "pspnet_resnet18", "--backbone-weights", weights, "--data", voc, *FAST],
              "resnet18 backbone", "they are test_resnet's")


@pytest.mark.slow
def test_pretrained_student_and_teacher_bodies_through_the_cli(voc, tmp_path, monkeypatch):
    import cwkd.tasks.bodies

    fetched = []

    def hub(name, *, offline_hint, **kwargs):  # stands in for timm's download
        fetched.append(name)
        return _classifier(name, **kwargs)

    monkeypatch.setattr(cwkd.tasks.bodies, "fetch_pretrained", hub)
    out = tmp_path / "run"
    text = cli_ok(["distill", "--teacher", "deeplabv3_test_resnet", "--teacher-pretrained", "--student",
                   "pspnet_test_resnet", "--student-pretrained", "--data", voc, "--out", out, *FAST,
                   "--no-teacher-check"])  # its heads are fresh: the teacher check would refuse it, rightly
    assert fetched == ["test_resnet", "test_resnet"]
    assert "student: backbone test_resnet from ImageNet (timm)" in text and "teacher: backbone test_resnet" in text
    record = json.loads((out / "config.json").read_text())
    assert record["teacher"]["weights"] == "pretrained" and record["body"]["matched"] == record["body"]["total"]
    meta = json.loads(safetensors.safe_open(str(out / "last.safetensors"), "pt").metadata()["cwkd"])
    assert meta["backbone_weights"] == "pretrained"
