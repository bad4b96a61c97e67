"""`cwkd demo --fast`: the offline tour runs end to end and prints its comparison table."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cwkd.cli import app


@pytest.mark.slow
def test_demo_fast_runs_offline(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--fast", "--out", str(tmp_path / "demo"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "cwkd demo" in result.output and "baseline student" in result.output and "cwkd student" in result.output
    assert "not a comparison" in result.output and "changed the student's final top-1" not in result.output
    for run in ("teacher", "baseline", "cwt"):
        assert (tmp_path / "demo" / run / "best.safetensors").is_file()
