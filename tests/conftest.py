"""Shared fixtures. The real CIFAR-10 mini subset (../shared/data) stands in for the download."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from at import params as params_io

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AT_SHARED_DIR", REPO.parent / "shared"))
CIFAR_MINI = SHARED / "data" / "cifar10-mini-python.tar.gz"
CIFAR_MINI_MD5 = "1c190744c9595cc62078be24b4b038fb"


@pytest.fixture(scope="session")
def cifar_mini_tarball() -> Path:
    """The real CIFAR-10 mini archive of ../shared (a fixture, not an import: tests/slurm has a
    conftest module of its own, which a plain `from conftest import` may pick up instead)."""
    if not CIFAR_MINI.is_file():
        pytest.fail(f"{CIFAR_MINI} is missing: the tests need ../shared beside the repository "
                    f"(or AT_SHARED_DIR pointing at it)")
    return CIFAR_MINI


@pytest.fixture(scope="session")
def cifar_mini_dir(tmp_path_factory) -> Path:
    """A data folder prepared from the mini tarball by the same code as the real download."""
    from at.data import cifar

    if not CIFAR_MINI.is_file():
        pytest.fail(f"{CIFAR_MINI} is missing: the tests need ../shared beside the repository "
                    f"(or AT_SHARED_DIR pointing at it)")
    root = tmp_path_factory.mktemp("cifar10")
    cifar.prepare(root, url=str(CIFAR_MINI), md5=CIFAR_MINI_MD5)
    return root


@pytest.fixture(scope="module")
def real_params() -> dict:
    """params.yaml of the repository, as loaded (and schema-checked) by the code."""
    return params_io.load(REPO / "params.yaml")


@pytest.fixture
def params(real_params) -> dict:
    """A copy of params.yaml that a test may change."""
    return copy.deepcopy(real_params)
