"""``--alpha auto``: the rule, the probe's promises (no weight changes, every aligner and loss form), the CLI."""

from __future__ import annotations

import copy
import json
import math
import statistics

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from cwkd.cli.app import app
from cwkd.composite import Items, write_dense_dataset
from cwkd.core.autoalpha import MAX_LOSS_RATIO, RATIO, choose, measure, pick_alpha
from cwkd.core.distiller import FeatureDistiller
from cwkd.errors import ConfigError, TrainingError
from cwkd.files.checkpoint import read_metadata
from cwkd.tasks import get_task

from .helpers import cli_fails

runner = CliRunner()
COMMON = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]


def _row(g_task: float, g_feat: float, task: float = 2.0, feat: float = 1.0) -> dict:
    return {"grad_task": g_task, "grad_feat": g_feat, "task_loss": task, "feat_loss": feat}


def test_the_rule_is_the_median_gradient_ratio_times_ratio():
    rows = [_row(6.0, 2.0), _row(8.0, 2.0), _row(1000.0, 1.0)]  # ratios 3, 4, 1000: the outlier is ignored
    assert choose(rows, ratio=1.0).alpha == pytest.approx(4.0)
    assert choose(rows, ratio=0.5).alpha == pytest.approx(2.0)
    assert choose(rows).alpha == pytest.approx(4.0 * RATIO)


def test_the_rule_caps_alpha_where_the_feature_loss_would_swamp_the_task_loss():
    picked = choose([_row(1e6, 1.0, task=2.0, feat=1.0)])
    assert picked.capped and picked.alpha == pytest.approx(MAX_LOSS_RATIO * 2.0)
    assert "capped" in picked.line()


@pytest.mark.parametrize("row, needle", [
    (_row(5.0, 0.0), "no gradient on the student"),
    (_row(5.0, math.nan), "non-finite"),
    (_row(math.inf, 1.0), "non-finite"),
    (_row(0.0, 1.0), "task loss puts no gradient"),
])
def test_the_rule_never_gives_a_non_finite_or_zero_alpha(row, needle):
    with pytest.raises(TrainingError, match=needle):
        choose([row])


def _distiller(method: str = "cwt", reduction: str = "mean") -> FeatureDistiller:
    torch.manual_seed(0)
    teacher, student = timm.create_model("test_resnet", num_classes=4), timm.create_model("test_efficientnet",
                                                                                            num_classes=4)
    return FeatureDistiller(teacher, student, method=method, alpha="auto", reduction=reduction, input_size=32)


def _batches(count: int = 3) -> list[tuple]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 4, (4,), generator=gen))
            for _ in range(count)]


@pytest.mark.parametrize("method", ["cwt", "linear", "mgd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_aligner_and_loss_form_gets_a_finite_positive_alpha_and_nothing_changes(method, reduction):
    d = _distiller(method, reduction)
    d.eval()
    before = {k: v.clone() for k, v in d.state_dict().items()}  # weights and BatchNorm statistics
    picked = pick_alpha(d, _batches())
    assert math.isfinite(picked.alpha) and picked.alpha > 0 and d.alpha == picked.alpha
    assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())
    assert all(p.grad is None for p in d.parameters()) and not d.training  # mode restored, no .grad left
    assert torch.isfinite(d(*_batches(1)[0])["loss"])


def test_cwt_linear_and_mgd_pick_the_same_alpha_on_the_same_pair():
    """The feature gradient goes through a fitted linear map, not the run's untrained aligner (MGD's starts ~40x
    weaker than CWT's, and the old rule's pick diverged)."""
    picks = [pick_alpha(_distiller(method), _batches()) for method in ("cwt", "linear", "mgd")]
    assert picks[0].alpha == pytest.approx(picks[1].alpha, rel=1e-5) == pytest.approx(picks[2].alpha, rel=1e-5)
    assert picks[0].grad_feat == pytest.approx(picks[2].grad_feat, rel=1e-5)


def _batch_statistics_only(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm on batch statistics in train and eval mode alike, so a frozen copy computes the same maps."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    return model


def test_a_teacher_that_is_a_linear_map_of_the_student_has_nothing_to_teach():
    """Known answer: the teacher's map is exactly the student's (the identity map), so the fitted map recovers it,
    the fitted feature loss is float noise, and auto refuses instead of picking an enormous alpha."""
    torch.manual_seed(0)
    student = timm.create_model("test_efficientnet", num_classes=4)
    teacher = copy.deepcopy(student)
    d = FeatureDistiller(teacher, student, pairs=[("blocks.1", "blocks.1")], method="cwt", alpha="auto",
                         input_size=32)  # 24 channels, 8x8 pixels: the other batches determine the map
    _batch_statistics_only(student), _batch_statistics_only(teacher)  # after the one-image probe pass
    rows = measure(d, _batches())
    assert all(r["grad_feat"] == 0.0 and r["feat_loss"] < 1e-9 for r in rows)
    with pytest.raises(TrainingError, match="a linear map of the student's maps already gives the teacher's"):
        pick_alpha(d, _batches())


def test_a_single_batch_is_measured_as_two_halves_each_through_the_map_the_other_fits():
    """A train set of one batch failed with "a linear map ... already gives the teacher's": the map was fitted on
    the very batch it measured, and memorised it."""
    def every_stage() -> FeatureDistiller:  # maps of 16x16 down to 1x1: the larger ones fit on a half of 4 images
        torch.manual_seed(0)
        teacher, student = (timm.create_model(n, num_classes=4) for n in ("test_resnet", "test_efficientnet"))
        return FeatureDistiller(teacher, student, pairs="all", alpha="auto", input_size=32)

    batch = _batches(1)
    rows = measure(every_stage(), batch)
    assert len(rows) == 2 and all(r["grad_feat"] > 0 and r["feat_loss"] > 1e-6 for r in rows)
    picked = pick_alpha(every_stage(), batch)
    assert math.isfinite(picked.alpha) and picked.alpha > 0 and "over 1 batch, as two halves" in picked.line()


def test_a_single_batch_too_small_to_split_says_exactly_that():
    images, labels = _batches(1)[0]
    with pytest.raises(TrainingError, match="a half holds 2 pixel\\(s\\) of blocks.4's 64-channel maps, fewer than "
                                            "the 65 such a map needs; add training images or raise --input-size"):
        pick_alpha(_distiller(), [(images, labels)])  # 1x1 maps, 2 images a half
    with pytest.raises(TrainingError, match="one batch of one sample, and the probe map must be fitted on other "
                                            "samples than it is measured on; add training images, or set --alpha"):
        pick_alpha(_distiller(), [(images[:1], labels[:1])])


def test_the_line_gives_the_capped_fitted_ratio_and_the_ratio_the_run_will_report():
    """The cap bounds the loss through the fitted map; a run reports the loss through its own untrained aligners,
    which starts far higher (a detection run saw 57x under a '7.5x' cap): the line now gives both."""
    d, batches = _distiller(), _batches()
    picked = pick_alpha(d, batches)
    d.train()
    with torch.no_grad():
        reported = statistics.median(float(d(*batch)["feat_loss"]) for batch in batches)  # what epoch 1 logs
    assert picked.own_loss == pytest.approx(reported, rel=1e-5)
    fitted, own = picked.alpha * picked.feat_loss / picked.task_loss, picked.alpha * reported / picked.task_loss
    assert fitted <= MAX_LOSS_RATIO < own  # the cap holds in fitted units only: here the aligners start far above
    assert (f"the weighted feature loss starts at {fitted:.3g}x the task loss through a fitted linear map (at most "
            f"7.5x), {own:.3g}x through this run's untrained aligners") in picked.line()


def test_detection_feature_taps_get_an_alpha_too():
    """A detector's pairs come from its FPN taps; the fitted measurement reads them through the same seam."""
    task = get_task("detection")
    torch.manual_seed(0)
    teacher = task.build_model("maskrcnn_test_resnet", num_classes=4, input_size=64)
    student = task.build_model("fasterrcnn_test_resnet", num_classes=4, input_size=64)
    d = FeatureDistiller(teacher, student, alpha="auto", input_size=64, task=task)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    picked = pick_alpha(d, [(list(torch.rand(2, 3, 64, 64)), targets) for _ in range(2)])
    assert math.isfinite(picked.alpha) and picked.alpha > 0


def test_the_sum_form_picks_the_mean_forms_alpha_over_the_map_size():
    """Known answer: the summed loss is the mean one times C*H*W, so its alpha is that much smaller."""
    mean, total = (pick_alpha(_distiller(reduction=r), _batches()) for r in ("mean", "sum"))
    pair = _distiller().pairs[0].teacher
    assert total.alpha * pair.channels * pair.height * pair.width == pytest.approx(mean.alpha, rel=1e-3)


def test_the_same_batches_pick_the_same_alpha():
    assert pick_alpha(_distiller(), _batches()).alpha == pick_alpha(_distiller(), _batches()).alpha


def test_an_unpicked_auto_alpha_is_refused_before_training():
    with pytest.raises(ConfigError, match="pick_alpha"):
        _distiller()(*_batches(1)[0])


@pytest.fixture(scope="module")
def teacher_ckpt(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    # Two epochs: one leaves it at chance, and `cwkd distill` refuses a teacher at chance (tests/test_teachercheck.py).
    result = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(folder), "--out", str(out), *COMMON,
                                 "--epochs", "2"])
    assert result.exit_code == 0, result.output
    return out / "best.safetensors"


def _distill(folder, teacher_ckpt, out, *extra) -> str:
    result = runner.invoke(app, ["distill", "--teacher", str(teacher_ckpt), "--student", "test_efficientnet",
                                 "--data", str(folder), "--out", str(out), *COMMON, *extra])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_cli_auto_prints_saves_and_resumes_with_the_picked_alpha(folder, teacher_ckpt, tmp_path):
    output = _distill(folder, teacher_ckpt, tmp_path / "a", "--alpha", "auto")
    line = next(line for line in output.splitlines() if line.startswith("alpha auto: picked"))
    config = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert isinstance(config["alpha"], float) and config["alpha"] > 0 and config["alpha_auto"] is True
    assert f"picked {config['alpha']:.4g} " in line and "over 4 batches" in line  # 16 images, batch 4
    meta = read_metadata(tmp_path / "a" / "last.safetensors")
    assert meta.alpha == config["alpha"] and meta.alpha_auto is True
    # the same seed picks the same alpha
    _distill(folder, teacher_ckpt, tmp_path / "b", "--alpha", "auto")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["alpha"] == config["alpha"]
    # a resume keeps the number and does not probe again, with or without `--alpha auto` retyped
    resumed = runner.invoke(app, ["distill", "--resume", str(tmp_path / "a"), "--epochs", "2", "--alpha", "auto"])
    assert resumed.exit_code == 0, resumed.output
    assert "alpha auto: picked" not in resumed.output and f"alpha {config['alpha']:.4g} (auto)" in resumed.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["alpha"] == config["alpha"]


@pytest.mark.slow
def test_cli_number_alpha_still_works_and_is_saved(folder, teacher_ckpt, tmp_path):
    _distill(folder, teacher_ckpt, tmp_path / "r", "--alpha", "7")
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert config["alpha"] == 7.0 and config["alpha_auto"] is False


@pytest.mark.parametrize("value, needle", [
    ("-1", "--alpha must be at least 0, got -1"),
    ("abc", "--alpha must be a number of at least 0, or auto; got 'abc'"),
])
def test_bad_alpha_values_are_one_clean_line(folder, value, needle):
    cli_fails(["distill", "--teacher", "test_resnet", "--student", "test_efficientnet", "--data", folder,
               "--alpha", value, *COMMON], needle)


@pytest.mark.slow
def test_auto_without_a_feature_loss_is_one_clean_line(folder, teacher_ckpt, tmp_path):
    """Refused before the run directory is made."""
    cli_fails(["distill", "--teacher", teacher_ckpt, "--student", "test_efficientnet", "--data", folder,
               "--method", "none", "--kd-weight", "1", "--alpha", "auto", "--out", tmp_path / "n", *COMMON],
              "--alpha auto weighs the feature loss, and --method none has none; drop --alpha auto")
    assert not (tmp_path / "n").exists()


@pytest.mark.slow
def test_segmentation_distill_with_auto_alpha(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 255, (20, 28, 28)).astype(np.uint8) for s in ("train", "val")}
    labels = {s: rng.integers(0, 10, 20) for s in ("train", "val")}
    voc = write_dense_dataset(tmp_path / "voc", Items(images, labels, [f"c{i}" for i in range(10)]), canvas=48,
                              counts={"train": 8, "val": 4})
    fast = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    teacher = tmp_path / "t"
    assert runner.invoke(app, ["train", "--model", "pspnet_test_resnet", "--data", str(voc), "--out", str(teacher),
                               *fast, "-q"]).exit_code == 0
    result = runner.invoke(app, ["distill", "--teacher", str(teacher / "best.safetensors"), "--student",
                                 "pspnet_test_resnet", "--data", str(voc), "--out", str(tmp_path / "s"),
                                 "--alpha", "auto", *fast, "--no-teacher-check"])  # a one-epoch teacher
    assert result.exit_code == 0, result.output
    assert "alpha auto: picked" in result.output
    config = json.loads((tmp_path / "s" / "config.json").read_text())["config"]
    assert math.isfinite(config["alpha"]) and config["alpha"] > 0 and config["alpha_auto"] is True


def _explode_above(monkeypatch, limit: float, picked: float) -> None:
    """Auto picks ``picked``; every step's loss is inf while the distiller's alpha is above ``limit``."""
    import cwkd.core.autoalpha
    from cwkd.core.autoalpha import AutoAlpha

    monkeypatch.setattr(cwkd.core.autoalpha, "choose",
                        lambda rows, ratio=RATIO: AutoAlpha(picked, 1.0, 1.0, 1.0, 1.0, 5))
    forward = FeatureDistiller.forward

    def exploding(self, images, targets=None):
        out = forward(self, images, targets)
        if targets is not None and self.alpha > limit:
            out["loss"] = out["loss"] * math.inf
        return out
    monkeypatch.setattr(FeatureDistiller, "forward", exploding)


@pytest.mark.slow
def test_auto_starts_again_at_a_quarter_of_alpha_when_the_first_epoch_diverges(folder, teacher_ckpt, tmp_path,
                                                                               monkeypatch):
    _explode_above(monkeypatch, limit=10.0, picked=100.0)  # 100 and 25 blow up, 6.25 trains
    output = " ".join(_distill(folder, teacher_ckpt, tmp_path / "a", "--alpha", "auto").split())
    assert output.count("the loss went non-finite in the first epoch") == 2
    assert "starting again from the first step at alpha 25 (2 more back-off(s) left)" in output
    assert "at alpha 6.25 (1 more back-off(s) left)" in output
    config = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert config["alpha"] == 6.25 and config["alpha_auto"] is True
    assert read_metadata(tmp_path / "a" / "best.safetensors").alpha == 6.25


@pytest.mark.slow
def test_auto_stops_after_three_back_offs_and_a_hand_picked_alpha_never_backs_off(folder, teacher_ckpt, tmp_path,
                                                                                 monkeypatch):
    _explode_above(monkeypatch, limit=1.0, picked=1000.0)  # 1000, 250, 62.5, 15.6: all blow up
    result = runner.invoke(app, ["distill", "--teacher", str(teacher_ckpt), "--student", "test_efficientnet",
                                 "--data", str(folder), "--out", str(tmp_path / "a"), "--alpha", "auto", *COMMON])
    assert result.exit_code == 1 and "non-finite loss in epoch 1/1" in result.output
    assert result.output.count("starting again from the first step") == 3
    result = runner.invoke(app, ["distill", "--teacher", str(teacher_ckpt), "--student", "test_efficientnet",
                                 "--data", str(folder), "--out", str(tmp_path / "b"), "--alpha", "7", *COMMON])
    assert result.exit_code == 1 and "starting again" not in result.output
