"""Test helpers: tiny generated image folders, the CLI's one-line errors, waiting on a subprocess run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder with train/ and val/ whose classes differ in brightness, so they can be learnt."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = 60 + 120 * index
                pixels = np.clip(rng.normal(base, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def cli_ok(args: list) -> str:
    """Run the CLI in-process; expect exit 0 and return its output."""
    from typer.testing import CliRunner

    from cwkd.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, one per finished epoch."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def cli_fails(args: list, *needles: str) -> str:
    """Run the CLI in-process; expect exit 1 with exactly one ``error:`` line (no traceback) holding every needle."""
    from typer.testing import CliRunner

    from cwkd.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    print(errors[0])  # `pytest -rP` shows the messages that docs/reliability.md quotes
    return errors[0]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until ``path`` exists (the run has got that far), failing if the run ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name} appeared:\n"
                        f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)
