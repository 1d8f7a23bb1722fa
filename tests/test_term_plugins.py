"""A term type defined outside the package trains real runs, registered in-process through
`at.method.register_term`; a method's `plugins` list is checked and imported before its terms.
(A fresh `python -m at train --cohort` process importing a method's plugins, end to end from
params.yaml: tests/test_extensions.py.)"""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from at.method import TERM_TYPES, TermType, register_term, resolve_method, validate_method
from at.train import Options, train

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = {"epochs": 1, "batch_size": 64, "lr": 0.1, "lr_drops": [], "lr_gamma": 0.2, "momentum": 0.9,
            "nesterov": False, "weight_decay": 5e-4, "reset_momentum_at_drops": True, "augment": "crop_flip",
            "train_subset": 128, "test_subset": 128}


def term_names(spec) -> list[str]:
    """The keys of StepResult.terms for a method, in spec order."""
    return [term.name for term in resolve_method(spec)]


def _spec(out: Path, data_dir: Path, method_name: str, method: dict, teacher_checkpoint: Path | None = None) -> dict:
    return {"id": method_name, "dataset": "cifar10", "data_dir": str(data_dir), "student": "wrn-10-1",
            "weights": None, "teacher": "wrn-10-2" if teacher_checkpoint else None, "teacher_weights": None,
            "teacher_checkpoint": str(teacher_checkpoint) if teacher_checkpoint else None,
            "method_name": method_name, "method": method, "seed": 0, "out_dir": str(out),
            "num_classes": 10, "protocol": PROTOCOL, "profile": "test"}


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def teacher_checkpoint(teacher) -> Path:
    """The session's trained teacher (conftest)."""
    return teacher


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
                                                               logit_l1, mlflow_store):
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
