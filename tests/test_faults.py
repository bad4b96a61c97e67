"""Machine faults, numbers out of range and divergence (issue 10, sections 4 and 5).

Each fault must end in one ``error: ...`` line that names the cause and the fix (exit 1, no traceback),
leave the files written before intact, and leave nothing that forces ``--overwrite`` on the rerun. The
faults a test machine cannot produce (out of memory, no C++ compiler, a file system that turns
read-only) are injected by monkeypatching where PyTorch or the OS would raise them.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cwkd.cli.app import app
from cwkd.cli.faults import fault_message
from cwkd.core.distiller import FeatureDistiller
from cwkd.errors import CheckpointError, ConfigError
from cwkd.files import checkpoint
from cwkd.files.checkpoint import atomic_write, load_checkpoint, load_state, save_checkpoint
from cwkd.files.metadata import CheckpointMeta
from cwkd.files.strict_json import json_text
from cwkd.tasks.classification.models import create_model
from cwkd.training import engine, nonfinite

from .helpers import cli_fails as _fails
from .helpers import make_image_folder

runner = CliRunner()
FAST = ["--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]
SMALL_DISTILL = ["distill", "--teacher", "test_resnet", "--allow-random-teacher", "--student", "test_resnet"]


def _ok(args: list):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(name: str):
        raise ValueError(f"{name} is not valid JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4)  # 2 steps an epoch at batch 4


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory) -> Path:
    """A finished one-epoch run of test_resnet."""
    out = tmp_path_factory.mktemp("runs") / "good"
    _ok(["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", "1", *FAST])
    return out


# ----------------------------------------------------------------------------- numbers out of range

@pytest.mark.parametrize("extra, needle", [
    (["--in-chans", "-3"], "--in-chans must be from 1 to 1024 channels, got -3"),
    (["--in-chans", "5000"], "--in-chans must be from 1 to 1024"),
    (["--warmup-epochs", "1e308"], "--warmup-epochs must be at most --epochs (1)"),
    (["--seed", str(2**64 + 1)], "--seed must be from 0 to 9223372036854775807, got 18446744073709551617"),
    (["--seed", "-1"], "--seed must be from 0"),
    (["--hidden", "100000000"], "--hidden must be from 1 to 65536 channels"),
    (["--input-size", "60000"], "--input-size must be from 1 to 4096 pixels, got 60000"),
    (["--input-size", "0"], "--input-size must be from 1 to 4096"),
    (["--workers", "100000"], "--workers must be from 0 to 256"),
    (["--batch-size", str(10**20)], "--batch-size must be from 1 to 1048576 images"),  # was a ValueError traceback
])
def test_out_of_range_numbers_are_refused_before_anything_is_written(folder, tmp_path, extra, needle):
    out = tmp_path / "r"
    _fails([*SMALL_DISTILL, "--data", folder, "--out", out, "--epochs", "1", *FAST, *extra], needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["inspect", "test_resnet", "--in-chans", "0"], "--in-chans must be from 1 to 1024 channels, got 0"),
    (["inspect", "test_resnet", "--input-size", "0"], "--input-size must be from 1 to 4096 pixels, got 0"),
    (["inspect", "test_resnet", "--input-size", "60000"], "--input-size must be from 1 to 4096"),
    (["inspect", "--teacher", "test_resnet", "--student", "test_resnet", "--in-chans", "0"], "--in-chans"),
    (["inspect", "--teacher", "test_resnet", "--student", "test_resnet", "--hidden", "100000000"], "--hidden"),
    (["eval", "nowhere.safetensors", "--batch-size", "0"], "--batch-size must be a positive whole number"),
    (["eval", "nowhere.safetensors", "--workers", "-1"], "--workers must be from 0 to 256"),
    (["eval", "test_resnet", "--weights", "w.pth", "--data", "d", "--input-size", "60000"], "--input-size"),
    (["export", "nowhere.safetensors", "--atol", "-1"], "--atol must be a finite number of at least 0"),
    (["export", "nowhere.safetensors", "--atol", "nan"], "--atol must be a finite number"),
])
def test_inspect_eval_export_refuse_out_of_range_numbers(args, needle):
    _fails(args, needle)  # before: inspect took 0 as "the default", eval/export checked nothing


@pytest.mark.parametrize("key, value", [("input_size", [3, 10**9, 32]), ("input_size", [3, -32, 32]),
                                        ("num_classes", 10**12), ("num_classes", -5), ("in_chans", 5000)])
def test_crafted_metadata_sizes_are_refused(trained, tmp_path, key, value):
    tensors, loaded = load_checkpoint(trained / "last.safetensors")
    meta = loaded.to_dict()
    meta[key] = value
    if key == "in_chans":
        meta.update(input_size=[value, 32, 32], mean=[0.5] * value, std=[0.5] * value)
    path = tmp_path / "crafted.safetensors"  # written around save_checkpoint, which would refuse it
    save_file(tensors, path, metadata={"format": "cwkd", "format_version": "1", "cwkd": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="from 1 to"):
        CheckpointMeta.from_dict(meta)
    _fails(["eval", path, "--workers", "0"], str(path), f"'{key}'", "from 1 to")


# ----------------------------------------------------------------------------- out of memory, --compile

def _cuda_oom() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                  "capacity of 79.10 GiB of which 1.00 GiB is free.")


def _no_compiler() -> BaseException:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        raise InvalidCxxCompiler()
    except InvalidCxxCompiler as inner:
        try:
            raise BackendCompilerFailed("inductor", inner, None) from inner
        except BackendCompilerFailed as outer:
            return outer


FAULTS = {
    "cpu-oom": (lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                                     "memory: you tried to allocate 34359738368 bytes."),
                ["out of memory", "DefaultCPUAllocator", "smaller --batch-size"]),
    "memory-error": (MemoryError, ["out of memory (MemoryError)", "smaller --batch-size"]),
    "cuda-oom": (_cuda_oom, ["out of GPU memory", "smaller --batch-size or --precision "]),
    "no-compiler": (_no_compiler, ["--compile needs a working C++ compiler", "run without --compile", "g++"]),
}


@pytest.mark.parametrize("kind", FAULTS)
def test_fault_message_names_cause_and_fix(kind):
    make, needles = FAULTS[kind]
    message = fault_message(make())
    assert message is not None and all(n in message for n in needles), message
    assert fault_message(ValueError("a bug")) is None  # anything else stays a traceback: it is a bug to report


@pytest.mark.parametrize("native", [False, True])
def test_cpu_oom_advice_offers_bf16_only_where_it_is_native(monkeypatch, native):
    # bf16 halves activations, but on a CPU without native bf16 it runs 8-30x slower (issue 15)
    monkeypatch.setattr("cwkd.runtime.cpu_bf16_native", lambda: native)
    assert ("--precision bf16" in fault_message(MemoryError())) is native


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAULTS)
def test_fault_in_the_first_epoch_is_one_line_and_the_rerun_needs_no_overwrite(folder, tmp_path, monkeypatch,
                                                                              kind):
    make, needles = FAULTS[kind]

    def fail(self, images, targets=None):
        raise make()

    out = tmp_path / "r"
    args = ["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", "1", *FAST]
    with monkeypatch.context() as patch:
        patch.setattr(FeatureDistiller, "forward", fail)
        _fails([*args, *(["--compile"] if kind == "no-compiler" else [])], *needles)
    assert (out / "config.json").exists() and not (out / "state.pt").exists()
    _ok(args)  # before: "already holds a run ... --overwrite"
    assert (out / "best.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS caps allocations on Linux only")
def test_real_cpu_out_of_memory_through_the_cli(folder, tmp_path):
    """A real allocator failure, made safe by an address-space limit (the kernel's OOM killer never acts)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    out = tmp_path / "r"
    args = [sys.executable, "-m", "cwkd", "train", "--model", "test_resnet", "--data", str(folder), "--out", str(out),
            "--epochs", "1", "--batch-size", "8", "--input-size", "4096", "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if "test_resnet on" not in proc.stdout:
        pytest.skip(f"cannot start under a 6 GiB address-space limit here: {proc.stderr[-300:]}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: out of memory (" in proc.stderr and "use a smaller --batch-size" in proc.stderr, proc.stderr
    print(proc.stderr.strip())
    _ok(["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", "1", *FAST])  # no --overwrite


@pytest.mark.slow
def test_real_compile_without_a_compiler_through_the_cli(folder, tmp_path):
    """$CXX names the compiler inductor uses: pointing it at nothing is a machine without one."""
    out = tmp_path / "r"
    args = [sys.executable, "-m", "cwkd", "train", "--model", "test_resnet", "--data", str(folder), "--out", str(out),
            "--epochs", "1", *FAST, "--compile"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CXX": str(tmp_path / "no-such-g++")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: --compile needs a working C++ compiler" in proc.stderr, proc.stderr
    assert "run without --compile" in proc.stderr
    print(proc.stderr.strip())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cpu-oom", "cuda-oom"])
def test_out_of_memory_in_eval_is_one_line(trained, monkeypatch, kind):
    make, needles = FAULTS[kind]

    def fail(*args, **kwargs):
        raise make()

    monkeypatch.setattr("cwkd.evaluation.evaluate", fail)
    _fails(["eval", trained / "best.safetensors", "--workers", "0"], *needles)


def test_debug_keeps_the_traceback_of_a_fault(monkeypatch):
    def fail(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr("cwkd.inspection.probe", fail)
    result = runner.invoke(app, ["--debug", "inspect", "test_resnet"])
    assert isinstance(result.exception, MemoryError)


# ----------------------------------------------------------------------------- read-only file system

def _erofs_on(monkeypatch, name: str, after: int = 0) -> None:
    """Make os.replace onto a file called ``name`` fail with EROFS from its ``after``-th call on."""
    replace, calls = os.replace, {"n": 0}

    def failing(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(errno.EROFS, "Read-only file system", str(src))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)


def test_atomic_write_cleanup_never_masks_the_real_error(tmp_path, monkeypatch):
    def no_open(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    def no_unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(os, "open", no_open)
    monkeypatch.setattr(Path, "unlink", no_unlink)  # before: this error replaced the one above
    with pytest.raises(ConfigError, match="Read-only file system.*remount it read-write"):
        atomic_write(tmp_path / "x.bin", lambda f: f.write(b"x"))


@pytest.mark.slow
def test_read_only_mid_run_keeps_the_last_epoch(folder, tmp_path, monkeypatch):
    out = tmp_path / "r"
    _erofs_on(monkeypatch, "last.safetensors", after=1)  # epoch 1 saves, epoch 2 cannot
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", "2", *FAST],
           "could not write", "last.safetensors", "Read-only file system", "remount it read-write")
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta.epoch == 1 and load_state(out / "state.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_run_directory_made_unwritable_mid_run_is_one_line(folder, tmp_path, monkeypatch):
    from cwkd.training import rundir

    out = tmp_path / "r"
    save_epoch, real_open, real_unlink = rundir.RunDir.save_epoch, os.open, Path.unlink

    def denied(path) -> OSError:
        return PermissionError(errno.EACCES, "Permission denied", str(path))

    def open_(path, *args, **kwargs):
        if Path(path).parent == out:
            raise denied(path)
        return real_open(path, *args, **kwargs)

    def unlink(self, missing_ok=False):
        if self.parent == out:
            raise denied(self)
        return real_unlink(self, missing_ok=missing_ok)

    def save_then_chmod(*args, **kwargs):  # epoch 1 saves; then `chmod a-w` the folder (as a non-root user)
        save_epoch(*args, **kwargs)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(Path, "unlink", unlink)  # the lock file cannot be removed either

    monkeypatch.setattr(rundir.RunDir, "save_epoch", save_then_chmod)
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", "2", *FAST],
           "could not write", "metrics.jsonl", "Permission denied", "check free space and permissions")
    monkeypatch.undo()  # before: releasing the lock raised PermissionError, a traceback hiding the line above
    _, meta = load_checkpoint(out / "last.safetensors")
    assert meta.epoch == 1 and load_state(out / "state.pt")["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    _ok(["train", "--resume", out])  # writable again: the run goes on from epoch 1


def test_export_into_a_read_only_directory_is_one_line(trained, tmp_path, monkeypatch):
    target = tmp_path / "ro" / "student.safetensors"
    _erofs_on(monkeypatch, target.name)
    _fails(["export", trained / "best.safetensors", "--out", target, "--no-benchmark"],
           f"could not write {target}", "Read-only file system", "remount it read-write")
    assert not target.exists() and not list(target.parent.glob(".*.tmp"))


def test_metrics_that_cannot_be_read_back_are_one_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n')

    def no_read(self):
        raise OSError(errno.EIO, "Input/output error", str(self))

    monkeypatch.setattr(Path, "read_bytes", no_read)
    with pytest.raises(ConfigError, match="could not read .*metrics.jsonl.*Input/output error"):
        checkpoint.append_jsonl(path, {"epoch": 2})


# ----------------------------------------------------------------------------- a failed start, Ctrl-C

def test_a_run_that_never_finished_an_epoch_is_replaced_without_overwrite(folder, tmp_path, monkeypatch):
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a start killed before its first epoch leaves
    (out / "metrics.jsonl").write_text('{"epoch": 1, "val_loss": null}\n')

    def stop(*args, **kwargs):  # stop right after the run directory was prepared
        raise MemoryError()

    monkeypatch.setattr("cwkd.training.optim.build_optimizer", stop)  # the run directory is prepared after the loaders
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", "1", *FAST],
           "out of memory")  # before: "already holds a run (config.json, metrics.jsonl) ... --overwrite"
    assert not (out / "metrics.jsonl").exists()  # replaced: the old start's files are gone


_DOUBLE_CTRL_C = """
import os, signal, sys, time
import cwkd.training.engine

class _Teardown:  # like a DataLoader iterator whose __del__ waits for its workers
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while start-up unwinds
        time.sleep(0.5)

def load_data(*args, **kwargs):
    teardown = _Teardown()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)

import cwkd.tasks.classification.task  # where the engine's task loads classification data
cwkd.tasks.classification.task.load_data = load_data
sys.argv = ["cwkd", "train", "--model", "test_resnet", "--data", "unused", "--out", sys.argv[1],
            "--device", "cpu", "--workers", "0"]
from cwkd.cli.app import main
main()
"""


@pytest.mark.slow
def test_double_ctrl_c_during_start_up_exits_130_cleanly(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_DOUBLE_CTRL_C), str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 130, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "--resume" not in proc.stderr, proc.stderr  # nothing to resume: no epoch finished
    assert "nothing to resume: run the same command again" in proc.stderr
    print(proc.stderr.strip())


_CTRL_C_TWICE_AROUND_A_SAVE = """
import os, signal, sys, time
import cwkd.training.optim, cwkd.training.rundir

first_at = int(sys.argv[3])
update, save_checkpoint, steps = cwkd.training.optim.Stepper.step, cwkd.training.rundir.save_checkpoint, [0]

def update_then_ctrl_c(*args, **kwargs):
    update(*args, **kwargs)
    steps[0] += 1
    if steps[0] == first_at:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop and save

def save_then_ctrl_c(*args, **kwargs):
    save_checkpoint(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # the second, once last.safetensors is written and before state.pt
    time.sleep(0.5)

cwkd.training.optim.Stepper.step = update_then_ctrl_c
cwkd.training.rundir.save_checkpoint = save_then_ctrl_c
sys.argv = ["cwkd", "train", "--model", "test_resnet", "--data", sys.argv[1], "--out", sys.argv[2], "--epochs", "2",
            "--batch-size", "2", "--input-size", "32", "--workers", "0", "--device", "cpu"]
from cwkd.cli.app import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("first_at", [2, 4], ids=["mid-epoch", "end-of-epoch"])  # 4 steps an epoch
def test_a_second_ctrl_c_during_the_save_lets_it_finish(folder, tmp_path, first_at):
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_CTRL_C_TWICE_AROUND_A_SAVE), str(folder), str(out),
                           str(first_at)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # before: last.safetensors without state.pt, "nothing to resume: run the same command again", and the rerun
    # was refused ("already holds a run")
    assert (out / "state.pt").is_file(), proc.stderr[-3000:]
    assert f"stopped by SIGINT; saved {out / 'last.safetensors'} and {out / 'state.pt'}; continue with --resume" \
        in proc.stderr, proc.stderr[-3000:]
    _ok(["train", "--resume", out])
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


_CTRL_C_WHILE_TORCH_IMPORTS = """
import importlib.abc, os, signal, sys

class CtrlCOnTorch(importlib.abc.MetaPathFinder):  # the user presses Ctrl-C while torch is being imported
    def find_spec(self, name, path, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCOnTorch())
sys.argv = ["cwkd", "train", "--model", "test_resnet", "--data", "unused", "--out", sys.argv[1], "--device", "cpu"]
from cwkd.cli.app import main
main()
"""


@pytest.mark.slow
def test_ctrl_c_while_torch_imports_prints_the_interrupted_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_CTRL_C_WHILE_TORCH_IMPORTS), str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # before: exit 130 and no output at all (the KeyboardInterrupt escaped cwkd's handler, typer exited silently)
    assert "interrupted before the first epoch finished; nothing to resume: run the same command again" in proc.stderr
    print(proc.stderr.strip())


@pytest.mark.parametrize("caller", [signal.default_int_handler, signal.SIG_IGN])  # SIG_IGN: nohup, CI runners
def test_ctrl_c_at_start_up_suggests_resume_only_for_a_run_with_state(folder, trained, tmp_path, monkeypatch,
                                                                      caller):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("cwkd.tasks.classification.task.load_data", ctrl_c)
    before = signal.signal(signal.SIGINT, caller)
    try:
        run = shutil.copytree(trained, tmp_path / "run")
        resumed = runner.invoke(app, ["train", "--resume", str(run)])
        assert resumed.exit_code == 130 and f"continue the run with --resume {run}" in resumed.output, resumed.output
        new = tmp_path / "new"
        fresh = runner.invoke(app, ["train", "--model", "test_resnet", "--data", str(folder), "--out", str(new),
                                    *FAST])
        assert fresh.exit_code == 130 and "--resume" not in fresh.output, fresh.output  # before: "... --resume"
        assert signal.getsignal(signal.SIGINT) is caller  # the caller's handler is back, SIG_IGN included
    finally:
        signal.signal(signal.SIGINT, before)


# ----------------------------------------------------------------------------- divergence

@pytest.mark.slow
def test_weights_diverging_in_the_first_epoch_are_never_saved(folder, tmp_path):
    # One step an epoch: the loss of that step is finite, the update it makes is not (lr 1e30).
    out = tmp_path / "r"
    args = ["train", "--model", "test_resnet", "--data", folder, "--out", out, "--epochs", "2",
            *FAST, "--batch-size", "8", "--lr", "1e30", "--warmup-epochs", "0"]
    _fails(args, "training diverged in epoch 1/2", "--lr 1e+30 is likely too large", "no checkpoint was written")
    assert not (out / "last.safetensors").exists() and not (out / "state.pt").exists()
    record = _strict_json((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_loss"] is None and record["nonfinite"] == ["val_loss"]


@pytest.fixture
def poison_in_epoch(monkeypatch):
    """Fill a weight of the trainable module with NaN at the end of epoch ``n``, before it is evaluated."""
    made: list[FeatureDistiller] = []
    init = FeatureDistiller.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    def install(n: int, prefix: str) -> None:
        evaluate, calls = engine.evaluate, iter(range(1, 10**6))

        def poisoned(model, *args, **kwargs):
            if next(calls) == n:
                weight = next(v for k, v in made[-1].named_parameters() if k.startswith(prefix))
                with torch.no_grad():
                    weight.fill_(float("nan"))
            return evaluate(model, *args, **kwargs)

        monkeypatch.setattr(FeatureDistiller, "__init__", remember)
        monkeypatch.setattr(engine, "evaluate", poisoned)

    return install


@pytest.mark.slow
@pytest.mark.parametrize("prefix, cause, flagged", [
    ("student.", "--lr 0.05 is likely too large", ["val_loss"]),  # a NaN student also gives a NaN val loss
    ("aligners.", "--alpha 1 is likely too large", None),  # the student (and its val loss) is still fine
])
def test_poisoned_weights_keep_the_last_good_checkpoint(folder, tmp_path, poison_in_epoch, prefix, cause, flagged):
    poison_in_epoch(2, prefix)
    out = tmp_path / "r"
    _fails([*SMALL_DISTILL, "--data", folder, "--out", out, "--epochs", "3", *FAST],
           "training diverged in epoch 2/3", "weight tensor(s) became non-finite", cause,
           "checkpoints of the last finished epoch are kept")
    tensors, meta = load_checkpoint(out / "last.safetensors")
    assert meta.epoch == 1 and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert load_state(out / "state.pt")["epoch"] == 1
    assert load_checkpoint(out / "best.safetensors")[1].epoch == 1
    lines = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines[1].get("nonfinite") == flagged


def test_feature_loss_overflow_names_alpha():
    cfg = engine.TrainConfig(data="-", student="-", teacher="t", alpha=1e30)
    parts = {"task_loss": torch.tensor(0.5), "feat_loss": torch.tensor(float("inf")), "loss": torch.tensor(math.inf)}
    with pytest.raises(engine.TrainingError, match="feature loss went non-finite.*--alpha 1e\\+30"):
        nonfinite.raise_nonfinite(parts, 0, 1, cfg, torch.device("cpu"), "epoch 1/1")


def _nan_copy(src: Path, dst: Path) -> Path:
    """``src`` (a safetensors file) with one NaN weight, its metadata kept."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = next(k for k, t in tensors.items() if k.endswith("weight") and t.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("how", ["checkpoint", "weights"])
def test_a_teacher_with_a_nan_weight_is_refused_when_it_loads(folder, trained, tmp_path, how):
    nan = _nan_copy(trained / "best.safetensors", tmp_path / "nan_teacher.safetensors")
    if how == "weights":  # plain weights: the student tensors of the checkpoint, without its metadata
        plain = load_checkpoint(nan)[0]
        save_file({k.removeprefix("student."): v for k, v in plain.items()}, str(nan))
        teacher = ["--teacher", "test_resnet", "--teacher-weights", nan]
    else:
        teacher = ["--teacher", nan]
    out = tmp_path / "r"
    # before: "non-finite loss in epoch 1/1 ... --alpha 1 is likely too large ... the checkpoints of the last
    # finished epoch are kept" (there were none)
    _fails(["distill", *teacher, "--student", "test_resnet", "--data", folder, "--out", out, "--epochs", "1",
            *FAST], f"the teacher's weights in {nan} are non-finite (1 tensor(s)", "an earlier checkpoint")
    assert not out.exists()  # refused before anything was written


def test_nonfinite_teacher_outputs_are_named():
    teacher = create_model("test_resnet", num_classes=5)
    with torch.no_grad():  # finite weights whose maps overflow
        for module in teacher.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(1e12)
    distiller = FeatureDistiller(teacher, create_model("test_resnet", num_classes=5), input_size=32)
    out = distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    cfg = engine.TrainConfig(data="-", student="-", teacher="t")
    with pytest.raises(engine.TrainingError, match="the teacher's outputs are non-finite, though its weights are "
                                                   "finite") as caught:
        nonfinite.raise_nonfinite(out, 0, 1, cfg, torch.device("cpu"), "epoch 1/1", distiller=distiller,
                                  saved=nonfinite.saved_checkpoints(0, 0))
    assert "--alpha" not in str(caught.value) and "no checkpoint was written" in str(caught.value)


def test_nonfinite_teacher_is_named(folder):
    teacher = torch.nn.Linear(2, 2)
    with torch.no_grad():
        teacher.weight.fill_(float("nan"))
    cfg = engine.TrainConfig(data="-", student="-", teacher="t")
    assert "teacher's weights are non-finite" in nonfinite.likely_cause({"feat_loss": math.nan}, cfg, teacher)


def test_eval_refuses_a_checkpoint_with_nonfinite_weights(trained, tmp_path):
    tensors, meta = load_checkpoint(trained / "best.safetensors")
    key = next(k for k, v in tensors.items() if k.startswith("student.") and v.is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, tensors, meta)
    _fails(["eval", path, "--workers", "0"], "non-finite student weights", "diverged", "earlier checkpoint")
    _fails(["export", path, "--no-benchmark"], "non-finite student weights")  # before: written as it was


def test_eval_refuses_nonfinite_outputs(trained, monkeypatch):
    # Finite weights can still overflow (huge BatchNorm statistics): before, such a model scored 50 % here.
    evaluate = engine.evaluate
    monkeypatch.setattr("cwkd.evaluation.evaluate",
                        lambda *a, **k: {**evaluate(*a, **k), "loss": float("nan")})
    _fails(["eval", trained / "best.safetensors", "--workers", "0"], "non-finite outputs", "meaningless")


# ----------------------------------------------------------------------------- strict JSON everywhere

def test_json_text_writes_null_and_flags_nonfinite_values():
    record = {"epoch": 3, "val_loss": float("nan"), "parts": {"feat": float("inf")}, "xs": [1.0, -math.inf],
              "t": torch.tensor(float("nan")), "ok": torch.tensor(2.5)}
    parsed = _strict_json(json_text(record))
    assert parsed == {"epoch": 3, "val_loss": None, "parts": {"feat": None}, "xs": [1.0, None], "t": None,
                      "ok": 2.5, "nonfinite": ["val_loss", "parts.feat", "xs[1]", "t"]}
    assert _strict_json(json_text({"a": 1.0})) == {"a": 1.0}  # no flag when all is finite


def test_every_json_output_parses_strictly(trained, monkeypatch):
    outputs = [
        runner.invoke(app, ["inspect", "test_resnet", "--json"]).output,
        runner.invoke(app, ["inspect", "--teacher", "test_resnet", "--student", "test_efficientnet",
                            "--json"]).output,
        runner.invoke(app, ["eval", str(trained / "best.safetensors"), "--workers", "0", "--json",
                            "--per-class"]).output,
        *(trained / "metrics.jsonl").read_text().splitlines(),
        (trained / "config.json").read_text(),
    ]
    for text in outputs:
        assert isinstance(_strict_json(text), dict), text
    # an eval whose numbers are non-finite somewhere (a class with inf top-5) still gives strict JSON
    evaluate = engine.evaluate
    monkeypatch.setattr("cwkd.evaluation.evaluate", lambda *a, **k: {**evaluate(*a, **k), "top5": math.inf})
    result = runner.invoke(app, ["eval", str(trained / "best.safetensors"), "--workers", "0", "--json"])
    assert _strict_json(result.output)["nonfinite"] == ["top5"], result.output


def test_metrics_lines_with_nan_are_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    checkpoint.append_jsonl(path, {"epoch": 1, "val_loss": float("nan"), "val_top1": 50.0})
    assert _strict_json(path.read_text()) == {"epoch": 1, "val_loss": None, "val_top1": 50.0,
                                              "nonfinite": ["val_loss"]}

