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


@pytest.fixture(scope="session", autouse=True)
def execution_cache(tmp_path_factory):
    """The session's own cache of layout and compile measurements (at.execution), for the tests
    and the processes they start: what the tests choose never depends on, or writes into, the
    user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("execution-cache")
        mp.setenv("AT_CACHE_DIR", str(folder))
        yield folder


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


# The one trained teacher of the training tests (tests/test_cohort.py, test_train.py,
# test_term_plugins.py): a WRN-10-2 trained for one epoch on the first 256 mini images, in
# float32 on the CPU. Session-scoped: each pytest worker trains it once.
TEACHER_MODEL = "wrn-10-2"


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, cifar_mini_dir, mlflow_template) -> Path:
    import shutil

    from at.train import Options, train

    tmp = tmp_path_factory.mktemp("teacher")
    shutil.copy(mlflow_template, tmp / "mlruns.db")
    spec = {"id": "test/teacher", "dataset": "cifar10", "data_dir": str(cifar_mini_dir), "student": TEACHER_MODEL,
            "method_name": "baseline", "method": {"terms": [{"type": "ce"}]}, "seed": 0,
            "out_dir": str(tmp / "teacher"),
            "protocol": {"epochs": 1, "batch_size": 32, "lr": 0.1, "lr_gamma": 0.2, "train_subset": 256,
                         "test_subset": 128, "precision": "float32"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns.db'}")
        train(spec, Options(device="cpu", progress=False, threads=1))
    return tmp / "teacher" / "checkpoint.pt"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made by MLflow itself: creating a store runs MLflow's schema
    migrations (about 2 s on a 2-core CPU), copying this file costs nothing, and a copy is the
    same as a store that existed before the run."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, mlflow_template, monkeypatch) -> str:
    """A private MLflow store for the test (a copy of the template in its tmp_path), set as
    MLFLOW_TRACKING_URI for the test and the processes it starts; returns its URI."""
    import shutil

    shutil.copy(mlflow_template, tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def pytest_collection_modifyitems(session, config, items):
    """Modules with slow tests first, the slowest (most slow tests) first: pytest-xdist's
    `--dist loadscope` hands modules to idle workers in collection order, so a long module
    collected last (alphabetically, test_tracking*.py) would run alone at the end while the
    other worker idles. Within a module the order stays as written."""
    slow: dict[str, int] = {}
    for item in items:
        slow.setdefault(item.module.__name__, 0)
        if item.get_closest_marker("slow") is not None:
            slow[item.module.__name__] += 1
    first_seen = {name: i for i, name in enumerate(slow)}
    items.sort(key=lambda item: (-slow[item.module.__name__], first_seen[item.module.__name__]))
