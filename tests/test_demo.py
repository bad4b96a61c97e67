"""`cwkd demo --fast`: the offline tour runs end to end and prints its comparison table."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cwkd.cli.app import app


@pytest.mark.slow
def test_demo_fast_runs_offline(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--fast", "--out", str(tmp_path / "demo"), "--workers", "0"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "cwkd demo" in result.output and "cwkd student: cwt" in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 10}
    assert set(rows) == {"teacher", "baseline (baseline)", "cwt"}, result.output  # cwkd compare's table
    assert "1 pair: no interval" in rows["cwt"] and "resnet18 (teacher)" in rows["cwt"]
    assert "not a comparison" in result.output and "changed the student's final top-1" not in result.output
    for run in ("teacher", "baseline", "cwt"):
        assert (tmp_path / "demo" / run / "best.safetensors").is_file()


@pytest.mark.parametrize("saved, ours", [
    ({"made_by": "cwkd demo"}, True),
    ({"extra": {"made_by": "cwkd demo"}}, True),  # written by cwkd 0.1.0, before the typed field
    ({"extra": {}}, False),
    ({}, False),
])
def test_demo_recognises_its_own_runs_old_and_new(tmp_path, saved, ours):
    import json

    from cwkd.cli.demo import _check_own_run
    from cwkd.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"config": {"data": "x", "student": "y", **saved}}))
    (tmp_path / "last.safetensors").write_bytes(b"")
    if ours:
        _check_own_run(tmp_path)
    else:
        with pytest.raises(ConfigError, match="did not make"):
            _check_own_run(tmp_path)
