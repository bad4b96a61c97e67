"""Bad input, interruptions and untrusted files, driven through the CLI as a user would meet them.

Every bad input must end in exit code 1 with one ``error: ...`` line that names the problem and the fix,
and no traceback; a usage error stays Typer's (exit code 2). Stops, kills and non-finite losses must
never lose a run: see docs/reliability.md for the table of cases and messages.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cwkd.cli.app import app
from cwkd.core.distiller import FeatureDistiller
from cwkd.errors import ConfigError
from cwkd.files.checkpoint import load_checkpoint, load_state
from cwkd.tasks.classification.models import create_model
from cwkd.training import engine, rundir, signals

from .helpers import make_image_folder
from .helpers import wait_for as _wait_for

runner = CliRunner()
FAST = ["--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]
COMMON = ["--epochs", "1", *FAST]
# The signal tests and their uninterrupted reference share every option but --out and --workers.
REF_EPOCHS = 3
DISTILL = ["distill", "--teacher", "test_resnet", "--allow-random-teacher", "--student", "test_efficientnet",
           "--epochs", str(REF_EPOCHS), "--batch-size", "4", "--input-size", "32", "--device", "cpu"]


class _Evil:
    """A pickle payload that creates a marker file when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _fails(args: list[str], *needles: str) -> str:
    """Run the CLI, expect a clean exit 1 with one ``error:`` line holding every needle; return that line."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean exit, not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    print(errors[0])  # shown by `pytest -rP`: the source of the messages in docs/reliability.md
    return errors[0]


def _ok(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the subprocesses get (OMP_NUM_THREADS=1): CPU results are then bit-equal
    between processes, and two threads fighting other jobs for two cores can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4)


@pytest.fixture(scope="module")
def teacher_run(folder, tmp_path_factory) -> Path:
    """A finished one-epoch `cwkd train` run: its best.safetensors is a 2-class teacher."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    _ok(["train", "--model", "test_resnet", "--data", folder, "--out", out, *COMMON])
    return out


def _distill(folder: Path, out: Path, teacher: str | Path = "test_resnet", *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", "test_efficientnet", "--data", str(folder),
            "--out", str(out), *COMMON, "--no-teacher-check", *extra]  # one-epoch teachers, at chance


# ----------------------------------------------------------------------------- models and layers


def test_unknown_model_suggests_close_names(folder, tmp_path):
    _fails(["train", "--model", "test_resnett", "--data", folder, "--out", tmp_path / "r", *COMMON],
           "unknown model 'test_resnett'", "did you mean test_resnet")


def test_unknown_layer_points_to_inspect(folder, tmp_path):
    _fails([*_distill(folder, tmp_path / "r", "test_resnet", "--allow-random-teacher"),
            "--pairs", "blocks.4:layer9"], "layer 'layer9'", "cwkd inspect test_resnet")


def test_pairs_too_far_apart_to_resize(folder, tmp_path):
    # blocks.0 is 16x16 at input 32, layer4 is 1x1: a 16x resize.
    _fails([*_distill(folder, tmp_path / "r", "test_resnet", "--allow-random-teacher"),
            "--pairs", "blocks.0:layer4"], "blocks.0->layer4", "resize", "cwkd inspect")


# ----------------------------------------------------------------------------- data


def _data_case(root: Path, case: str) -> Path:
    if case == "missing":
        return root / "nowhere"
    if case == "a file":
        (root / "data.txt").write_text("not a folder")
        return root / "data.txt"
    if case == "empty":
        (root / "empty").mkdir()
        return root / "empty"
    if case == "no images":
        for split in ("train", "val"):
            (root / "ds" / split / "cat").mkdir(parents=True)
        return root / "ds"
    make_image_folder(root / "ds", per_class=2)
    shutil.move(root / "ds" / "val" / "dog", root / "ds" / "val" / "bird")  # "mismatched classes"
    return root / "ds"


@pytest.mark.parametrize(("case", "needle"), [
    ("missing", "neither a known data set"), ("a file", "is a file"), ("empty", "has no train/"),
    ("no images", "has no images"), ("mismatched classes", "different class folders"),
])
def test_bad_data_path(tmp_path, case, needle):
    data = _data_case(tmp_path, case)
    _fails(["train", "--model", "test_resnet", "--data", data, "--out", tmp_path / "r", *COMMON], needle)


def _folder_with_corrupt_image(root: Path) -> Path:
    make_image_folder(root, per_class=4)
    (root / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return root


def test_corrupt_image_fails_cleanly_with_hint(tmp_path):
    data = _folder_with_corrupt_image(tmp_path / "ds")
    _fails(["train", "--model", "test_resnet", "--data", data, "--out", tmp_path / "r", *COMMON],
           "cannot read image", "1.png", "--skip-corrupt")


@pytest.mark.slow
def test_error_with_loader_workers_exits_at_once(tmp_path):
    # Workers ignore outside signals; they must still end when the main process exits on an error.
    data = _folder_with_corrupt_image(tmp_path / "ds")
    proc = subprocess.run([sys.executable, "-m", "cwkd", "train", "--model", "test_resnet", "--data", str(data),
                           "--out", str(tmp_path / "r"), "--epochs", "1", "--batch-size", "4", "--input-size", "32",
                           "--workers", "2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "cannot read image" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unreadable_val_image_keeps_the_epochs_training_for_resume(tmp_path, monkeypatch):
    """A val file found bad only at the first validation must not cost the epoch: its training is saved, and
    --resume, once the file is fixed, validates it without training it again."""
    data = make_image_folder(tmp_path / "ds", per_class=4)
    bad = data / "val" / "dog" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    out = tmp_path / "r"
    line = _fails(["train", "--model", "test_resnet", "--data", data, "--out", out, *COMMON],
                  "cannot read image", "1.png", "epoch 1's training is saved", f"--resume {out}")
    assert "--skip-corrupt" in line
    state = load_state(out / "state.pt")
    assert (state["epoch"], state["step"]) == (0, 2) and state["pending"]["loss"] > 0  # 8 images at batch 4
    assert not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip()
    bad.write_bytes(good)
    trained = []
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: trained.append(1) or {})
    _ok(["train", "--resume", out])
    assert not trained  # validated, not trained again
    (record,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and record["train_loss"] == state["pending"]["loss"] and "val_top1" in record
    assert "train_train_s" not in record and record["epoch_s"] >= state["pending"]["train_s"]
    assert load_state(out / "state.pt")["pending"] == {}


def test_corrupt_image_skipped_and_counted_across_workers(tmp_path):
    data = _folder_with_corrupt_image(tmp_path / "ds")
    result = _ok(["train", "--model", "test_resnet", "--data", data, "--out", tmp_path / "r", "--skip-corrupt",
                  "--epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "1", "--device", "cpu"])
    assert "skipped 1 unreadable image(s)" in result.output  # counted in a worker, reported by the main process


# ----------------------------------------------------------------------------- teachers and checkpoints


def test_teacher_checkpoint_with_other_class_count(teacher_run, tmp_path):
    data = make_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=2)
    _fails(_distill(data, tmp_path / "r", teacher_run / "best.safetensors"),
           "the teacher predicts 2 classes but the data has 3", "cwkd train --model test_resnet")


def test_teacher_weights_with_other_class_count(folder, tmp_path):
    weights = tmp_path / "teacher5.pth"
    torch.save(create_model("test_resnet", num_classes=5).state_dict(), weights)
    _fails([*_distill(folder, tmp_path / "r"), "--teacher-weights", weights],
           "predicts 5 classes but the data has 2")


def _damaged_teacher(teacher_run: Path, tmp_path: Path, case: str) -> Path:
    good = teacher_run / "best.safetensors"
    path = tmp_path / "teacher.safetensors"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + os.urandom(400))
    elif case == "not safetensors":
        path = tmp_path / "teacher.pth"
        torch.save(load_file(good), path)
    elif case == "another model":  # metadata says one model, the tensors are another's
        tensors, meta = load_checkpoint(good)
        other = create_model("test_efficientnet", num_classes=2).state_dict()
        header = meta.to_header(path)
        save_file({f"student.{k}": v.contiguous() for k, v in other.items()}, path, metadata=header)
    elif case == "newer format":
        tensors, meta = load_checkpoint(good)
        save_file(tensors, path, metadata={**meta.to_header(path), "format_version": "99"})
    return path


@pytest.mark.parametrize(("case", "needle"), [
    ("truncated", "is truncated"), ("corrupt", "not a safetensors file"),
    ("not safetensors", "--teacher-weights"), ("another model", "do not fit test_resnet"),
    ("newer format", "newer cwkd"),
])
def test_damaged_teacher_checkpoint(folder, teacher_run, tmp_path, case, needle):
    _fails(_distill(folder, tmp_path / "r", _damaged_teacher(teacher_run, tmp_path, case)), needle)


def test_teacher_weights_from_another_model(folder, tmp_path):
    weights = tmp_path / "effnet.safetensors"
    save_file(create_model("test_efficientnet", num_classes=2).state_dict(), weights)
    _fails([*_distill(folder, tmp_path / "r"), "--teacher-weights", weights], "do not fit test_resnet")


def _damaged_state(run: Path, case: str) -> None:
    path = run / "state.pt"
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif case == "another model":
        state = load_state(path)
        state["model"] = create_model("test_efficientnet", num_classes=2).state_dict()
        torch.save(state, path)
    elif case == "newer format":
        state = load_state(path)
        state["format_version"] = 99
        torch.save(state, path)
    elif case == "wrong types":
        state = load_state(path)
        state["epoch"] = "1; import os"
        torch.save(state, path)


@pytest.mark.parametrize(("case", "needle"), [
    ("truncated", "could not read"), ("another model", "saved by another run"),
    ("newer format", "newer cwkd"), ("wrong types", "damaged"),
])
def test_resume_with_damaged_state(teacher_run, tmp_path, case, needle):
    run = shutil.copytree(teacher_run, tmp_path / "run")
    _damaged_state(run, case)
    _fails(["train", "--resume", run, "--epochs", "2"], needle)


def test_resume_of_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _fails(["train", "--resume", tmp_path], "config.json", "cwkd run directory")


@pytest.mark.parametrize("target", ["--teacher-weights", "--teacher", "--resume state.pt"])
def test_malicious_pickle_is_refused_and_never_run(folder, teacher_run, tmp_path, target):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.ones(2, 2), "payload": _Evil(marker)}, evil)
    if target == "--teacher-weights":
        args = [*_distill(folder, tmp_path / "r"), "--teacher-weights", evil]
    elif target == "--teacher":
        args = _distill(folder, tmp_path / "r", evil)
    else:
        run = shutil.copytree(teacher_run, tmp_path / "run")
        shutil.copy(evil, run / "state.pt")
        args = ["train", "--resume", run]
    line = _fails(args)
    assert "refused to load" in line or "not a cwkd checkpoint" in line
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Evil(marker)))  # the payload is real: plain unpickling does run it
    assert marker.exists()


# ----------------------------------------------------------------------------- devices and numbers


def test_fp16_on_cpu(folder, tmp_path):
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "r", *COMMON,
            "--precision", "fp16"], "fp16 needs a CUDA GPU", "fp32")


def test_cuda_without_a_gpu(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "r", "--epochs", "1",
            "--device", "cuda"], "no CUDA GPU", "--device cpu")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cuda_index_out_of_range(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "r", "--epochs", "1",
            "--device", "cuda:7"], "1 CUDA GPU", "cuda:0")


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--batch-size", "0", "--batch-size must be a positive whole number"),
    ("--batch-size", "-4", "--batch-size must be a positive whole number"),
    ("--alpha", "-1", "--alpha must be at least 0"),
    ("--alpha", "nan", "--alpha must be a finite number"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--kd-temperature", "inf", "--kd-temperature must be a finite number"),
    ("--epochs", "-1", "--epochs must be a positive whole number"),
    ("--device", "tpu", "unknown --device 'tpu'"),
])
def test_bad_option_values(folder, tmp_path, option, value, needle):
    _fails([*_distill(folder, tmp_path / "r", "test_resnet", "--allow-random-teacher"), option, value], needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args", [
    ["train", "--model", "test_resnet", "--data", "x", "--precision", "fp64"],
    ["train", "--model", "test_resnet", "--data", "x", "--batch-size", "four"],
    ["distill", "--teacher", "test_resnet", "--data", "x"],  # no --student
    ["train", "--model", "test_resnet", "--data", "x", "--no-such-option"],
])
def test_usage_errors_stay_typer_exit_2(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- the run directory


def test_existing_run_is_refused_and_overwrite_keeps_other_files(folder, teacher_run, tmp_path):
    run = shutil.copytree(teacher_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / ".last.safetensors.0badf00d.tmp").write_bytes(b"left by a kill")
    before = (run / "best.safetensors").read_bytes()
    args = ["train", "--model", "test_resnet", "--data", folder, "--out", run, *COMMON]
    _fails(args, "already holds a run", "--resume", "--overwrite")
    assert (run / "best.safetensors").read_bytes() == before
    _ok([*args, "--overwrite", "--seed", "1"])
    assert (run / "best.safetensors").read_bytes() != before
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite deletes cwkd's run files only
    assert not list(run.glob(".*.tmp"))


def test_out_that_cannot_be_written(folder, tmp_path):
    (tmp_path / "afile").write_text("")
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "afile" / "run", *COMMON],
           "cannot write to", "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")
def test_out_without_write_permission(folder, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", locked / "run", *COMMON],
           "cannot write to", "Permission denied")


def test_out_without_free_space(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(2**30, 2**30 - 2**20, 2**20))
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "r", *COMMON],
           "only 1 MiB free", "--out")
    assert not (tmp_path / "r" / "config.json").exists()


def test_space_for_checkpoints_is_checked_before_training(tmp_path, monkeypatch):
    big = torch.nn.Linear(4096, 4096)  # 64 MiB of weights: last + best + state with momentum + a temp copy
    optimizer = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(2**40, 0, 200 * 2**20))
    with pytest.raises(ConfigError, match="needs about 400 MiB .* only 200 MiB are free"):
        rundir.RunDir(tmp_path).check_space(big, optimizer)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(2**40, 0, 500 * 2**20))
    rundir.RunDir(tmp_path).check_space(big, optimizer)


# ----------------------------------------------------------------------------- non-finite losses


@pytest.fixture
def nan_after(monkeypatch):
    """Make every loss from the ``n``-th forward call on NaN (``stop`` calls later it is finite again)."""

    def install(n: int, stop: int = 10**9) -> None:
        calls = itertools.count()
        forward = FeatureDistiller.forward

        def poisoned(self, images, targets=None):
            out = forward(self, images, targets)
            if n <= next(calls) < stop:
                out["loss"] = out["loss"] * float("nan")
            return out

        monkeypatch.setattr(FeatureDistiller, "forward", poisoned)

    return install


@pytest.mark.parametrize("each_step", [True, False], ids=["checked-each-step", "checked-on-device"])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, nan_after, monkeypatch,
                                                                 each_step):
    monkeypatch.setattr(engine, "_checks_each_step", lambda cfg, device: each_step)  # False: the GPU path
    nan_after(3)  # 2 steps per epoch: epoch 1 is fine, epoch 2 fails at its second step
    out = tmp_path / "r"
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", out, *FAST, "--epochs", "3"],
           "non-finite loss in epoch 2/3, step 2", "loss=nan", "lower --lr", "--skip-nonfinite")
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta.epoch == 1 and load_state(out / "state.pt")["epoch"] == 1


@pytest.mark.parametrize("each_step", [True, False], ids=["checked-each-step", "checked-on-device"])
def test_nonfinite_loss_in_the_first_epoch_claims_no_checkpoint(folder, tmp_path, nan_after, monkeypatch, each_step):
    monkeypatch.setattr(engine, "_checks_each_step", lambda cfg, device: each_step)
    nan_after(1)  # epoch 1 fails at its second step: nothing was saved
    out = tmp_path / "r"
    error = _fails(["train", "--model", "test_resnet", "--data", folder, "--out", out, *FAST, "--epochs", "3"],
                   "non-finite loss in epoch 1/3, step 2", "no checkpoint was written")
    assert "are kept" not in error  # before: "the checkpoints of the last finished epoch are kept"
    assert not (out / "last.safetensors").exists()


def test_huge_lr_gives_a_nonfinite_loss_error(folder, tmp_path):
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "r", *FAST, "--epochs", "3",
            "--lr", "1e30", "--warmup-epochs", "0"], "non-finite loss", "lower --lr (it was 1e+30)")


def test_skip_nonfinite_tolerates_n_steps(folder, tmp_path, nan_after):
    nan_after(1, stop=2)  # one poisoned step
    _ok(["train", "--model", "test_resnet", "--data", folder, "--out", tmp_path / "r", *COMMON,
         "--skip-nonfinite", "1"])


# ----------------------------------------------------------------------------- stopping and resuming


@pytest.fixture(scope="module")
def signal_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("sigdata"), per_class=16)  # 8 steps an epoch


@pytest.fixture(scope="module")
def reference(signal_folder, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of an uninterrupted run with the options every signal test uses."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _ok([*DISTILL, "--data", signal_folder, "--out", out, "--workers", "0"])
    return load_file(out / "last.safetensors")


def _assert_same_weights(path: Path, reference: dict[str, torch.Tensor]) -> None:
    tensors = load_file(path)
    assert set(tensors) == set(reference)
    different = [k for k in tensors if not torch.equal(tensors[k], reference[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class _StopAfter:
    """Stands in for signals.StopSignals: a SIGINT 'arrives' once the flag has been asked ``checks`` times."""

    def __init__(self, checks: int) -> None:
        self.checks, self.signal_number = checks, 0

    def __call__(self) -> _StopAfter:
        return self

    def __enter__(self) -> _StopAfter:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def saving(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def requested(self) -> bool:
        self.checks -= 1
        if self.checks < 0:
            self.signal_number = signal.SIGINT
        return self.signal_number != 0


def test_stop_mid_epoch_saves_and_resume_is_exact(signal_folder, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(signals, "StopSignals", _StopAfter(13))  # the flag is read ~10 times an epoch
    result = runner.invoke(app, [*DISTILL, "--data", signal_folder, "--out", out, "--workers", "0"])
    assert result.exit_code == 130, result.output
    assert f"continue with --resume {out}" in result.output
    state = load_state(out / "state.pt")
    assert state["epoch"] == 1 and 0 < state["step"] < 8  # stopped inside epoch 2
    assert load_checkpoint(out / "last.safetensors")[1].step == state["step"]
    monkeypatch.undo()
    result = _ok(["distill", "--resume", out])
    assert f"at epoch 2, step {state['step']}" in result.output
    _assert_same_weights(out / "last.safetensors", reference)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_resume_before_the_first_epoch_ended_starts_over(signal_folder, reference, tmp_path):
    out = tmp_path / "run"
    _ok([*DISTILL, "--data", signal_folder, "--out", out, "--workers", "0", "--epochs", "1"])
    for name in ("state.pt", "last.safetensors", "best.safetensors"):  # as if killed in epoch 1
        (out / name).unlink()
    result = _ok(["distill", "--resume", out, "--epochs", str(REF_EPOCHS)])
    assert "at epoch 1" in result.output
    _assert_same_weights(out / "last.safetensors", reference)


def _start(args: list) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "cwkd", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_and_resumes(signal_folder, reference, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _start([*DISTILL, "--data", signal_folder, "--out", out, "--workers", "1"])
    _wait_for(out / "state.pt", proc)
    os.killpg(proc.pid, sig)  # the whole process group, loader worker included, as Ctrl-C or `docker stop` do
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in stderr and f"--resume {out}" in stderr
    assert "Traceback" not in stderr
    load_checkpoint(out / "last.safetensors")
    state = load_state(out / "state.pt")
    assert 1 <= state["epoch"] < REF_EPOCHS
    _ok(["distill", "--resume", out])
    _assert_same_weights(out / "last.safetensors", reference)  # workers 1 vs 0: the same augmentations


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(signal_folder, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start([*DISTILL, "--data", signal_folder, "--out", out, "--workers", "0"])
    _wait_for(out / "state.pt", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_state(out / "state.pt")["epoch"] >= 1  # every file a kill can leave is loadable
    load_checkpoint(out / "last.safetensors")
    _ok(["distill", "--resume", out])
    _assert_same_weights(out / "last.safetensors", reference)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, REF_EPOCHS + 1))
    assert not list(out.glob(".*.tmp"))


def test_under_ddp_the_stop_flag_is_agreed_every_few_reads_only(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        reduces = []
        all_reduce = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (reduces.append(1), all_reduce(t, **kw))[1])
        stop, every = signals.StopSignals(), signals.StopSignals.SYNC_EVERY
        assert not any(stop.requested for _ in range(2 * every))
        assert len(reduces) == 2  # one host sync per SYNC_EVERY steps, not one a step
        stop.signal_number = signal.SIGTERM
        seen = [stop.requested for _ in range(every)]
        assert seen[-1] and seen.index(True) < every  # noticed within SYNC_EVERY reads, then kept
    finally:
        dist.destroy_process_group()
