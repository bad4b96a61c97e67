"""`cwkd inspect` driven like a user, through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cwkd.cli.app import app

runner = CliRunner()


def test_inspect_lists_stages():
    result = runner.invoke(app, ["inspect", "test_resnet", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert "layer4" in result.output and "stage" in result.output


def test_inspect_json_has_shapes():
    result = runner.invoke(app, ["inspect", "test_resnet", "--input-size", "64", "--in-chans", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    layer4 = next(layer for layer in data["layers"] if layer["name"] == "layer4")
    assert (layer4["channels"], layer4["reduction"], layer4["is_stage"]) == (96, 32, True)
    assert data["input_size"] == [1, 64, 64]


def test_inspect_pairs_json_reports_cost():
    result = runner.invoke(app, ["inspect", "--teacher", "test_resnet", "--student", "test_efficientnet",
                                 "--input-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(p["student"], p["teacher"]) for p in data["pairs"]] == [("blocks.4", "layer4")]
    # cwt aligner: 64->96 and 96->96 1x1 convs with biases, on a 2x2 map
    assert data["aligner_params"] == 64 * 96 + 96 + 96 * 96 + 96
    assert data["extra_flops_per_image"] == 2 * 4 * (64 * 96 + 96 * 96)


def test_inspect_pairs_table():
    result = runner.invoke(app, ["inspect", "--teacher", "test_resnet", "--student", "test_efficientnet",
                                 "--pairs", "all", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert "layer1" in result.output and "aligners:" in result.output


def test_unknown_model_is_one_clean_line():
    result = runner.invoke(app, ["inspect", "test_resnett"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: unknown model 'test_resnett'; did you mean test_resnet")
    assert "Traceback" not in result.output


def test_unknown_layer_points_to_inspect():
    result = runner.invoke(app, ["inspect", "--teacher", "test_resnet", "--student", "test_efficientnet",
                                 "--pairs", "blocks.4:layer9", "--input-size", "64"])
    assert result.exit_code == 1
    assert "cwkd inspect test_resnet" in result.output


def test_usage_errors_stay_typer_errors():
    result = runner.invoke(app, ["inspect", "--teacher", "test_resnet"])
    assert result.exit_code == 2
