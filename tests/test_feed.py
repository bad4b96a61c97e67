"""Feeding the device: ``--workers auto``, and uint8 batches normalised on the device (cwkd.feed)."""

from __future__ import annotations

import os

import pytest

from cwkd import feed
from cwkd.config import TrainConfig
from cwkd.errors import ConfigError
from tests.helpers import cli_fails

# ----------------------------------------------------------------------------- 1. --workers auto


@pytest.mark.parametrize(("cores", "processes", "expected"), [
    (1, 1, 0),     # a single core: load in the main process
    (2, 1, 2),     # this machine: the old default
    (16, 1, 16),   # the GPU machine
    (64, 1, 16),   # capped
    (16, 4, 4),    # torchrun with 4 processes on one machine: a quarter each
    (128, 8, 16),  # an 8-GPU node
    (4, 8, 1),     # more processes than cores: still one each
])
def test_auto_is_this_process_share_of_the_cores(cores, processes, expected):
    assert feed.resolve_workers("auto", cores=cores, processes=processes) == expected


def test_auto_reads_the_affinity_and_torchrun_local_world_size(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(12)))
    else:
        monkeypatch.setattr(os, "cpu_count", lambda: 12)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert feed.resolve_workers("auto") == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert feed.resolve_workers("auto") == 4


def test_a_number_of_workers_is_kept_and_a_bad_one_refused():
    assert feed.resolve_workers(0) == 0 and feed.resolve_workers(7) == 7
    for bad in ("many", -1, 2.5):
        with pytest.raises(ConfigError, match="--workers"):
            feed.resolve_workers(bad)


def test_config_defaults_to_auto_and_parses_what_is_typed():
    cfg = TrainConfig(data="fashion-mnist-mini", student="test_resnet", method="none")
    assert cfg.workers == "auto"
    assert TrainConfig(data="x", student="test_resnet", method="none", workers="Auto").workers == "auto"
    assert TrainConfig(data="x", student="test_resnet", method="none", workers="3").workers == 3
    assert TrainConfig.from_dict({**cfg.to_dict(), "workers": 2}).workers == 2  # a config.json from before
    with pytest.raises(ConfigError, match=r"--workers must be from 0 to 256 \(or auto\)"):
        TrainConfig(data="x", student="test_resnet", method="none", workers=-1)


def test_cli_refuses_a_workers_value_that_is_not_a_number_or_auto():
    cli_fails(["train", "--model", "test_resnet", "--data", "fashion-mnist-mini", "--workers", "lots"],
              "--workers must be a whole number of at least 0, or auto")
    cli_fails(["eval", "no-such.safetensors", "--workers", "-3"], "--workers must be from 0 to 256")
