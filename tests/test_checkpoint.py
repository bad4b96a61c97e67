"""Checkpoints, weight files and training state: round trips, atomic writes, files that must be refused."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch

from cwkd.errors import CheckpointError, ConfigError
from cwkd.files.checkpoint import (
    append_jsonl,
    atomic_write,
    atomic_write_text,
    check_writable,
    load_checkpoint,
    load_state,
    read_state_dict,
    save_checkpoint,
    save_state,
)
from cwkd.files.metadata import FORMAT_VERSION, CheckpointMeta


def _meta(**extra: object) -> dict:
    meta = {
        "model": "test_resnet",
        "num_classes": 10,
        "in_chans": 3,
        "input_size": [3, 32, 32],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "pairs": [{"teacher": "layer1", "student": "layer1"}],
        "method": "cwd",
        "dataset": None,
        "classes": [f"c{i}" for i in range(10)],
        "cwkd_version": "0.1.0",
        "epoch": 3,
        "val_top1": 71.5,
        "kind": "student",
    }
    meta.update(extra)
    return meta


def _ckpt(**changes: object) -> CheckpointMeta:
    """:func:`_meta` as the typed metadata that save_checkpoint takes."""
    return CheckpointMeta.from_dict(_meta()).replace(**changes)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"fc.weight": torch.randn(10, 8), "fc.bias": torch.zeros(10), "bn.tracked": torch.tensor(7)}


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


class _Evil:
    """A pickle payload that would create a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --- cwkd checkpoints ------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "student.safetensors"
    tensors = _tensors()
    save_checkpoint(path, tensors, _ckpt())
    loaded, meta = load_checkpoint(path)
    assert meta == _ckpt() and meta.scores == {"top1": 71.5} and meta.dataset is None
    assert meta.to_dict() == {k: v for k, v in _meta().items() if v is not None}
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
    assert _temp_files(tmp_path) == []


def test_checkpoint_handles_tied_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    w = torch.randn(4, 6, requires_grad=True)
    tensors = {"a": w, "tied": w, "t": w.detach().t(), "row": w.detach()[1]}
    save_checkpoint(tmp_path / "c.safetensors", tensors, _ckpt(input_size=(3, 8, 8)))
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta.input_size == (3, 8, 8)
    assert torch.equal(loaded["t"], w.detach().t()) and torch.equal(loaded["row"], w.detach()[1])


def test_save_checkpoint_refuses_bad_metadata_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    with pytest.raises(CheckpointError, match="num_classes"):
        save_checkpoint(path, _tensors(), _ckpt(num_classes="ten"))
    with pytest.raises(CheckpointError, match="mean"):
        save_checkpoint(path, _tensors(), _ckpt(mean=(0.5,)))
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(path, _tensors(), _ckpt(pairs=({"teacher": object()},)))
    assert not path.exists()


def test_load_checkpoint_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("data", [random.Random(0).randbytes(256), b"", b"hello", b"just some text\n" * 9])
def test_load_checkpoint_garbage(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)


def test_load_checkpoint_truncated(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.randn(64, 64)}, _ckpt())
    data = path.read_bytes()
    for cut in (len(data) // 2, 20, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_checkpoint(path)


def test_load_checkpoint_plain_safetensors_is_not_cwkd(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(_tensors(), path)
    with pytest.raises(CheckpointError, match="not a cwkd checkpoint.*--weights"):
        load_checkpoint(path)


def test_load_checkpoint_newer_format(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    header = {"format": "cwkd", "format_version": str(FORMAT_VERSION + 1), "cwkd": json.dumps(_meta())}
    safetensors.torch.save_file(_tensors(), path, metadata=header)
    with pytest.raises(CheckpointError, match=f"newer cwkd \\(format {FORMAT_VERSION + 1}\\); upgrade cwkd"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_classes", "10"),
        ("num_classes", True),
        ("in_chans", 0),
        ("input_size", [3, 32]),
        ("input_size", [1, 32, 32]),
        ("mean", [0.5, 0.5]),
        ("std", [0.2, 0.0, 0.2]),
        ("model", 5),
        ("classes", ["a", 1]),
        ("kind", "teacher"),
        ("epoch", 1.5),
        ("pairs", "layer1"),
    ],
)
def test_load_checkpoint_wrong_metadata_type(tmp_path: Path, key: str, value: object) -> None:
    path = tmp_path / "bad.safetensors"
    header = {"format": "cwkd", "format_version": "1", "cwkd": json.dumps(_meta(**{key: value}))}
    safetensors.torch.save_file(_tensors(), path, metadata=header)
    with pytest.raises(CheckpointError, match=f"'{key}'"):
        load_checkpoint(path)


def test_load_checkpoint_metadata_is_json_not_code(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    marker = tmp_path / "marker"
    header = {"format": "cwkd", "format_version": "1", "cwkd": f"__import__('os').system('touch {marker}')"}
    safetensors.torch.save_file(_tensors(), path, metadata=header)
    with pytest.raises(CheckpointError, match="unreadable cwkd metadata"):
        load_checkpoint(path)
    assert not marker.exists()


def test_metadata_requires_keys_and_allows_unknown_ones() -> None:
    meta = _meta(future_key={"anything": 1}, epoch=None)
    assert CheckpointMeta.from_dict(meta).epoch is None
    del meta["std"]
    with pytest.raises(CheckpointError, match="std"):
        CheckpointMeta.from_dict(meta)


def test_load_checkpoint_pth_says_what_it_is(tmp_path: Path) -> None:
    for name, legacy in (("new.pth", False), ("old.pth", True)):
        path = tmp_path / name
        torch.save(_tensors(), path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match="(zip|pickle).*not a cwkd checkpoint"):
            load_checkpoint(path)


# --- plain weights -----------------------------------------------------------------------------------------


def test_read_state_dict_safetensors_and_cwkd_checkpoint(tmp_path: Path) -> None:
    safetensors.torch.save_file(_tensors(), tmp_path / "w.safetensors")
    save_checkpoint(tmp_path / "c.safetensors", _tensors(), _ckpt())
    for name in ("w.safetensors", "c.safetensors"):
        state = read_state_dict(tmp_path / name)
        assert state.keys() == _tensors().keys()
        assert torch.equal(state["fc.weight"], _tensors()["fc.weight"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3, "arch": "resnet18"},
        lambda sd: {"state_dict_ema": {"x": torch.ones(1)}, "state_dict": sd, "optimizer": {}},
        lambda sd: {"model": sd, "args": {"lr": 0.1}},
        lambda sd: {"model_state": {**sd, "note": "dropped inside a container"}},
    ],
)
def test_read_state_dict_pth_and_containers(tmp_path: Path, wrap) -> None:
    path = tmp_path / "w.pth"
    torch.save(wrap(_tensors()), path)
    state = read_state_dict(path)
    assert state.keys() == _tensors().keys()
    assert torch.equal(state["fc.bias"], torch.zeros(10))


@pytest.mark.parametrize("payload", ["torch.save", "pickle.dump"])
def test_read_state_dict_refuses_malicious_pickle(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"fc.weight": torch.ones(2), "x": _Evil(marker)}
    if payload == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match="refused to load .*convert it to safetensors"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_state(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Evil(marker)))  # the payload is real: unpickling it does run
    assert marker.exists()


def test_read_state_dict_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="directory"):
        read_state_dict(tmp_path)
    (tmp_path / "w.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(CheckpointError, match="use a .safetensors"):
        read_state_dict(tmp_path / "w.h5")
    torch.save(_tensors(), tmp_path / "fake.safetensors")
    with pytest.raises(CheckpointError, match="PyTorch zip file.*rename it to .pth"):
        read_state_dict(tmp_path / "fake.safetensors")
    torch.save({"fc.weight": torch.randn(100, 100)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    cases = {"trunc.pth": data[: len(data) // 2], "junk.pt": os.urandom(200), "empty.bin": b""}
    cases["trunc.safetensors"] = safetensors.torch.save({"w": torch.ones(50)})[:100]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError):
            read_state_dict(tmp_path / name)


def test_read_state_dict_needs_tensors(tmp_path: Path) -> None:
    torch.save({"state_dict": {"epoch": 3}}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        read_state_dict(tmp_path / "a.pth")
    torch.save({"fc.weight": torch.ones(1), "epoch": 3}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="'epoch'"):
        read_state_dict(tmp_path / "b.pth")
    torch.save([torch.ones(1)], tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="list"):
        read_state_dict(tmp_path / "c.pth")


# --- training state ----------------------------------------------------------------------------------------


def test_save_state_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    state = {
        "epoch": 4,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    save_state(tmp_path / "state.pt", state)
    loaded = load_state(tmp_path / "state.pt")
    assert loaded["epoch"] == 4 and loaded["scheduler"] == sched.state_dict()
    assert loaded["scaler"]["scale"] == 1024.0
    assert torch.equal(loaded["torch_rng"], torch.get_rng_state())
    assert loaded["python_rng"] == random.getstate()
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters(), lr=0.01)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# --- atomic writes and output directories ----------------------------------------------------------------


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old contents")

    def writer(f) -> None:
        f.write(b"half of the new conte")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, writer)
    assert path.read_text() == "old contents"
    assert _temp_files(tmp_path) == []
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_text() == "new" and _temp_files(tmp_path) == []


def test_atomic_write_creates_parent_directories(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a" / "b" / "config.json", "{}")
    assert (tmp_path / "a" / "b" / "config.json").read_text() == "{}"


def test_append_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"epoch": 1, "loss": torch.tensor(0.5), "dir": tmp_path})
    append_jsonl(path, {"epoch": 2, "loss": 0.25})
    path.write_bytes(path.read_bytes() + b'{"epoch": 3, "lo')  # someone else's half line
    append_jsonl(path, {"epoch": 4})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"epoch": 1, "loss": 0.5, "dir": str(tmp_path)}
    assert json.loads(lines[1]) == {"epoch": 2, "loss": 0.25}
    assert json.loads(lines[-1]) == {"epoch": 4} and len(lines) == 4
    assert _temp_files(tmp_path) == []


def test_check_writable_creates_directory(tmp_path: Path) -> None:
    check_writable(tmp_path / "runs" / "exp1")
    assert (tmp_path / "runs" / "exp1").is_dir()
    assert list((tmp_path / "runs" / "exp1").iterdir()) == []


def test_check_writable_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        try:
            (ro / "probe").write_text("x")
        except OSError:
            pass
        else:
            pytest.skip("chmod does not restrict this user (root?)")
        with pytest.raises(ConfigError, match="cannot write to .*ro.*--output"):
            check_writable(ro)
        with pytest.raises(ConfigError, match="--output"):
            check_writable(ro / "sub")
    finally:
        ro.chmod(0o700)


def test_check_writable_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="--output"):
        check_writable(tmp_path / "f")


def test_check_writable_not_enough_space(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"free on the file system of {tmp_path}.*free some space"):
        check_writable(tmp_path, min_free_bytes=2**62)
