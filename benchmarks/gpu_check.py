"""One call that runs and measures cwkd's CUDA path on a real GPU (issue 14).

On a machine with a CUDA GPU and this working tree it needs no network and installs nothing: every step
imports cwkd from the tree through ``PYTHONPATH``. The steps run one after another, each in its own
subprocess with its own time limit, so one slow step cannot eat the others' time:

    machine     GPU name, driver (nvidia-smi), torch, CUDA and cuDNN versions, which packages are there
    tests       pytest -m cuda tests/test_cuda.py: fp16 + GradScaler, bf16, channels_last, --compile with
                the feature hooks still firing, exact resume, export of a GPU-trained checkpoint
    cli_fp16    cwkd train + distill + eval + export --verify on the bundled fashion-mnist-mini, on CUDA
    cli_bf16    the same in bf16
    speed_bf16  benchmarks/speed.py --device cuda on resnet50 -> mobilenetv1, 224 px, batch 128: the fp32
                and bf16 steps (a) student, (b) teacher, (c) cwkd, timm's logit task, (c) with the engine's
                non-finite check (a host sync) against without, images/s and peak memory
    speed_fp16  the same pair under fp16 autocast with a GradScaler

and steps run only when named in ``--only``:

    grids       detection.py --step-cost, then the detection grid and alpha.py's sweep of mobilenetv1_100
                side by side (8 minutes by default, ``--grids-budget``; benchmarks/gpu_grids.py, its results
                in ``--out``/grids_results.tar.gz)
    throughput  benchmarks/throughput.py --plan gpu: resnet50 -> mobilenetv1_100 in bf16 at 224 px, end to
                end from JPEG files with --workers 2 and auto against the model-bound rate, with the data-wait
                share (about 3 minutes; the dry run: --plan quick). Its verdict says whether the GPU decode
                path is needed (issue 27); a missed target is recorded, not a failed step
    pretrained_detection  benchmarks/pretrained_detection.py --plan gpu (issue 24): Faster R-CNN R50 -> R18
                from bodies pretrained on the bundled fashion-mnist-mini, arms none, cwt, mgd and cwd, 5 seeds,
                8 cells at a time (about 8 minutes, an estimate; benchmarks/gpu_pretrained.py, its results in
                ``--out``/pretrained_detection.tar.gz; needs pycocotools carried in .gpu_deps; the dry run: --quick)

After every step it rewrites ``gpu_check.json`` in ``--out`` (default: ``$OUT``, else ``./gpu_check_out``),
so a run cut short still leaves what it measured; logs of every command are in ``--out``/logs. A step
ends as passed, failed (with the reason) or skipped (with the reason: fp16 on the CPU, onnx not
installed, the time budget spent). ``--dry-run`` runs the same steps on the CPU with test models and
tiny sizes in about a minute; tests/test_gpu_check.py runs it.

Usage:
    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT     # on the GPU machine: ~7 minutes
    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT --only machine,grids   # the grids: ~8 minutes
    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT --only machine,throughput   # ~3.5 minutes
    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT --only machine,pretrained_detection   # ~8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check    # anywhere, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the step modules beside this file, and common

from common import read_history, write_json  # noqa: E402  (only the standard library: no cwkd is imported here)

REPO = Path(__file__).resolve().parents[1]
DEPS = REPO / ".gpu_deps"  # pure-Python packages the GPU machine may lack (pytest), carried with the tree
STEPS = ("machine", "tests", "cli_fp16", "cli_bf16", "speed_bf16", "speed_fp16")
EXTRA_STEPS = ("grids", "throughput", "pretrained_detection")  # run only when --only names them
MIN_STEP_S = 15  # a step with less time than this left is skipped, not started
TAIL = 3000      # characters of each command's output kept in the JSON

#: speed.py variants: the fp32 and autocast triples, the host-sync twins, cwkd's logit KD and the peers.
SPEED_VARIANTS = {
    # a first run with 14 variants and 7 memory processes outran 150 s on an H100: the peers' rows are for the CPU
    "bf16": "student,teacher,cwkd,cwkd_sync,timm_logit,student_amp,teacher_amp,cwkd_amp,cwkd_amp_sync,timm_logit_amp",
    "fp16": "student,teacher,cwkd,student_amp,teacher_amp,cwkd_amp,cwkd_amp_sync,timm_logit_amp",
}
SPEED_MEMORY = {"bf16": "cwkd,student_amp,teacher_amp,cwkd_amp",
                "fp16": "student_amp,teacher_amp,cwkd_amp"}


@dataclass(frozen=True)
class Plan:
    """Models and sizes of one kind of run: the real GPU check, or the CPU dry run."""

    device: str
    precisions: tuple[str, ...]  # the cli_* and speed_* precisions run; the others are skipped
    teacher: str                 # CLI runs
    student: str
    data: str | None             # None: a tiny generated ImageFolder
    input_size: int
    batch: int
    workers: int
    train_extra: tuple[str, ...]  # more options for the train and distill runs
    speed: tuple[str, ...]       # speed.py's model and size options
    speed_memory: dict[str, str] | None  # None: SPEED_MEMORY
    budgets: dict[str, int] = field(default_factory=dict)  # seconds per step
    skip_reason: str = ""


GPU = Plan(device="cuda", precisions=("fp16", "bf16"), teacher="resnet18", student="mobilenetv3_small_050",
           data="fashion-mnist-mini", input_size=32, batch=256, workers=4, train_extra=(),
           speed=("--teacher", "resnet50", "--student", "mobilenetv1", "--batch", "128", "--input-size", "224",
                  "--num-classes", "1000", "--repeats", "5", "--warmup", "2", "--min-time", "0.2"),
           speed_memory=None,
           budgets={"machine": 30, "tests": 110, "cli_fp16": 70, "cli_bf16": 70, "speed_bf16": 200,
                    "speed_fp16": 150, "grids": 480, "throughput": 240, "pretrained_detection": 480})
DRY = Plan(device="cpu", precisions=("bf16",), teacher="test_resnet", student="test_efficientnet", data=None,
           input_size=32, batch=4, workers=0, train_extra=("--lr", "1e-3"),  # 0.05 blows up 4 steps' BN stats
           speed=("--teacher", "test_resnet", "--student", "test_efficientnet", "--batch", "4", "--input-size", "32",
                  "--num-classes", "10", "--repeats", "1", "--warmup", "1", "--min-time", "0.01", "--threads", "1"),
           speed_memory={"bf16": "cwkd"},
           budgets={"machine": 30, "tests": 150, "cli_fp16": 60, "cli_bf16": 90, "speed_bf16": 90, "speed_fp16": 60,
                    "grids": 300, "throughput": 120, "pretrained_detection": 300},
           skip_reason="fp16 needs CUDA (cwkd refuses it on the CPU); the dry run covers bf16")


@dataclass(frozen=True)
class Running:
    """A command started by :meth:`Check.spawn`."""

    cmd: list[str]
    proc: subprocess.Popen
    log: Path
    started: float


class Check:
    """Runs commands under the step and overall deadlines and keeps the JSON report up to date."""

    def __init__(self, plan: Plan, out: Path, budget: float, deps: Path | None, dry_run: bool) -> None:
        self.plan, self.out, self.dry_run = plan, out, dry_run
        self.deadline = time.monotonic() + budget
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # runs and data live beside --out, not in it: the device tool brings back 8 files of --out at most
        self.work = out.parent / f"{out.name}_work"
        self.work.mkdir(parents=True, exist_ok=True)
        paths = [str(REPO)] + ([str(deps)] if deps else []) + [p for p in [os.environ.get("PYTHONPATH")] if p]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1"}
        if dry_run:
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.report = {"schema": 1, "mode": "dry-run" if dry_run else "gpu",
                       "started": datetime.now(timezone.utc).isoformat(), "command": " ".join(sys.argv),
                       "repo": str(REPO), "budget_s": budget, "plan": _plan_dict(plan), "steps": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], limit: float, env: dict | None = None) -> dict:
        """Run ``cmd`` for at most ``limit`` seconds; its output goes to logs/NAME.log and its tail here."""
        return self.collect(self.spawn(name, cmd, env), limit)

    def spawn(self, name: str, cmd: list[str], env: dict | None = None) -> Running:
        """Start ``cmd`` with its output in logs/NAME.log; :meth:`collect` waits for it."""
        log = self.logs / f"{name}.log"
        print(f"  $ {' '.join(cmd) if '-c' not in cmd else name}", flush=True)
        with open(log, "w") as sink:  # the child keeps its own copy of the file
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own group: a timeout kills its children too
        return Running(cmd, proc, log, time.perf_counter())

    def collect(self, job: Running, limit: float) -> dict:
        """Wait at most ``limit`` more seconds for ``job``, then kill its process group; its rc, wall time, log tail."""
        try:
            rc, timed_out = job.proc.wait(timeout=max(1.0, limit)), False
        except subprocess.TimeoutExpired:
            os.killpg(job.proc.pid, signal.SIGKILL)
            rc, timed_out = job.proc.wait(), True
        text = job.log.read_text(errors="replace")
        return {"cmd": job.cmd, "rc": rc, "timed_out": timed_out,
                "wall_s": round(time.perf_counter() - job.started, 2), "log": str(job.log.relative_to(self.out)),
                "tail": text[-TAIL:]}

    def step(self, name: str, body) -> None:
        """Run one step's ``body(limit) -> dict`` within its budget; record status, reason and wall time."""
        limit = min(self.plan.budgets[name], self.left())
        print(f"[{name}] up to {limit:.0f} s", flush=True)
        started = time.perf_counter()
        if limit < MIN_STEP_S:
            result = _skipped(f"the time budget was spent ({self.left():.0f} s left of {self.report['budget_s']})")
        else:
            try:
                result = body(limit)
            except Exception as exc:  # a bug in this script must not lose the other steps
                result = {"status": "failed", "reason": f"gpu_check error: {type(exc).__name__}: {exc}"}
        result["wall_s"] = round(time.perf_counter() - started, 2)
        self.report["steps"][name] = result
        print(f"[{name}] {result['status']}" + (f": {result['reason']}" if result.get("reason") else "")
              + f" ({result['wall_s']} s)", flush=True)
        self.save()

    def wait(self, jobs: list[Running], until: float, snapshot, every: float) -> None:
        """Wait until every one of ``jobs`` has ended or the monotonic clock reaches ``until``, calling
        ``snapshot()`` every ``every`` seconds meanwhile; :meth:`collect` then reaps them."""
        last = time.monotonic()
        while any(job.proc.poll() is None for job in jobs) and time.monotonic() < until:
            time.sleep(1)
            if time.monotonic() - last >= every:
                snapshot()
                last = time.monotonic()

    def save(self) -> None:
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:  # one file for every log
            tar.add(self.logs, arcname="logs")
        write_json(self.out / "gpu_check.json", self.report)


def _plan_dict(plan: Plan) -> dict:
    return {k: v for k, v in plan.__dict__.items() if k != "skip_reason"}


def _skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def _failed_command(commands: list[dict]) -> str | None:
    """Why the last command failed, or None when every one exited 0."""
    bad = next((c for c in commands if c["rc"] != 0), None)
    if bad is None:
        return None
    what = " ".join(bad["cmd"][2:4]) if bad["cmd"][1] == "-m" else Path(bad["cmd"][1]).name
    if bad["timed_out"]:
        return f"{what} timed out after {bad['wall_s']} s"
    errors = [ln for ln in bad["tail"].splitlines() if ln.startswith("error:")]
    return f"{what} exited {bad['rc']}" + (f": {errors[-1]}" if errors else "; see its log")


# ----------------------------------------------------------------------------- the steps


_MACHINE = r"""
import json, platform
from importlib import metadata, util
import torch, cwkd
info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cwkd_from": cwkd.__file__,
        "cuda_available": torch.cuda.is_available(), "cpu_count": __import__("os").cpu_count(),
        "tf32": {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                bf16_supported=torch.cuda.is_bf16_supported())
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "present" if util.find_spec(name) else None
info["packages"] = {n: version(n) for n in ("timm", "torchvision", "typer", "rich", "safetensors", "pytest",
                                            "onnx", "onnxruntime", "torchdistill", "numpy")}
print("MACHINE=" + json.dumps(info))
"""


def machine(check: Check, limit: float) -> dict:
    """Versions, the GPU and its driver."""
    done = check.run("machine", [sys.executable, "-c", _MACHINE], limit)
    line = next((ln for ln in done["tail"].splitlines() if ln.startswith("MACHINE=")), None)
    info = json.loads(line.removeprefix("MACHINE=")) if line else {}
    info["nvidia_smi"] = _nvidia_smi()
    check.report["machine"] = info
    if line is None:
        return {"status": "failed", "reason": "could not import torch and cwkd; see the tail", "commands": [done]}
    if not check.dry_run and not info.get("cuda_available"):
        return {"status": "failed", "reason": "torch sees no CUDA GPU", "commands": [done]}
    return {"status": "passed", "commands": [done]}


def _nvidia_smi() -> dict | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    name, _, rest = text.splitlines()[0].partition(", ") if text else ("", "", "")
    driver, _, memory = rest.partition(", ")
    return {"name": name, "driver_version": driver, "memory_total": memory, "raw": text}


def tests(check: Check, limit: float) -> dict:
    """The cuda-marked tests, verbose, so a cut-short run still says which passed."""
    if not check.report.get("machine", {}).get("packages", {}).get("pytest"):
        return _skipped("pytest is not installed here; put it in a folder and pass --deps FOLDER")
    env = {**check.env, **({"CWKD_TEST_DEVICE": "cpu"} if check.dry_run else {})}
    done = check.run("tests", [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
                               "tests/test_cuda.py"], limit, env)
    lines = (check.out / done["log"]).read_text(errors="replace").splitlines()
    outcomes = {}
    for ln in lines:  # "tests/test_cuda.py::test_x[cuda] PASSED  [ 11%]"
        head, _, rest = ln.partition(" ")
        if "::" in head and rest.split(" ")[0] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            outcomes[head.split("::", 1)[1]] = rest.split(" ")[0]
    skips = [ln for ln in lines if ln.startswith("SKIPPED")]
    result = {"commands": [done], "outcomes": outcomes, "skips": skips,
              "counts": {k: list(outcomes.values()).count(k) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}}
    broken = [name for name, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    if done["rc"] != 0:
        reason = f"{len(broken)} test(s) failed: {', '.join(broken)}" if broken and not done["timed_out"] \
            else _failed_command([done])
        return {"status": "failed", "reason": reason, **result}
    if not result["counts"]["PASSED"]:
        return {"status": "failed", "reason": "no test ran (all skipped): is CUDA visible?", **result}
    return {"status": "passed", **result}


def cli(check: Check, limit: float, precision: str) -> dict:
    """cwkd train (teacher), distill, eval and export --verify, as a user runs them, on the plan's device."""
    plan = check.plan
    if precision not in plan.precisions:
        return _skipped(plan.skip_reason)
    stop = time.monotonic() + limit
    runs = check.work / "runs" / precision
    shutil.rmtree(runs, ignore_errors=True)
    data = plan.data or str(_tiny_folder(check.work / "data"))
    common = ["--data", data, "--epochs", "1", "--batch-size", str(plan.batch), "--input-size", str(plan.input_size),
              "--workers", str(plan.workers), "--device", plan.device, "--precision", precision, *plan.train_extra]
    student = runs / "student" / "best.safetensors"
    formats = ["torchscript"] + (["onnx"] if _has_onnx(check) else [])
    cwkd = [sys.executable, "-m", "cwkd"]
    commands = [
        ("train", [*cwkd, "train", "--model", plan.teacher, *common, "--out", str(runs / "teacher")]),
        ("distill", [*cwkd, "distill", "--teacher", str(runs / "teacher" / "best.safetensors"), "--student",
                     plan.student, "--kd-weight", "0.5", *common, "--out", str(runs / "student"),
                     "--no-teacher-check"]),  # a one-epoch teacher, at chance: this checks the device, not it
        ("eval", [*cwkd, "eval", str(student), "--device", plan.device, "--precision", precision, "--json",
                  "--batch-size", str(plan.batch), "--workers", str(plan.workers)]),
        *[(f"export_{f}", [*cwkd, "export", str(student), "--format", f, "--verify", "--no-benchmark", "--out",
                           str(runs / f"student.{f}")]) for f in formats],
    ]
    done = []
    for label, cmd in commands:
        done.append(check.run(f"cli_{precision}_{label}", cmd, stop - time.monotonic()))
        if done[-1]["rc"] != 0:
            break
    result = {"commands": done, "data": data}
    if not _has_onnx(check):
        result["onnx"] = "skipped: onnx and onnxruntime are not installed here (pip install 'cwkd[export]')"
    failure = _failed_command(done)
    if failure:
        return {"status": "failed", "reason": failure, **result}
    result.update(_cli_results(runs, done))
    return {"status": "failed", "reason": result["problem"], **result} if result.get("problem") \
        else {"status": "passed", **result}


def _cli_results(runs: Path, done: list[dict]) -> dict:
    """Last epoch of each run and the eval scores; ``problem`` says what is wrong with them, if anything."""
    out = {}
    for name in ("teacher", "student"):
        out[name] = read_history(runs / name)[-1]
    scores = next((ln for ln in done[2]["tail"].splitlines() if ln.startswith("{")), "{}")
    out["eval"] = {k: v for k, v in json.loads(scores).items() if k in ("top1", "top5", "loss", "images_per_s")}
    losses = [v for r in (out["teacher"], out["student"]) for k, v in r.items() if k.endswith("loss")]
    if not all(math.isfinite(v) for v in losses):
        out["problem"] = f"a non-finite loss: {losses}"
    elif not out["student"].get("train_feat_loss", 0) > 0:
        out["problem"] = "the distill run's feature loss is 0: the hooks did not fire"
    return out


def _has_onnx(check: Check) -> bool:
    packages = check.report.get("machine", {}).get("packages", {})
    return bool(packages.get("onnx") and packages.get("onnxruntime"))


def _tiny_folder(root: Path) -> Path:
    """A two-class ImageFolder of 32 px images (8 train, 4 val per class) for the dry run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for index, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 120 * index, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def speed(check: Check, limit: float, precision: str) -> dict:
    """benchmarks/speed.py on the plan's pair, fp32 + this precision's autocast rows."""
    plan = check.plan
    if precision not in plan.precisions:
        return _skipped(plan.skip_reason)
    path = check.out / f"speed_{precision}.json"
    memory = (plan.speed_memory or SPEED_MEMORY).get(precision, SPEED_MEMORY[precision])
    cmd = [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--device", plan.device, *plan.speed, "--no-small",
           "--amp", precision, "--variants", SPEED_VARIANTS[precision], "--memory-of", memory, "--out", str(path)]
    done = check.run(f"speed_{precision}", cmd, limit)
    if done["rc"] != 0 or not path.is_file():
        return {"status": "failed", "reason": _failed_command([done]) or f"{path.name} was not written",
                "commands": [done]}
    summary = speed_summary(json.loads(path.read_text()), precision)
    return {"status": "passed", "commands": [done], "results": path.name, "summary": summary}


def speed_summary(saved: dict, precision: str) -> dict:
    """Per precision: (a), (b), (c) in ms, c/(a+b), images/s, peak memory, the host-sync cost, timm's logit task."""
    result = saved["configs"][0]
    timing, memory, ratios = result["variants"], result["memory"], result["ratios"]
    summary = {"config": result["config"], "errors": result["errors"]}
    for label, suffix in (("fp32", ""), (precision, "_amp")):
        student, teacher, ours = (timing.get(n + suffix) for n in ("student", "teacher", "cwkd"))
        if not (student and teacher and ours):
            continue
        row = {"student_ms": student["median"] * 1e3, "teacher_ms": teacher["median"] * 1e3,
               "cwkd_ms": ours["median"] * 1e3, "ratio": ratios["cwkd" + suffix]["ratio"],
               "ratio_per_round": ratios["cwkd" + suffix]["per_round"]["median"],
               "cwkd_images_per_s": ours.get("images_per_s"),
               "cwkd_peak_mib": memory.get("cwkd" + suffix, {}).get("peak_mib"),
               "cwkd_step_mib": memory.get("cwkd" + suffix, {}).get("step_mib")}
        synced, timm = timing.get("cwkd_sync" if label == "fp32" else "cwkd_amp_sync"), \
            timing.get("timm_logit" + suffix)
        if synced:  # the engine's per-step non-finite check reads the loss on the host
            row["with_nonfinite_check_ms"] = synced["median"] * 1e3
            row["nonfinite_check_cost"] = synced["median"] / ours["median"]
        if timm:
            row["timm_logit_ms"] = timm["median"] * 1e3
            row["no_slower_than_timm_logit"] = ours["median"] <= timm["median"]
        row["within_target"] = row["ratio"] <= saved.get("target_ratio", 1.10)
        summary[label] = row
    return summary


def headline(steps: dict) -> dict:
    """The speed rows side by side: fp32 (from the bf16 run), bf16 and fp16, where they were measured."""
    rows = {}
    for precision in ("bf16", "fp16"):
        summary = steps.get(f"speed_{precision}", {}).get("summary", {})
        for label in ("fp32", precision):
            if label in summary and label not in rows:
                rows[label] = summary[label]
    return rows


def throughput(check: Check, limit: float) -> dict:
    """benchmarks/throughput.py: end to end from JPEG files against the model-bound rate (the dry run: --plan quick)."""
    plan = "quick" if check.dry_run else "gpu"
    path = check.out / f"throughput_{plan}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--plan", plan, "--data-dir",
           str(check.work / "throughput_data"), "--out", str(path)]
    done = check.run("throughput", cmd, limit)
    if done["rc"] != 0 or not path.is_file():
        return {"status": "failed", "reason": _failed_command([done]) or f"{path.name} was not written",
                "commands": [done]}
    saved = json.loads(path.read_text())
    summary = {name: {k: row[k] for k in ("workers", "images_per_s", "ratio_to_model_bound", "data_wait")}
               for name, row in saved["variants"].items()}
    return {"status": "passed", "commands": [done], "results": path.name, "summary": summary,
            "verdict": saved["verdict"], "data": saved["data"]}


def _grids(check: Check, limit: float) -> dict:
    """The grids step (benchmarks/gpu_grids.py)."""
    from gpu_grids import grids

    return grids(check, limit, _failed_command)


def _pretrained_detection(check: Check, limit: float) -> dict:
    """The pretrained_detection step (benchmarks/gpu_pretrained.py)."""
    from gpu_pretrained import pretrained_detection

    return pretrained_detection(check, limit, _failed_command)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                   help="folder for gpu_check.json, the speed JSON and the logs (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, test models, tiny sizes")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all steps together (default: 450; 240 with --dry-run)")
    p.add_argument("--only", default=None, metavar="STEPS", help=f"comma-separated steps to run of {','.join(STEPS)} "
                   f"(machine always runs), or {','.join(EXTRA_STEPS)}, which runs only when named here")
    p.add_argument("--grids-budget", type=float, default=None,
                   help="seconds for the grids step (default: 480; 300 with --dry-run)")
    p.add_argument("--deps", type=Path, default=None,
                   help="a folder of extra packages (e.g. pytest) put on PYTHONPATH for every step\n"
                        "(default: .gpu_deps in the repository, when it exists; not with --dry-run, which uses\n"
                        "this machine's packages: .gpu_deps holds builds for the GPU machine's Python)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = DRY if args.dry_run else GPU
    if args.grids_budget:
        plan = replace(plan, budgets={**plan.budgets, "grids": int(args.grids_budget)})
    only = set((args.only or ",".join(STEPS)).split(",")) | {"machine"}
    unknown = only - set(STEPS) - set(EXTRA_STEPS)
    if unknown:
        print(f"error: unknown step(s) {', '.join(sorted(unknown))}; use {', '.join(STEPS + EXTRA_STEPS)}",
              file=sys.stderr)
        return 1
    budget = args.budget or (240 if args.dry_run else 450) + sum(plan.budgets[n] for n in EXTRA_STEPS if n in only)
    deps = args.deps or (DEPS if DEPS.is_dir() and not args.dry_run else None)
    check = Check(plan, args.out.resolve(), budget, deps, args.dry_run)
    bodies = {"machine": lambda limit: machine(check, limit), "tests": lambda limit: tests(check, limit),
              "cli_fp16": lambda limit: cli(check, limit, "fp16"), "cli_bf16": lambda limit: cli(check, limit, "bf16"),
              "speed_bf16": lambda limit: speed(check, limit, "bf16"),
              "speed_fp16": lambda limit: speed(check, limit, "fp16"), "grids": lambda limit: _grids(check, limit),
              "throughput": lambda limit: throughput(check, limit),
              "pretrained_detection": lambda limit: _pretrained_detection(check, limit)}
    for name in STEPS:
        check.step(name, bodies[name] if name in only else lambda _limit: _skipped("not in --only"))
    for name in EXTRA_STEPS:
        if name in only:
            check.step(name, bodies[name])
    check.report["headline"] = headline(check.report["steps"])
    check.report["finished"] = datetime.now(timezone.utc).isoformat()
    check.save()
    failed = [n for n, s in check.report["steps"].items() if s["status"] == "failed"]
    print(f"wrote {check.out / 'gpu_check.json'}; " + (f"failed: {', '.join(failed)}" if failed else "no step failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
