"""Config files and shipped recipes for ``cwkd train|distill --config FILE``.

A config file (YAML, or a run's ``config.json``) holds option values by their names (``data_root`` or
``data-root``); :func:`command_defaults` checks every key and value against the command's own options and
returns them as click's ``default_map``, so options typed on the command line still win. ``recipe:NAME``
names a file in the package's ``recipes/`` folder. Nothing here imports torch.

Example:
    >>> [r.name for r in list_recipes()][:1]
    ['bench-fmnist-dense-fasterrcnn-r50-r18']
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cwkd.errors import ConfigError
from cwkd.training.config import TrainConfig, _typed

RECIPES = Path(__file__).parent.parent / "recipes"  # cwkd/recipes
#: Keys a config may carry that are no option: what a recipe says about itself.
META_KEYS = ("source", "description")
#: config.json keys that describe the run that wrote it, not a setting to reuse (a reuse gets a new --out).
RUN_RECORD_KEYS = ("out", "overwrite", "alpha_auto", "made_by")
#: `cwkd train` names the student's options after the one model it trains.
TRAIN_NAMES = {"student": "model", "student_pretrained": "pretrained", "student_weights": "weights",
               "student_backbone_weights": "backbone_weights"}
#: Options that only distillation has: `cwkd train` leaves them out of a distillation config (its baseline).
DISTILL_ONLY = ("teacher", "teacher_weights", "teacher_pretrained", "allow_random_teacher", "method", "alpha",
                "pairs", "hidden", "reduction", "kd_weight", "kd_temperature", "mgd_mask", "mgd_ratio", "cwd_tau",
                "teacher_check")
_NOT_FROM_FILE = ("resume", "config", "ctx")


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe: its name, what it distils, and where its numbers come from."""

    name: str
    task: str
    teacher: str
    student: str
    source: str
    path: Path


def list_recipes() -> list[Recipe]:
    """The shipped recipes, by name."""
    recipes = []
    for path in sorted(RECIPES.glob("*.yaml")):
        values = _parse(path)
        recipes.append(Recipe(path.stem, str(values.get("task", "classification")), str(values.get("teacher", "-")),
                              str(values.get("student", "-")), str(values.get("source", "")), path))
    return recipes


def resolve(source: str) -> Path:
    """The file ``--config`` names: ``recipe:NAME`` is a shipped recipe, anything else a path."""
    if source.startswith("recipe:"):
        name = source.removeprefix("recipe:")
        path = RECIPES / f"{name}.yaml"
        if not name or "/" in name or not path.is_file():
            names = ", ".join(r.name for r in list_recipes())
            raise ConfigError(f"--config {source}: no recipe named '{name}'; the recipes are {names} (cwkd recipes)")
        return path
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--config {source}: no such file; pass a YAML file, a run's config.json, or recipe:NAME")
    return path


def read(source: str) -> tuple[dict, Path]:
    """The option values in ``source`` (a run's config.json gives its ``config`` object), and the file."""
    path = resolve(source)
    values = _parse(path)
    if isinstance(values.get("config"), dict) and "cwkd_version" in values:  # a run's config.json
        values = {k: v for k, v in values["config"].items() if k not in RUN_RECORD_KEYS}
    return values, path


def _parse(path: Path) -> dict:
    """The mapping a YAML or JSON file holds, or one ConfigError naming the file and the problem."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"--config {path}: cannot read it ({detail}); fix the file's syntax") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: holds a {type(values).__name__}, not a mapping of option names to values")
    return values


def command_defaults(command: str, function: Callable, source: str) -> tuple[dict, list[str]]:
    """``source``'s values as the default_map of ``cwkd COMMAND`` (whose options are ``function``'s
    parameters), each checked against its option's type; and notes to print.

    An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and the file.
    ``cwkd train`` given a distillation config keeps the student and its schedule (the baseline) and
    leaves out the distillation options, with a note; ``cwkd distill`` given a training run's config (method
    none, no teacher) leaves out its ``method: none``, so it distils with ``--method``'s default, with a note.
    """
    values, path = read(source)
    hints = {k: v for k, v in typing.get_type_hints(function).items() if k not in _NOT_FROM_FILE and k != "return"}
    training = "model" in hints
    named = {str(k).replace("-", "_"): v for k, v in values.items()}
    from_training_run = not training and named.get("method") == "none" and not named.get("teacher")
    fixed = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    defaults, skipped = {}, []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        name = TRAIN_NAMES.get(name, name) if training else name
        if name in META_KEYS or value is None:  # None: the option's own default
            continue
        if (training and name in DISTILL_ONLY) or (from_training_run and name == "method"):
            skipped.append(name)
            continue
        if name not in hints and name in fixed:  # in config.json (momentum), but no option sets it
            if value != fixed[name]:
                raise ConfigError(f"--config {path}: '{key}' is {value!r}, but cwkd has no option for it "
                                  f"(always {fixed[name]}); remove the key")
            continue
        if name not in hints:
            raise ConfigError(_unknown(path, str(key), list(hints), command))
        defaults[name] = _checked(path, str(key), _as_option(name, value), hints[name])
    notes = []
    if from_training_run:
        notes.append(f"{path} is a training run's config (method none): `cwkd distill` takes its student and "
                     "schedule and distils with --method's default (cwt); pass --method to choose another")
    if training and any(named.get(k) not in (None, "none", False, 0, 0.0) for k in ("teacher", "method", "kd_weight")):
        notes.append(f"{path} is a distillation config: `cwkd train` takes its student and schedule (the baseline) "
                     f"and leaves out {', '.join(skipped)}")
    return defaults, notes


def _unknown(path: Path, key: str, names: list[str], command: str) -> str:
    name = key.replace("-", "_")
    hint = ""
    if name in ("model", "pretrained", "weights") and command == "distill":
        hint = f" (`cwkd distill` calls it '{ {v: k for k, v in TRAIN_NAMES.items()}[name]}')"
    elif close := difflib.get_close_matches(name, names, n=1):
        hint = f" (did you mean '{close[0]}'?)"
    return (f"--config {path}: unknown key '{key}'{hint}; a config's keys are the options of `cwkd {command}` "
            f"(see cwkd {command} --help), as config.json names them")


def _as_option(name: str, value):
    """A value as the command line spells it where the option is text: alpha 7, workers 4, mean [0.5, 0.5] ->
    "0.5,0.5"."""
    if name in ("mean", "std") and isinstance(value, list | tuple) and all(_number(v) for v in value):
        return ",".join(str(v) for v in value)
    if name in ("alpha", "mean", "std") and _number(value) or name == "workers" and type(value) is int:
        return str(value)
    return value


def _checked(path: Path, key: str, value, hint):
    """``value`` if it fits the option's type ``hint``, else a ConfigError naming the key and the file."""
    if key.replace("-", "_") in ("mean", "std") and not isinstance(value, str):
        raise ConfigError(f"--config {path}: '{key}' is {json.dumps(value)}, expected numbers, one per input "
                          "channel, such as [0.5, 0.5, 0.5]")
    try:
        return _typed(key, value, hint)
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
