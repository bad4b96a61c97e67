"""Shared fixtures: tiny timm models and generated data only; nothing downloads."""

from __future__ import annotations

import os

import pytest
import torch

from .helpers import make_image_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast instead of hanging
# One thread: tests use tiny models, and loader workers and subprocesses share the two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small generated ImageFolder (train/ + val/, two classes), shared by a test module."""
    return make_image_folder(tmp_path_factory.mktemp("data"))
