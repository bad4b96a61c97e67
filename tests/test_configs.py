"""`cwkd train|distill --config FILE`: a YAML file, a run's config.json or a shipped recipe sets the defaults,
the command line wins, and a bad key or value is one line naming the key and the file (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import cwkd.cli.app as cli
from cwkd.cli.app import app
from cwkd.tasks import get_task
from cwkd.training.configfile import list_recipes

from .helpers import cli_fails, cli_ok

runner = CliRunner()


@pytest.fixture
def built(monkeypatch) -> list:
    """The TrainConfig each train/distill command builds, captured instead of training."""
    found = []
    monkeypatch.setattr(cli, "_run", lambda cfg, resume, options: found.append(cfg))
    return found


def _yaml(tmp_path: Path, values: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("recipe", list_recipes(), ids=lambda r: r.name)
def test_every_shipped_recipe_builds_its_run_config(recipe, built):
    values = yaml.safe_load(recipe.path.read_text())
    assert values["source"] and recipe.path.read_text().startswith("#")  # says where its numbers come from
    cli_ok(["distill", "--config", f"recipe:{recipe.name}", "--data", "my-data", "--device", "cpu"])
    cfg = built[-1]
    options = {k: v for k, v in values.items() if k not in ("source", "data")}
    saved = cfg.to_dict()
    for key, value in options.items():
        assert saved[key] == value, key
    assert cfg.data == "my-data" and cfg.task.value == recipe.task
    task = get_task(cfg.task)
    task.resolve_name(cfg.teacher)  # names cwkd builds: a typo in a recipe fails here
    task.resolve_name(cfg.student)
    # `cwkd train` with the same recipe is its baseline: the student and schedule, no teacher.
    result = runner.invoke(app, ["train", "--config", f"recipe:{recipe.name}", "--data", "my-data"])
    assert result.exit_code == 0, result.output
    assert "is a distillation config" in result.output
    base = built[-1]
    assert base.teacher is None and base.method.value == "none" and base.student == cfg.student
    assert (base.epochs, base.lr, base.batch_size, base.input_size) == (cfg.epochs, cfg.lr, cfg.batch_size,
                                                                       cfg.input_size)


def test_recipes_lists_every_recipe():
    out = cli_ok(["recipes", "--json"])
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [r.name for r in list_recipes()]
    paper = {r["name"]: r for r in rows}["paper-imagenet-r50-mobilenetv1"]
    assert (paper["task"], paper["student"]) == ("classification", "mobilenetv1_100")
    assert "2303.13212" in paper["source"]
    assert len([r for r in rows if r["name"].startswith("paper-")]) == 4
    assert "paper-coco-maskrcnn-r50" in cli_ok(["recipes"])


def test_the_command_line_wins_over_the_file_and_the_file_over_the_defaults(tmp_path, built):
    path = _yaml(tmp_path, {"teacher": "test_resnet", "student": "test_efficientnet", "data": "from-file",
                            "epochs": 3, "alpha": 2, "lr": 0.02, "mean": [0.5, 0.5, 0.5], "compile": False,
                            "method": "linear", "data-root": "somewhere"})
    cli_ok(["distill", "--config", path, "--epochs", "5", "--method", "mgd", "--allow-random-teacher"])
    cfg = built[-1]
    assert (cfg.epochs, cfg.method.value) == (5, "mgd")  # typed on the command line
    assert (cfg.data, cfg.alpha, cfg.lr, cfg.mean, cfg.data_root) == ("from-file", 2.0, 0.02, (0.5, 0.5, 0.5),
                                                                      "somewhere")
    assert (cfg.batch_size, cfg.pairs, cfg.seed) == (64, "last", 0)  # in neither: cwkd's defaults


@pytest.mark.parametrize("values, needles", [
    ({"epoch": 3}, ["unknown key 'epoch'", "did you mean 'epochs'", "cwkd distill"]),
    ({"model": "resnet18"}, ["unknown key 'model'", "calls it 'student'"]),
    ({"epochs": "ten"}, ["'epochs' is \"ten\"", "a whole number"]),
    ({"epochs": 2.5}, ["'epochs' is 2.5", "a whole number"]),
    ({"method": "cwtt"}, ["'method' is \"cwtt\"", "one of cwt, linear, mgd, cwd, none"]),
    ({"compile": 1}, ["'compile' is 1", "true or false"]),
    ({"log": ["tensorbord"]}, ["'log' is \"tensorbord\"", "one of tensorboard, wandb, trackio"]),
    ({"mean": [0.5, "x"]}, ["'mean' is [0.5, \"x\"]", "numbers"]),
    ({"momentum": 0.8}, ["'momentum' is 0.8", "no option"]),
    ({"resume": "runs/x"}, ["unknown key 'resume'"]),
])
def test_a_bad_key_or_value_is_one_line_naming_it_and_the_file(tmp_path, built, values, needles):
    path = _yaml(tmp_path, values)
    cli_fails(["distill", "--config", path, "--student", "test_efficientnet", "--data", "x"], str(path), *needles)
    assert built == []


@pytest.mark.parametrize("text, needle", [
    ("epochs: [1\n", "cannot read it"),
    ("- 1\n- 2\n", "not a mapping"),
])
def test_an_unreadable_file_is_one_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    cli_fails(["train", "--config", path], str(path), needle)


def test_a_missing_file_or_recipe_is_one_line(tmp_path):
    cli_fails(["train", "--config", tmp_path / "nope.yaml"], "no such file", "recipe:NAME")
    cli_fails(["distill", "--config", "recipe:imagenet"], "no recipe named 'imagenet'",
              "paper-imagenet-r50-mobilenetv1", "cwkd recipes")


def test_config_and_resume_do_not_mix(tmp_path, built):
    path = _yaml(tmp_path, {"epochs": 3})
    cli_fails(["train", "--config", path, "--resume", tmp_path], "a resumed run keeps its own; drop --config")


@pytest.mark.slow
def test_a_runs_config_json_round_trips(folder, tmp_path, built, monkeypatch):
    """A real run's config.json, given back with --config, builds the same config (but a new --out)."""
    monkeypatch.undo()  # this one trains for real
    run = tmp_path / "teacher"
    cli_ok(["train", "--model", "test_resnet", "--data", folder, "--epochs", "1", "--batch-size", "4",
            "--input-size", "32", "--workers", "0", "--device", "cpu", "--lr", "0.02", "--seed", "3",
            "--mean", "0.4,0.5,0.6", "--std", "0.2,0.2,0.2", "--label-smoothing", "0.1", "--out", run, "-q"])
    saved = json.loads((run / "config.json").read_text())["config"]
    found = []
    monkeypatch.setattr(cli, "_run", lambda cfg, resume, options: found.append(cfg))
    cli_ok(["train", "--config", run / "config.json"])
    again = json.loads(json.dumps(found[-1].to_dict()))  # as config.json would hold it
    assert again["out"] is None and not again["overwrite"]
    assert {k: v for k, v in again.items() if k not in ("out", "overwrite")} == \
        {k: v for k, v in saved.items() if k not in ("out", "overwrite")}
    # A distillation from the same file: the run's student, schedule and statistics, the teacher given, and
    # distillation's default method (the training run's own `method: none` is left out).
    cli_ok(["distill", "--config", run / "config.json", "--teacher", run / "best.safetensors"])
    assert (found[-1].student, found[-1].method.value, found[-1].mean) == ("test_resnet", "cwt", (0.4, 0.5, 0.6))


def test_resume_help_names_every_option_a_resumed_run_may_change():
    from cwkd.cli.options import Resume
    from cwkd.training.resume import RESUMABLE

    text = Resume.__metadata__[0].help
    for key in RESUMABLE:
        flag = key.replace("_", "-")
        assert f"--{flag}" in text or f"--[no-]{flag}" in text, f"--resume's help does not name --{flag}"


def test_distill_given_a_training_runs_config_distils_with_the_default_method(tmp_path, built):
    path = tmp_path / "config.json"  # what `cwkd train` writes: method none, no teacher
    path.write_text(json.dumps({"student": "test_resnet", "data": "fashion-mnist-mini", "epochs": 3,
                                "method": "none", "teacher": None}))
    output = cli_ok(["distill", "--config", path, "--teacher", "test_resnet", "--allow-random-teacher"])
    assert built[-1].method.value == "cwt" and built[-1].epochs == 3
    assert "training run's config (method none)" in output
    cli_ok(["distill", "--config", path, "--teacher", "test_resnet", "--allow-random-teacher", "--method", "mgd"])
    assert built[-1].method.value == "mgd"
    kd_only = _yaml(tmp_path, {"teacher": "test_resnet", "student": "test_resnet", "method": "none", "kd_weight": 1})
    cli_ok(["distill", "--config", kd_only, "--allow-random-teacher", "--data", "fashion-mnist-mini"])
    assert built[-1].method.value == "none"  # a distillation config's own method none (logit KD only) stays
