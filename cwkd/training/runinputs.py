"""The local files a run reads: its data folder, teacher checkpoint and weights files.

A new run records where they are (absolute paths) and a sha256 of each weights file in
``config.json``. ``--resume`` then finds them again from another working directory, accepts a
new place for a moved file (``--teacher NEW``, ``--data NEW``) when its content is the same, and
refuses a file that changed, since the resumed run would no longer be the run it continues.
``--overwrite`` never deletes one of them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cwkd.errors import ConfigError

#: Config keys that may name a local file or folder the run reads.
INPUT_KEYS = ("data", "teacher", "teacher_weights", "student_weights", "student_backbone_weights")
_WHAT = {"teacher": "teacher", "teacher_weights": "teacher weights", "student_weights": "student weights",
         "student_backbone_weights": "student backbone weights"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def input_paths(cfg) -> dict[str, Path]:
    """The inputs of ``cfg`` that are existing local paths, resolved, by config key."""
    found = {}
    for key in INPUT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, str) and value and Path(value).exists():
            found[key] = Path(value).resolve()
    return found


def record(cfg) -> dict:
    """What config.json keeps of the inputs: absolute paths, and a sha256 for each weights file."""
    entries = {}
    for key, path in input_paths(cfg).items():
        entries[key] = {"path": str(path)}
        if key in _WHAT and path.is_file():
            entries[key]["sha256"] = sha256(path)
    return entries


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_not_inputs(doomed: list[Path], cfg, out: Path) -> None:
    """Refuse ``--overwrite`` when a file it would delete is one this run reads."""
    reads = {path: key for key, path in input_paths(cfg).items()}
    for file in doomed:
        key = reads.get(file.resolve())
        if key is not None:
            raise ConfigError(
                f"--overwrite would delete {file}, which this run reads as its {_WHAT.get(key, 'data')}; "
                f"copy it out of {out} and pass the copy, or choose another --out"
            )


def movable(key: str, entries: dict) -> bool:
    """Whether ``--resume`` may take a new place for input ``key``: the run recorded it as a local path."""
    return key in INPUT_KEYS and isinstance(entries.get(key), dict)


def locate(cfg, entries: dict, given: dict, out: str | Path) -> None:
    """Point ``cfg``'s recorded inputs at where they are now; refuse a weights file whose content changed.

    ``given`` holds the new places the resuming command passed (only keys that are :func:`movable`).
    Without one, the saved path is used, or the recorded absolute path when the saved one is relative
    and the resume runs from another working directory.
    """
    for key in INPUT_KEYS:
        entry = entries.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        saved = getattr(cfg, key)
        if key in given:
            place = str(given[key])
            if not Path(place).exists():
                raise ConfigError(f"--resume {out}: {_flag(key)} {place} does not exist; pass where the "
                                  f"run's {_WHAT.get(key, 'data')} is now")
        elif isinstance(saved, str) and Path(saved).exists():
            place = saved
        elif Path(entry["path"]).exists():
            place = entry["path"]
        else:
            raise ConfigError(
                f"--resume {out}: the run's {_flag(key)} {saved} is not there any more (nor at {entry['path']}); "
                f"if it moved, add {_flag(key)} NEW_PATH to the --resume command"
            )
        digest = entry.get("sha256")
        if isinstance(digest, str) and Path(place).is_file() and sha256(Path(place)) != digest:
            raise ConfigError(
                f"--resume {out}: the {_WHAT[key]} file {place} changed since the run started (its sha256 "
                f"differs); the resume would not be exact: put the original file back or pass where it is now "
                f"with {_flag(key)} PATH, or start a new run"
            )
        setattr(cfg, key, place)
