"""Shared test set-up: offline hubs, CPU only, and the real CIFAR-10 from ../shared/data."""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    """Every test draws reproducible random numbers from torch's global generator, whatever ran
    before it (in this process or, for the Triton interpreter's child, in another): the seed comes
    from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tgz"


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 as an ImageFolder tree (``train/``, ``test/``), unpacked once per session.

    Skips when ``../shared/data/cifar10-jpeg.tgz`` is absent (a user's clone has no shared data).
    """
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 not available: {CIFAR_ARCHIVE} is absent")
    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        tar.extractall(target, filter="data")
    return target / "cifar10"


@pytest.fixture
def isolated_registry():
    """:mod:`ilmconvert.methods` as the test found it once the test ends: what a test registers
    (classes, whole methods) does not leak into the others."""
    from ilmconvert import methods

    with methods.isolated():
        yield methods
