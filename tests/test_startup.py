"""Start-up and small things (issue 10, section 6): `cwkd --version`, a `--help` that never loads torch,
option checks that name the right parameter, and warnings from rank 0 only.

Speed itself is measured by ``benchmarks/startup.py``, not here: a timed unit test would fail on a busy
machine. What makes ``--help`` slow is importing torch, and that is what these tests pin down.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

import cwkd
from cwkd import choices
from cwkd.cli.app import app

runner = CliRunner()


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_version_prints_and_exits_zero():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"cwkd {cwkd.__version__}"


@pytest.mark.slow
def test_version_from_a_real_process():
    result = subprocess.run([sys.executable, "-m", "cwkd", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cwkd {cwkd.__version__}"


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback():
    code = """
import sys
class Interrupt:  # a Ctrl-C that lands while the CLI's modules import
    def find_spec(self, name, path=None, target=None):
        if name == "cwkd.cli.app":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from cwkd.cli import main
main()
"""
    result = _run_python(code)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_help_of_every_command_loads_neither_torch_nor_timm():
    commands = sorted(typer.main.get_command(app).commands)
    code = f"""
import json, sys
from typer.testing import CliRunner
from cwkd.cli.app import app
runner = CliRunner()
codes = {{c: runner.invoke(app, [*c.split(), "--help"]).exit_code for c in {["", *commands]!r}}}
codes["--version"] = runner.invoke(app, ["--version"]).exit_code
print(json.dumps({{"codes": codes, "loaded": sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)}}))
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["codes"].values()) == {0}, report["codes"]
    assert report["loaded"] == [], f"--help imported {report['loaded']}"


@pytest.mark.slow
def test_import_cwkd_is_lazy_and_every_public_name_resolves():
    code = """
import json, sys
import cwkd
lazy = "torch" not in sys.modules
dir_ok = set(cwkd.__all__) <= set(dir(cwkd))
from cwkd import FeatureDistiller, Method, __version__
names = {name: type(getattr(cwkd, name)).__name__ for name in cwkd.__all__}
print(json.dumps({"lazy": lazy, "dir_ok": dir_ok, "names": names, "version": __version__}))
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lazy"] and report["dir_ok"] and report["version"] == cwkd.__version__
    assert report["names"]["FeatureDistiller"] == "type" and report["names"]["pair_layers"] == "function"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cwkd.nope  # noqa: B018
    assert not hasattr(cwkd, "nope")


def test_enums_keep_their_old_import_paths():
    from cwkd.core.aligner import Method
    from cwkd.core.losses import Reduction
    from cwkd.evaluation import Split
    from cwkd.export import ExportFormat

    assert (Method, Reduction, Split, ExportFormat) == (
        choices.Method, choices.Reduction, choices.Split, choices.ExportFormat)
    assert cwkd.Method is choices.Method and cwkd.Reduction is choices.Reduction


@pytest.mark.parametrize("args,option", [(["eval", "x.safetensors", "--split", "test"], "--split"),
                                         (["export", "x.safetensors", "--format", "tflite"], "--format")])
def test_split_and_format_are_checked_as_choices(args, option):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert option in result.output and "is not one of" in result.output



@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("name", ["alpha", "kd_weight", "kd_temperature"])
def test_distiller_names_the_parameter_that_is_not_finite(name, value):
    from torch import nn

    from cwkd import ConfigError, FeatureDistiller

    with pytest.raises(ConfigError, match=f"^{name} must be a finite number .*, got {value}$"):
        FeatureDistiller(nn.Identity(), nn.Identity(), **{name: value})


@pytest.mark.parametrize("enabled,quiet,printed", [(True, False, True), (True, True, True), (False, False, False)])
def test_warnings_come_from_rank_zero_only(enabled, quiet, printed):
    import io

    from cwkd.training.console import RunConsole

    stream = io.StringIO()
    RunConsole(quiet=quiet, enabled=enabled, stream=stream).warn("disk almost full")
    assert ("disk almost full" in stream.getvalue()) is printed


@pytest.mark.parametrize("module, never", [
    # exporting needs no training engine
    ("cwkd.export", ["cwkd.training.engine", "cwkd.training.rundir", "cwkd.core.distiller"]),
    ("cwkd.evaluation", ["cwkd.training.engine", "cwkd.training.rundir"]),
    # the old cycle: rundir -> evaluation -> engine -> rundir
    ("cwkd.training.rundir", ["cwkd.evaluation", "cwkd.training.engine"]),
])
def test_modules_import_only_what_they_use(module, never):
    result = _run_python(f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('cwkd')))")
    assert result.returncode == 0, result.stderr
    loaded = result.stdout
    assert not [m for m in never if f"'{m}'" in loaded], loaded
