"""Run directories a user can trust: nothing deletes a run or an input, one process per run, exact resumes.

The data-loss cases run the real CLI in subprocesses (``python -m cwkd``): the demo that must not
replace a user's run, ``--overwrite`` next to an input, two processes on one run directory, SIGHUP.
The resume cases (changed options, moved or replaced inputs, a damaged config.json) go through
``CliRunner``. docs/reliability.md ("Run directories and resume") quotes the messages printed here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cwkd.cli import demo
from cwkd.cli.app import app
from cwkd.errors import ConfigError
from cwkd.tasks.classification.models import create_model
from cwkd.training import runinputs
from cwkd.training.runlock import RunLock

from .helpers import cli_fails as _fails
from .helpers import make_image_folder
from .helpers import wait_for as _wait_for

runner = CliRunner()
FAST = ["--batch-size", "4", "--input-size", "32", "--workers", "0", "--device", "cpu"]
COMMON = ["--epochs", "1", *FAST]


def _ok(args: list):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _start(args: list, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "cwkd", *map(str, args)], env=env, text=True, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _cli(args: list, cwd: Path | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run the real CLI to the end; return (exit code, stderr)."""
    proc = _start(args, cwd)
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr


def _one_error(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    print(errors[0])
    return errors[0]


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4)


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("longdata"), per_class=16)  # 8 steps an epoch


@pytest.fixture(scope="module")
def teacher_run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    _ok(["train", "--model", "test_resnet", "--data", folder, "--out", out, *COMMON])
    return out


@pytest.fixture(scope="module")
def other_teacher(folder, tmp_path_factory) -> Path:
    """A second teacher checkpoint of the same model and classes, with other weights."""
    out = tmp_path_factory.mktemp("runs") / "teacher2"
    _ok(["train", "--model", "test_resnet", "--data", folder, "--out", out, *COMMON, "--seed", "1"])
    return out / "best.safetensors"


def _distill_run(folder: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    args = ["distill", "--teacher", teacher, "--student", "test_efficientnet", "--data", folder, "--out", out,
            *COMMON, "--no-teacher-check", *extra]  # one-epoch teachers, at chance
    _ok(args)
    return [str(a) for a in args]


# ----------------------------------------------------------------------------- the demo replaces only its own runs


def _user_run(path: Path) -> dict[str, str]:
    """A user's run as the demo would find it; returns its files' contents."""
    path.mkdir(parents=True)
    files = {"config.json": json.dumps({"config": {"data": "mine", "student": "resnet50"}}),
             "metrics.jsonl": '{"epoch": 1, "val_top1": 91.0}\n'}
    for name, text in files.items():
        (path / name).write_text(text)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("name", ["teacher", "cwt"])
def test_demo_refuses_a_run_it_did_not_make(tmp_path, name):
    files = _user_run(tmp_path / "runs" / name)
    code, stderr = _cli(["demo", "--fast", "--out", tmp_path / "runs", "--workers", "0"])
    assert code == 1
    _one_error(stderr, f"{tmp_path / 'runs' / name} holds a run that `cwkd demo` did not make", "another --out")
    assert {p.name: p.read_text() for p in (tmp_path / "runs" / name).iterdir()} == files
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [name]  # refused before training anything


@pytest.mark.parametrize("config", ["{}", "[1]", "not json", None])
def test_demo_refuses_a_run_whose_config_it_cannot_read(tmp_path, config):
    run = tmp_path / "runs" / "baseline"
    run.mkdir(parents=True)
    (run / "last.safetensors").write_bytes(b"weights")
    if config is not None:
        (run / "config.json").write_text(config)
    _fails(["demo", "--fast", "--out", tmp_path / "runs"], "did not make")
    assert (run / "last.safetensors").read_bytes() == b"weights"


@pytest.fixture
def tiny_demo(monkeypatch, folder):
    """The demo's plan on tiny models and the generated folder, so a whole demo takes seconds."""
    monkeypatch.setattr(demo, "FAST", demo.DemoPlan(teacher="test_resnet", student="test_efficientnet",
                                                    teacher_epochs=1, student_epochs=1, pairs="last"))
    real = demo.run
    monkeypatch.setattr(demo, "run", lambda cfg, console: real(
        dataclasses.replace(cfg, data=str(folder), workers=0, device="cpu", batch_size=4), console=console))


@pytest.mark.slow
def test_demo_replaces_its_own_runs_but_not_one_a_user_put_there(tmp_path, tiny_demo, folder):
    out = tmp_path / "demo"
    _ok(["demo", "--fast", "--out", out])
    assert json.loads((out / "cwt" / "config.json").read_text())["config"]["made_by"] == "cwkd demo"
    for name in ("teacher", "baseline", "cwt"):  # a line the first demo did not write: gone once the run is redone
        with open(out / name / "metrics.jsonl", "a") as f:
            f.write('{"marker": "first demo"}\n')
    _ok(["demo", "--fast", "--out", out])  # the demo's own runs are replaced (written anew)
    assert not any("first demo" in (out / n / "metrics.jsonl").read_text() for n in ("teacher", "baseline", "cwt"))
    # A user trains into the demo's folder with --overwrite: that run is theirs now, and the demo keeps off.
    _ok(["train", "--model", "test_resnet", "--data", folder, "--out", out / "baseline", *COMMON, "--overwrite"])
    before = (out / "baseline" / "best.safetensors").read_bytes()
    _fails(["demo", "--fast", "--out", out], f"{out / 'baseline'} holds a run that `cwkd demo` did not make")
    assert (out / "baseline" / "best.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------- --overwrite never deletes an input


@pytest.mark.slow
def test_overwrite_refuses_to_delete_the_teacher_it_reads(folder, teacher_run, tmp_path):
    run = shutil.copytree(teacher_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    # The teacher named through another path to the same file: the check compares resolved paths.
    teacher = tmp_path / "run" / ".." / "run" / "best.safetensors"
    code, stderr = _cli(["distill", "--teacher", teacher, "--student", "test_efficientnet", "--data", folder,
                         "--out", run, *COMMON, "--overwrite"])
    assert code == 1
    _one_error(stderr, f"--overwrite would delete {run / 'best.safetensors'}, which this run reads as its teacher",
               "copy it out of")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize(("option", "file", "what"), [("--teacher-weights", "last.safetensors", "teacher weights"),
                                                      ("--student-weights", "best.safetensors", "student weights")])
def test_overwrite_refuses_to_delete_a_weights_file_it_reads(folder, teacher_run, tmp_path, option, file, what):
    run = shutil.copytree(teacher_run, tmp_path / "run")
    before = (run / file).read_bytes()
    os.symlink(run / file, tmp_path / "link.safetensors")  # a link into --out is caught too
    _fails(["distill", "--teacher", "test_resnet", "--student", "test_resnet", "--data", folder, "--out", run,
            *COMMON, "--overwrite", option, tmp_path / "link.safetensors"],
           f"--overwrite would delete {run / file}, which this run reads as its {what}")
    assert (run / file).read_bytes() == before


def test_overwrite_refuses_to_delete_the_weights_train_starts_from(folder, teacher_run, tmp_path):
    run = shutil.copytree(teacher_run, tmp_path / "run")
    _fails(["train", "--model", "test_resnet", "--weights", run / "last.safetensors", "--data", folder,
            "--out", run, *COMMON, "--overwrite"], "which this run reads as its student weights")
    assert (run / "last.safetensors").is_file()


# ----------------------------------------------------------------------------- one process per run directory


def test_lock_names_its_holder_and_is_released(tmp_path):
    with RunLock(tmp_path) as first:
        first.acquire()
        first.acquire()  # a second call while held is a no-op
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError, match=rf"is in use by another cwkd process \(pid {os.getpid()}\)"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text("999999999\n")  # left by a killed run: flock is free, so it never blocks
    with RunLock(tmp_path) as again:
        again.acquire()
    RunLock(tmp_path, enabled=False).acquire()  # DDP ranks other than 0 take no lock
    assert not (tmp_path / ".lock").exists()


_FOREIGN_HOLDER = ("import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
                   "print(1, flush=True); time.sleep(float(sys.argv[2]))")


def test_a_lock_whose_recorded_holder_died_is_waited_for_and_never_names_it(tmp_path, monkeypatch):
    from cwkd.training import runlock

    for hold_s, wait_s in ((1.0, 30.0), (60.0, 0.5)):
        (tmp_path / ".lock").write_text("999999999\n")  # a run that died; a process it started holds the lock
        monkeypatch.setattr(runlock, "ORPHAN_WAIT_S", wait_s)
        holder = subprocess.Popen([sys.executable, "-c", _FOREIGN_HOLDER, str(tmp_path / ".lock"), str(hold_s)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            holder.stdout.readline()  # it holds the lock now
            lock = RunLock(tmp_path)
            if hold_s < wait_s:
                lock.acquire()  # taken once the leftover process ended
                lock.release()
                continue
            with pytest.raises(ConfigError) as refused:
                lock.acquire()
            message = str(refused.value)
            assert "in use by another cwkd process" not in message, message
            assert "left over from a cwkd run whose main process (pid 999999999) has ended" in message, message
            print(f"error: {message}")
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()


def test_lock_is_released_when_a_run_fails(folder, tmp_path):
    out = tmp_path / "r"
    _fails(["train", "--model", "test_resnet", "--data", folder, "--out", out, *FAST, "--epochs", "3",
            "--lr", "1e30", "--warmup-epochs", "0"], "non-finite loss")
    assert not (out / ".lock").exists()
    with RunLock(out) as lock:
        lock.acquire()


@pytest.mark.slow
def test_a_running_run_refuses_a_second_process_and_a_killed_one_does_not(long_folder, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "test_resnet", "--data", long_folder, "--out", out, *FAST, "--epochs", "1000"]
    first = _start(args)
    try:
        _wait_for(out / "state.pt", first)
        holder = f"pid {first.pid}"
        for second in (["train", "--resume", out], [*args, "--overwrite", "--seed", "3"]):
            code, stderr = _cli(second)
            assert code == 1
            _one_error(stderr, f"{out} is in use by another cwkd process ({holder})")
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert (out / ".lock").exists()  # a killed run leaves the file, but not the lock
    done = len(_epochs(out))
    _ok(["train", "--resume", out, "--epochs", str(done + 1)])
    assert _epochs(out) == list(range(1, done + 2))  # one line per epoch: no second writer
    assert not (out / ".lock").exists()


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc; empty elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
def test_a_run_killed_with_loader_workers_alive_resumes_at_once(long_folder, tmp_path):
    out = tmp_path / "run"
    first = _start(["train", "--model", "test_resnet", "--data", long_folder, "--out", out, *FAST, "--workers", "2",
                    "--epochs", "1000"])
    try:
        _wait_for(out / "state.pt", first)
        if sys.platform.startswith("linux"):
            assert _children(first.pid), "the run has no loader workers to outlive it"
        os.kill(first.pid, signal.SIGKILL)  # the main process only, as the OOM killer does; its workers live on
        first.wait(timeout=60)
        with RunLock(out) as lock:  # at once: before, the forked workers held the flock ~5 s more
            lock.acquire()
        code, stderr = _cli(["train", "--resume", out, "--epochs", str(len(_epochs(out)) + 1)])
        assert code == 0 and "in use" not in stderr, stderr[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the workers left of the killed run
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_two_resumes_of_one_run_train_once(long_folder, tmp_path):
    out = tmp_path / "run"
    _ok(["train", "--model", "test_resnet", "--data", long_folder, "--out", out, *FAST])
    procs = [_start(["train", "--resume", out, "--epochs", "1000"]) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert loser.returncode == 1
        _one_error(loser.stderr.read(), f"{out} is in use by another cwkd process (pid {winner.pid})")
        _wait_for(out / "metrics.jsonl", winner)
        os.killpg(winner.pid, signal.SIGTERM)
        assert winner.wait(timeout=60) == 143
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert _epochs(out) == list(range(1, len(_epochs(out)) + 1))  # no epoch written twice


@pytest.mark.slow
def test_default_run_names_differ_for_runs_started_together(folder, tmp_path):
    procs = [_start(["train", "--model", "test_resnet", "--data", folder, *COMMON], cwd=tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "best.safetensors").is_file() for run in runs)
    assert {run.name.rsplit("-", 1)[1] for run in runs} == {str(p.pid) for p in procs}


# ----------------------------------------------------------------------------- SIGHUP


@pytest.mark.slow
def test_sighup_saves_and_stops_like_sigterm(long_folder, tmp_path):
    out = tmp_path / "run"
    proc = _start(["train", "--model", "test_resnet", "--data", long_folder, "--out", out, *FAST,
                   "--epochs", "1000", "--workers", "1"])
    _wait_for(out / "state.pt", proc)
    os.killpg(proc.pid, signal.SIGHUP)  # a dropped ssh session hangs up the whole process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 129, stderr[-2000:]
    assert f"stopped by SIGHUP; saved {out / 'last.safetensors'}" in stderr and f"--resume {out}" in stderr
    assert "Traceback" not in stderr and not (out / ".lock").exists()
    _ok(["train", "--resume", out, "--epochs", str(len(_epochs(out)) + 1)])


# ----------------------------------------------------------------------------- resume: options given


@pytest.fixture(scope="module")
def alpha2_run(folder, teacher_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("alpha2") / "run"
    _distill_run(folder, teacher_run / "best.safetensors", out, "--alpha", "2", "--seed", "3")
    return out


@pytest.mark.parametrize(("option", "value", "saved"), [
    ("--alpha", "1.0", "2.0"),        # equal to the default: refused all the same
    ("--alpha", "3", "2.0"),
    ("--seed", "0", "3"),              # the default again
    ("--batch-size", "64", "4"),
    ("--method", "cwt", None),         # the same value retyped is no change
    ("--input-size", "32", None),
])
def test_resume_refuses_a_changed_option_even_when_it_equals_the_default(alpha2_run, tmp_path, option, value,
                                                                         saved):
    run = shutil.copytree(alpha2_run, tmp_path / "run")
    args = ["distill", "--resume", run, option, value, "--epochs", "2"]
    if saved is None:
        _ok(args)
        return
    _fails(args, f"{option} {value if option != '--alpha' else float(value)} differs from the run's own {saved}")


def test_the_start_line_says_what_the_aligners_cost(folder, teacher_run, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--teacher", teacher_run / "best.safetensors", "--student", "test_efficientnet", "--data",
            folder, "--out", out, *COMMON, "--no-teacher-check"]
    output = _ok([a for a in args if a not in ("--quiet", "-q")]).output
    params = json.loads((out / "config.json").read_text())["aligner_params"]
    assert params > 0 and f"(aligners {params / 1e6:.2f}M parameters, training only)" in output


def test_resume_takes_the_options_that_are_safe_to_change(folder, teacher_run, tmp_path):
    out = tmp_path / "run"
    _distill_run(folder, teacher_run / "best.safetensors", out)
    result = _ok(["distill", "--resume", out, "--epochs", "2", "--workers", "1", "--device", "cpu", "--quiet",
                  "--skip-corrupt", "--skip-nonfinite", "2", "--data-root", tmp_path, "--no-download"])
    assert result.output == "" and _epochs(out) == [1, 2]


# ----------------------------------------------------------------------------- resume: moved or replaced inputs


def test_resume_from_another_directory_finds_a_relative_data_path(folder, teacher_run, tmp_path, monkeypatch):
    shutil.copytree(folder, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    _distill_run(Path("data"), teacher_run / "best.safetensors", tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _ok(["distill", "--resume", tmp_path / "run", "--epochs", "2"])  # the recorded absolute path
    assert _epochs(tmp_path / "run") == [1, 2]


def test_resume_after_the_data_moved_says_how_and_takes_the_new_place(folder, teacher_run, tmp_path, monkeypatch):
    data = shutil.copytree(folder, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    _distill_run(Path("data"), teacher_run / "best.safetensors", tmp_path / "run")
    data.rename(tmp_path / "moved")
    _fails(["distill", "--resume", tmp_path / "run", "--epochs", "2"],
           "the run's --data data is not there any more", "add --data NEW_PATH to the --resume command")
    _fails(["distill", "--resume", tmp_path / "run", "--data", tmp_path / "nowhere"], "does not exist")
    _ok(["distill", "--resume", tmp_path / "run", "--epochs", "2", "--data", "moved"])
    assert _epochs(tmp_path / "run") == [1, 2]
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["data"] == "moved" and record["inputs"]["data"]["path"] == str(tmp_path / "moved")
    _ok(["distill", "--resume", tmp_path / "run", "--epochs", "3"])  # the next resume finds the new place alone
    assert _epochs(tmp_path / "run") == [1, 2, 3]


def test_resume_after_the_teacher_moved(folder, teacher_run, tmp_path):
    teacher = Path(shutil.copy(teacher_run / "best.safetensors", tmp_path / "teacher.safetensors"))
    _distill_run(folder, teacher, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "config.json").read_text())["inputs"]["teacher"]
    assert record == {"path": str(teacher.resolve()), "sha256": runinputs.sha256(teacher)}
    teacher.rename(tmp_path / "moved.safetensors")
    _fails(["distill", "--resume", tmp_path / "run", "--epochs", "2"], "add --teacher NEW_PATH")
    _ok(["distill", "--resume", tmp_path / "run", "--epochs", "2", "--teacher", tmp_path / "moved.safetensors"])


def test_resume_refuses_a_teacher_whose_content_changed(folder, teacher_run, other_teacher, tmp_path):
    teacher = Path(shutil.copy(teacher_run / "best.safetensors", tmp_path / "teacher.safetensors"))
    _distill_run(folder, teacher, tmp_path / "run")
    shutil.copy(other_teacher, teacher)  # replaced at the same path: used silently before
    _fails(["distill", "--resume", tmp_path / "run", "--epochs", "2"],
           f"the teacher file {teacher} changed since the run started", "would not be exact")
    _fails(["distill", "--resume", tmp_path / "run", "--epochs", "2", "--teacher", other_teacher],
           "changed since the run started")
    assert _epochs(tmp_path / "run") == [1]


def test_resume_refuses_teacher_weights_whose_content_changed(folder, tmp_path):
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_file(create_model("test_resnet", num_classes=2).state_dict(), weights)
    out = tmp_path / "run"
    _ok(["distill", "--teacher", "test_resnet", "--teacher-weights", weights, "--student", "test_efficientnet",
         "--data", folder, "--out", out, *COMMON, "--no-teacher-check"])  # random weights
    torch.manual_seed(1)
    save_file(create_model("test_resnet", num_classes=2).state_dict(), weights)
    _fails(["distill", "--resume", out, "--epochs", "2"], "the teacher weights file", "changed since the run started")


# ----------------------------------------------------------------------------- resume: a damaged config.json


def _edit(config: dict, case: str):
    inner = config["config"]
    edits = {
        "empty": {}, "list": [config], "config is a list": {**config, "config": [1]},
        "no config key": {k: v for k, v in config.items() if k != "config"},
        "unknown precision": {**config, "config": {**inner, "precision": "fp64"}},
        "alpha as a string": {**config, "config": {**inner, "alpha": "2"}},
        "data null": {**config, "config": {**inner, "data": None}},
        "no student": {**config, "config": {k: v for k, v in inner.items() if k != "student"}},
        "negative epochs": {**config, "config": {**inner, "epochs": -1}},
        "mean not numbers": {**config, "config": {**inner, "mean": ["a"]}},
    }
    return edits[case]


@pytest.mark.parametrize(("case", "needle"), [
    ("empty", 'has no "config" object'), ("list", 'has no "config" object'),
    ("config is a list", 'has no "config" object'), ("no config key", 'has no "config" object'),
    ("unknown precision", "'precision' is \"fp64\", expected one of fp32"),
    ("alpha as a string", "'alpha' is \"2\", expected a number"),
    ("data null", "'data' is null, expected a string"),
    ("no student", "the config has no 'student'"),
    ("negative epochs", "--epochs must be a positive whole number"),
    ("mean not numbers", "--mean must be comma-separated numbers"),
])
def test_resume_with_a_hand_edited_config_is_one_clear_line(alpha2_run, tmp_path, case, needle):
    run = shutil.copytree(alpha2_run, tmp_path / "run")
    (run / "config.json").write_text(json.dumps(_edit(json.loads((run / "config.json").read_text()), case)))
    line = _fails(["distill", "--resume", run], needle)
    assert "restore it" in line and "start a new run" in line
