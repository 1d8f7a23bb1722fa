"""A term type defined outside the package trains real runs: registered in-process through
`at.method.register_term`, and through a method's `plugins` list in `python -m at train`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from at.method import TERM_TYPES, TermType, register_term, term_names, validate_method
from at.train import Options, train

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = {"epochs": 1, "batch_size": 64, "lr": 0.1, "lr_drops": [], "lr_gamma": 0.2, "momentum": 0.9,
            "nesterov": False, "weight_decay": 5e-4, "reset_momentum_at_drops": True, "augment": "crop_flip",
            "train_subset": 128, "test_subset": 128}


def _spec(out: Path, data_dir: Path, method_name: str, method: dict, teacher_checkpoint: Path | None = None) -> dict:
    return {"id": method_name, "dataset": "cifar10", "data_dir": str(data_dir), "student": "wrn-10-1",
            "weights": None, "teacher": "wrn-10-1" if teacher_checkpoint else None, "teacher_weights": None,
            "teacher_checkpoint": str(teacher_checkpoint) if teacher_checkpoint else None,
            "method_name": method_name, "method": method, "seed": 0, "out_dir": str(out),
            "num_classes": 10, "protocol": PROTOCOL, "profile": "test"}


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory, cifar_mini_dir) -> Path:
    """A real (one-epoch) teacher run; WRN-10-1 keeps it cheap."""
    tmp = tmp_path_factory.mktemp("teacher")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns.db'}")
        train(_spec(tmp / "teacher", cifar_mini_dir, "baseline", {"terms": [{"type": "ce"}]}),
              Options(progress=False, threads=1))
    return tmp / "teacher" / "checkpoint.pt"


# The user's term: mean over batch and classes of |z_s - z_t|, with what each call saw kept
# aside so that the test can recompute it independently.
CALLS: list[dict] = []


def _logit_l1(step, term):
    CALLS.append({"student": step.student_logits.detach().double().numpy().copy(),
                  "teacher": step.teacher_logits.detach().double().numpy().copy()})
    value = (step.student_logits.float() - step.teacher_logits.float()).abs().mean()
    CALLS[-1]["value"] = value.item()
    return value


@pytest.fixture
def logit_l1():
    record = register_term(TermType("logit_l1", _logit_l1, beta=1.0, needs_teacher=True, compares_logits=True))
    CALLS.clear()
    yield record
    TERM_TYPES.unregister("logit_l1")


def test_a_term_type_registered_from_outside_trains_a_real_run(tmp_path, cifar_mini_dir, teacher_checkpoint,
                                                               logit_l1, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    method = {"terms": [{"type": "ce"}, {"type": "logit_l1", "name": "l1", "beta": 0.5}]}
    assert term_names(method) == ["ce", "l1"]
    out = tmp_path / "student"
    train(_spec(out, cifar_mini_dir, "ce+l1", method, teacher_checkpoint), Options(progress=False, threads=1))

    (row,) = _history(out)
    assert {"loss_ce", "loss_l1"} <= set(row)
    # two steps of 64 images: the history's value is 0.5 times the mean of what the term returned,
    # and each returned value is the L1 distance recomputed here from the logits it saw
    train_calls = list(CALLS)
    assert [c["student"].shape for c in train_calls] == [(64, 10), (64, 10)]
    for call in train_calls:
        assert call["value"] == pytest.approx(np.abs(call["student"] - call["teacher"]).mean(), rel=1e-5)
    expected = 0.5 * np.mean([c["value"] for c in train_calls])
    assert float(row["loss_l1"]) == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(expected) and expected > 0


PLUGIN = '''
"""A term type for the `plugins` test: L1 distance between student and teacher logits."""
from at.method import TermType, register_term


def _value(step, term):
    return (step.student_logits.float() - step.teacher_logits.float()).abs().mean()


register_term(TermType("plugin_logit_l1", _value, needs_teacher=True, compares_logits=True))
'''


def test_a_plugin_module_is_imported_by_the_training_subprocess(tmp_path, cifar_mini_dir, teacher_checkpoint):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "at_test_logit_plugin.py").write_text(textwrap.dedent(PLUGIN))
    method = {"plugins": ["at_test_logit_plugin"], "terms": [{"type": "ce"}, {"type": "plugin_logit_l1"}]}
    out = tmp_path / "student"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_spec(out, cifar_mini_dir, "ce+plugin", method, teacher_checkpoint)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(plugins)])}
    subprocess.run([sys.executable, "-m", "at", "--params", str(REPO / "params.yaml"), "train",
                    "--spec", str(spec_file), "--threads", "1", "--no-progress"],
                   env=env, cwd=tmp_path, check=True)
    (row,) = _history(out)
    value = float(row["loss_plugin_logit_l1"])
    assert np.isfinite(value) and value > 0
    # this process never imported the plugin: its term type is known only where it is listed
    assert "plugin_logit_l1" not in TERM_TYPES


@pytest.mark.parametrize(
    "plugins,needle",
    [
        (["at_no_such_plugin_module"], "plugin 'at_no_such_plugin_module' could not be imported (ModuleNotFoundError"),
        ("at.terms", "plugins must be a list of importable module names"),
        ([""], "plugins must be a list"),
    ],
)
def test_bad_plugins_are_one_clear_error(plugins, needle):
    with pytest.raises(ValueError) as err:
        validate_method({"plugins": plugins, "terms": [{"type": "ce"}]})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_plugin_registers_before_the_terms_are_checked(tmp_path, monkeypatch):
    (tmp_path / "at_test_ce_twice.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from at.method import TermType, register_term
        register_term(TermType("ce_twice", lambda step, term: 2 * F.cross_entropy(step.student_logits, step.labels)))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    method = {"terms": [{"type": "ce_twice"}]}
    with pytest.raises(ValueError, match="unknown term type 'ce_twice'"):
        validate_method(method)
    try:
        assert term_names({"plugins": ["at_test_ce_twice"], **method}) == ["ce_twice"]
    finally:
        TERM_TYPES.unregister("ce_twice")
        sys.modules.pop("at_test_ce_twice", None)
