"""at.spec: one resolved run spec, every default filled in once, read by every layer."""

from __future__ import annotations

import copy
import json

import pytest

from at import checkpoint, grid, resume, schema
from at.errors import ParamsError
from at.spec import Protocol, RunSpec

RUN = "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"


def minimal(**changes) -> dict:
    """A spec with only the keys that have no default."""
    spec = {"id": "r", "dataset": "cifar10", "student": "wrn-10-1", "method_name": "baseline",
            "method": {"terms": [{"type": "ce"}]}, "seed": 0, "out_dir": "runs/r",
            "protocol": {"epochs": 2, "batch_size": 32, "lr": 0.1, "lr_gamma": 0.2}}
    spec.update(changes)
    return spec


def written_out() -> dict:
    """The same spec with every default written out by hand (not by the code under test)."""
    return minimal(data_dir="data/cifar10", weights=None, teacher=None, teacher_weights=None,
                   teacher_checkpoint=None, num_classes=10, profile="custom", plugins=[],
                   method={"terms": [{"type": "ce", "name": "ce", "beta": 1.0, "schedule": "constant"}]},
                   protocol={"epochs": 2, "batch_size": 32, "lr": 0.1, "lr_gamma": 0.2, "lr_drops": [],
                             "eval_batch_size": 512, "momentum": 0.9, "nesterov": False,
                             "weight_decay": 0.0005, "reset_momentum_at_drops": True, "train_subset": None,
                             "test_subset": None, "augment": "crop_flip", "bn_weight_init": "uniform",
                             "precision": "auto"})


def test_leaving_a_default_out_and_writing_it_out_give_the_same_spec_and_stream():
    short, full = RunSpec.resolve(minimal()), RunSpec.resolve(written_out())
    assert short == full
    assert short.stream_key == full.stream_key
    assert short.to_dict() == RunSpec.resolve(short.to_dict()).to_dict(), "the JSON form resolves to itself"
    # each default, written out with another value, is a different spec
    assert RunSpec.resolve(minimal(protocol={**minimal()["protocol"], "augment": "flip"})).stream_key \
        != short.stream_key
    assert RunSpec.resolve(minimal(protocol={**minimal()["protocol"], "momentum": 0.5})) != short


def test_every_protocol_default_is_declared_once_in_the_schema():
    # the dataclass and the schema name the same keys; the required ones are those without a default
    assert set(Protocol.__dataclass_fields__) == schema.PROTOCOL_KEYS
    assert set(schema.PROTOCOL_REQUIRED) == {"epochs", "batch_size", "lr", "lr_gamma"}
    resolved = Protocol.resolve({"epochs": 1, "batch_size": 1, "lr": 1, "lr_gamma": 0.5})
    for key, default in schema.PROTOCOL_DEFAULTS.items():
        value = getattr(resolved, key)
        assert (list(value) if isinstance(value, tuple) else value) == default, key


def test_a_protocol_that_leaves_augment_out_shares_the_cohort_of_one_that_writes_it(real_params):
    """The grid: two protocols differing only in a written-out default give the same specs and cohorts."""
    params = copy.deepcopy(real_params)
    before = {c.id: c.runs for c in grid.cohorts(params, "ci")}
    specs_before = {r.id: grid.run_spec(params, r) for r in grid.runs(params, "ci")}
    del params["protocols"]["cifar"]["augment"]
    del params["protocols"]["cifar"]["momentum"]
    assert {c.id: c.runs for c in grid.cohorts(params, "ci")} == before
    assert {r.id: grid.run_spec(params, r) for r in grid.runs(params, "ci")} == specs_before


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"student": "wrn-15-1"}, "run r.student: unknown model name 'wrn-15-1' (depth D=15"),
    ({"dataset": "mnist"}, "run r.dataset: unknown data set 'mnist'"),
    ({"seed": -1}, "run r.seed: must be a non-negative integer"),
    ({"weights": "imagenet"}, "model 'wrn-10-1' has no pretrained weights"),
    ({"method": {"terms": [{"type": "at"}]}}, "needs a teacher, but none is given"),
    ({"method": {"terms": [{"type": "magic"}]}}, "unknown term type 'magic'"),
    ({"protocol": {"epochs": 2, "batch_size": 32, "lr": 0.1}}, "'lr_gamma' is missing"),
    ({"protocol": {"epochs": 2, "batch_size": 32, "lr": 0.1, "lr_gamma": 0.2, "augment": "imagenet"}},
     "does not support augment 'imagenet'"),
    ({"plugins": ["no_such_module_anywhere"]}, "plugin 'no_such_module_anywhere' could not be imported"),
])
def test_a_bad_spec_is_refused_in_one_line_naming_the_run_and_the_key(change, message):
    with pytest.raises(ParamsError) as info:
        RunSpec.resolve(minimal(**change))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_spec_serialises_to_json_and_back(real_params):
    spec = grid.run_spec(real_params, RUN, "paper")
    text = json.dumps(spec.to_dict(), sort_keys=True)
    assert RunSpec.resolve(json.loads(text)) == spec
    assert spec.protocol.lr_drops == (59, 119, 159) and spec.to_dict()["protocol"]["lr_drops"] == [59, 119, 159]
    assert spec.replace(seed=1).seed == 1 and spec.replace(seed=1).id == spec.id
    with pytest.raises(ParamsError, match="batch_size: must be a positive integer"):
        spec.protocol.replace(batch_size=0)


def test_a_state_saved_by_earlier_code_with_defaults_left_out_still_resumes(tmp_path):
    """Resume states and checkpoints written before the spec was resolved hold specs with
    defaults left out: they are the same spec, so the run resumes instead of restarting."""
    spec = RunSpec.resolve(minimal(out_dir=str(tmp_path)))
    earlier = minimal(out_dir=str(tmp_path), data_dir="data/cifar10")   # as the old grid wrote it
    checkpoint.save({"spec": earlier, "model": {}, "epoch": 1, "teacher_sha256": None, "precision": "float32"},
                    tmp_path / "last.pt")
    saved = resume.Saved.read(spec, force=False)
    assert saved.precision == "float32"
    assert saved.situation(None) == "resume"
    other = RunSpec.resolve(minimal(out_dir=str(tmp_path), seed=3))
    assert resume.Saved.read(other, force=False).situation(None) == "fresh"   # another spec: discarded


def test_a_run_from_arguments_takes_what_they_leave_out_from_params_yaml(real_params, tmp_path):
    """`python -m at train --student S --out DIR` has no defaults of its own: the data set and
    the seed are params.yaml's first, the protocol the data set's usual one, the method baseline
    (what the command line gave before, written out there as cifar10, cifar, 0 and baseline)."""
    from argparse import Namespace

    from at.__main__ import _spec_from_args

    left_out = dict.fromkeys(["dataset", "protocol", "seed", "method", "epochs", "batch_size", "lr", "lr_drops",
                              "train_subset", "test_subset", "augment", "teacher_checkpoint", "id", "data_dir"])
    spec = _spec_from_args(Namespace(student="wrn-10-1", out=str(tmp_path / "run"), **left_out), real_params)
    assert (spec.dataset, spec.seed, spec.method_name) == ("cifar10", 0, "baseline")
    assert spec.protocol == Protocol.resolve(real_params["protocols"]["cifar"])
