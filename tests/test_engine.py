"""The training engine end to end: `cwkd train` and `cwkd distill` on a generated ImageFolder."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cwkd.cli.app import app
from cwkd.data.loading import build_loaders
from cwkd.data.transforms import data_config
from cwkd.files.checkpoint import load_checkpoint
from cwkd.runtime import reuse_freed_memory
from cwkd.tasks.classification.data import load_data
from cwkd.tasks.classification.models import create_model
from cwkd.training.engine import evaluate

runner = CliRunner()
COMMON = ["--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def teacher_ckpt(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    # Two epochs: one leaves it at chance, and `cwkd distill` refuses a teacher at chance (tests/test_teachercheck.py).
    result = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(folder), "--out", str(out), *COMMON,
                                 "--epochs", "2"])
    assert result.exit_code == 0, result.output
    return out / "best.safetensors"


def test_distill_writes_every_run_file(folder, teacher_ckpt, tmp_path):
    out = tmp_path / "student"
    result = runner.invoke(app, ["distill", "--teacher", str(teacher_ckpt), "--student", "test_efficientnet",
                                 "--data", str(folder), "--out", str(out), "--kd-weight", "0.5", *COMMON])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics.jsonl", "last.safetensors", "best.safetensors", "state.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["pairs"][0]["teacher"] == "layer4" and config["config"]["method"] == "cwt"
    assert "torch" in config["versions"]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("epoch", "train_loss", "train_task_loss", "train_feat_loss", "train_kd_loss", "val_loss",
                "val_top1", "val_top5", "lr", "images_per_s", "epoch_s"):
        assert key in record, key
    tensors, meta = load_checkpoint(out / "best.safetensors")
    assert any(k.startswith("aligners.") for k in tensors)
    assert meta.model == "test_efficientnet" and meta.num_classes == 2

    # The checkpoint reloads to the same val accuracy it recorded.
    model = create_model(meta.model, num_classes=meta.num_classes, in_chans=meta.in_chans)
    model.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
    spec = load_data(str(folder))
    dcfg = data_config(model, input_size=meta.input_size[1], in_chans=meta.in_chans)
    _, val_loader = build_loaders(spec, dcfg, batch_size=4, workers=0)
    assert evaluate(model, val_loader, torch.device("cpu"))["top1"] == pytest.approx(record["val_top1"])


def test_resume_continues_from_saved_epoch(folder, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_ckpt), "--student", "test_efficientnet", "--data", str(folder),
            "--out", str(out), *COMMON]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["distill", "--resume", str(out), "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_resume_takes_run_options_and_refuses_changed_ones(folder, teacher_ckpt, tmp_path):
    from cwkd.training.resume import load_config

    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_ckpt), "--student", "test_efficientnet", "--data", str(folder),
            "--out", str(out), "--alpha", "2", *COMMON]
    assert runner.invoke(app, args).exit_code == 0
    changed = runner.invoke(app, ["distill", "--resume", str(out), "--alpha", "3", "--epochs", "2"])
    assert changed.exit_code == 1 and "--alpha 3.0 differs from the run's own 2.0" in changed.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    cfg = load_config(out, options={"skip_corrupt": True, "workers": 0, "epochs": 3, "alpha": 2.0})
    assert cfg.skip_corrupt and cfg.epochs == 3 and cfg.alpha == 2.0
    retyped = [a if a != "1" else "2" for a in args]  # the same command line, with --epochs 2
    result = runner.invoke(app, [*retyped, "--resume", str(out), "--skip-corrupt"])
    assert result.exit_code == 0, result.output
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_existing_run_is_not_overwritten(folder, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "test_resnet", "--data", str(folder), "--out", str(out), *COMMON]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "best.safetensors").read_bytes()
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "--resume" in result.output and "--overwrite" in result.output
    assert (out / "best.safetensors").read_bytes() == before
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_random_teacher_is_refused(folder, tmp_path):
    result = runner.invoke(app, ["distill", "--teacher", "test_resnet", "--student", "test_efficientnet",
                                 "--data", str(folder), "--out", str(tmp_path / "r"), *COMMON])
    assert result.exit_code == 1 and "--teacher-weights" in result.output


def test_bf16_and_linear_and_mgd_run_on_cpu(folder, teacher_ckpt, tmp_path):
    for method in ("linear", "mgd"):
        result = runner.invoke(app, ["distill", "--teacher", str(teacher_ckpt), "--student", "test_efficientnet",
                                     "--data", str(folder), "--out", str(tmp_path / method), "--method", method,
                                     "--precision", "bf16", *COMMON])
        assert result.exit_code == 0, result.output


def test_teacher_sees_its_own_normalisation(folder, tmp_path, monkeypatch):
    """A teacher trained on other input statistics than the student's gets batches remapped to its own."""
    import cwkd.training.build as build

    teacher = tmp_path / "teacher"
    result = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(folder), "--out", str(teacher),
                                 "--mean", "0.2", "--std", "0.4", *COMMON])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(teacher / "best.safetensors")[1].mean == pytest.approx([0.2] * 3)
    seen: dict[str, list] = {"teacher": [], "student": []}

    class Spy(build.FeatureDistiller):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for name in seen:
                getattr(self, name).register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0]))

    monkeypatch.setattr(build, "FeatureDistiller", Spy)
    out = tmp_path / "student"
    result = runner.invoke(app, ["distill", "--teacher", str(teacher / "best.safetensors"), "--student",
                                 "test_efficientnet", "--data", str(folder), "--out", str(out), *COMMON,
                                 "--no-teacher-check"])  # the spy sees training steps only
    assert result.exit_code == 0, result.output
    s_mean, s_std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert seen["teacher"]
    for t_in, s_in in zip(seen["teacher"], seen["student"], strict=False):  # teacher runs first in each step
        raw = s_in * s_std + s_mean
        torch.testing.assert_close(t_in, (raw - 0.2) / 0.4, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"]["mean"] == pytest.approx([0.2] * 3)
    assert load_checkpoint(out / "best.safetensors")[1].mean == pytest.approx([0.485, 0.456, 0.406])


def test_mean_and_std_are_checked(folder, tmp_path):
    bad = {("--mean", "0.5,0.5"): "--mean has 2 values", ("--std", "0.5,0,0.5"): "--std must be at least",
           ("--mean", "a,b,c"): "comma-separated numbers"}
    for (flag, value), message in bad.items():
        result = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(folder), "--out",
                                     str(tmp_path / "r"), flag, value, *COMMON])
        assert result.exit_code == 1 and message in result.output, result.output
        assert not (tmp_path / "r").exists()


def test_fp16_on_cpu_is_refused(folder, tmp_path):
    result = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(folder), "--out",
                                 str(tmp_path / "r"), "--precision", "fp16", *COMMON])
    assert result.exit_code == 1 and "fp32" in result.output


DDP_SCRIPT = """
import sys
from safetensors.torch import save_file
import torch.distributed as dist
from cwkd.training.config import TrainConfig
from cwkd.training.engine import run
cfg = TrainConfig(data=sys.argv[1], student="test_efficientnet", teacher=sys.argv[2], epochs=1, batch_size=4,
                  input_size=32, workers=0, device="cpu", out=sys.argv[3], quiet=True)
result = run(cfg)
rank = dist.get_rank()
# Parameters must agree; BN running stats are per rank until DDP's next forward broadcasts them.
params = {k: v.detach().contiguous() for k, v in result.student.named_parameters()}
save_file(params, f"{sys.argv[3]}/rank{rank}.st")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_gloo_ddp_ends_with_identical_weights(folder, teacher_ckpt, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), str(folder), str(teacher_ckpt), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(out / "rank0.st"), load_file(out / "rank1.st")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "best.safetensors").is_file()


_FREED_MEMORY_CHECK = """
import json
from pathlib import Path
import torch
from cwkd.runtime import reuse_freed_memory

def resident():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

def kept_after_free(mib=256):
    before = resident()
    block = torch.ones(mib * 2**18)  # float32: 4 bytes each
    del block
    return resident() - before

result = {"before": kept_after_free()}
with reuse_freed_memory(torch.device("cpu")) as applied:
    result["applied"], result["inside"] = applied, kept_after_free()
    held = resident()
result["handed_back"] = held - resident()
result["after"] = kept_after_free()
print(json.dumps(result))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator policy is glibc's")
def test_cpu_training_keeps_freed_memory_for_the_next_step():
    # A fresh process: in this one, earlier tests' freed heap chunks can serve the block and keep it resident.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", _FREED_MEMORY_CHECK], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] < 64, result  # glibc's default: a big block goes back to the kernel when freed
    assert result["applied"] and result["inside"] > 200, result  # kept for the next step, not faulted in again
    assert result["handed_back"] > 200, result  # and handed back once training is over
    assert result["after"] < 64, result  # glibc's defaults are back


def test_freed_memory_policy_leaves_a_chosen_allocator_and_cuda_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    with reuse_freed_memory(torch.device("cpu")) as applied:
        assert not applied
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    with reuse_freed_memory(torch.device("cpu")) as applied:
        assert not applied
    monkeypatch.delenv("LD_PRELOAD")
    with reuse_freed_memory(torch.device("cuda")) as applied:
        assert not applied
