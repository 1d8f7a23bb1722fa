"""params.yaml's schema: every type and range gap closed, errors naming the file, the key path
and the allowed values; the lead's new keys (cohort, precision) accepted."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from at import grid, schema
from at import params as params_io
from at.params import ParamsError
from in_process import run_cli

REPO = Path(__file__).resolve().parents[1]



def _schema_error(params: dict, source: str = "params.yaml") -> str:
    with pytest.raises(ParamsError) as info:
        schema.check(params, source)
    return str(info.value)


def test_the_real_params_yaml_fits_the_schema(params):
    schema.check(params)


@pytest.mark.parametrize("key, value, expect", [
    ("nesterov", "yes", "true or false"),
    ("reset_momentum_at_drops", 1, "true or false"),
    ("weight_decay", -1, "a non-negative number"),
    ("weight_decay", "5e-4", "a non-negative number"),     # YAML reads 5e-4 without a dot as a string
    ("momentum", "high", "a number in [0, 1)"),
    ("momentum", 1.0, "a number in [0, 1)"),
    ("lr", math.nan, "a positive (finite) number"),
    ("lr", math.inf, "a positive (finite) number"),
    ("lr", 0, "a positive (finite) number"),
    ("lr_gamma", -0.2, "a positive (finite) number"),
    ("epochs", True, "a positive integer"),
    ("epochs", 2.5, "a positive integer"),
    ("batch_size", 0, "a positive integer"),
    ("train_subset", 0, "a positive integer or null"),
])
def test_protocol_values_of_the_wrong_type_or_range_name_the_key_and_what_is_allowed(params, key, value, expect):
    params["protocols"]["cifar_flip"][key] = value
    message = _schema_error(params)
    assert message.startswith(f"params.yaml: protocols.cifar_flip.{key}"), message
    assert f"must be {expect}, got {value!r}" in message


def test_a_bad_list_item_is_named_by_its_index(params):
    params["protocols"]["cifar"]["lr_drops"] = [60, 0]
    assert _schema_error(params) == "params.yaml: protocols.cifar.lr_drops.1: must be a positive integer, got 0"


@pytest.mark.parametrize("key, value, allowed", [
    ("augment", "crop", "crop_flip, flip, none, imagenet"),
    ("bn_weight_init", "zeros", "uniform, ones"),
    ("precision", "fp16", "auto, float32, bf16"),
])
def test_protocol_choices_list_the_allowed_values(params, key, value, allowed):
    params["protocols"]["cifar"][key] = value
    assert _schema_error(params) == f"params.yaml: protocols.cifar.{key}: unknown value {value!r}; allowed: {allowed}"


def test_nan_and_booleans_from_real_yaml_text_are_refused(tmp_path):
    """The YAML spellings themselves (.nan, true), read by the same loader as params.yaml."""
    text = (REPO / "params.yaml").read_text()
    for old, new, key in (("    lr: 0.1\n", "    lr: .nan\n", "protocols.cifar.lr"),
                          ("    epochs: 200\n", "    epochs: true\n", "protocols.cifar.epochs")):
        bad = tmp_path / "other-params.yaml"
        bad.write_text(text.replace(old, new, 1))
        with pytest.raises(ParamsError) as info:
            params_io.load(bad)
        assert str(info.value).startswith(f"{bad}: {key}: must be"), info.value


def test_unknown_keys_are_listed_with_the_allowed_ones(params):
    params["protocols"]["cifar"]["warmup"] = 5
    message = _schema_error(params)
    assert message.startswith("params.yaml: protocols.cifar: unknown key(s) ['warmup']; allowed: ")
    assert "bn_weight_init" in message and "weight_decay" in message
    params = copy.deepcopy(params)
    del params["protocols"]["cifar"]["warmup"]
    params["tables"]["table1"]["rows"]["wrn-16-1_from_wrn-16-2"]["studnet"] = "wrn-16-1"
    assert _schema_error(params).startswith(
        "params.yaml: tables.table1.rows.wrn-16-1_from_wrn-16-2: unknown key(s) ['studnet']; allowed: ")


@pytest.mark.parametrize("where, value, fragment", [
    (("profiles", "smoke", "resources", "mem_mb"), -1, "profiles.smoke.resources.mem_mb: must be a non-negative integer"),
    (("profiles", "smoke", "seeds"), [], "profiles.smoke.seeds: must be a non-empty list"),
    (("profiles", "smoke", "protocol", "nesterov"), "no", "profiles.smoke.protocol.nesterov: must be true or false"),
    (("data", "cifar10", "num_classes"), 0, "data.cifar10.num_classes: must be a positive integer"),
    (("data", "cifar10", "md5"), "C58F", "data.cifar10.md5: must be 32 lowercase hex digits or null"),
    (("tables", "table4", "weights"), "places365", "tables.table4.weights: unknown value 'places365'; allowed: null, imagenet"),
    (("tables", "imagenet", "columns", "top5", "metric"), "top3", "allowed: top1, top5"),
    (("seeds",), [0, -1], "seeds.1: must be a non-negative integer"),
])
def test_profiles_resources_data_and_tables_are_checked(params, where, value, fragment):
    node = params
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    message = _schema_error(params)
    assert fragment in message and message.startswith("params.yaml: "), message


def test_cohort_and_precision_are_accepted_and_checked(params):
    params["cohort"] = {"max_size": 8}
    params["profiles"]["smoke"]["protocol"]["precision"] = "bf16"
    params["protocols"]["cifar"]["precision"] = "auto"
    schema.check(params)
    grid.validate(params)
    params["cohort"]["max_size"] = 0
    assert "cohort.max_size: must be a positive integer, got 0" in _schema_error(params)


def test_errors_name_the_file_they_come_from(params, tmp_path):
    """Both kinds: a schema error and a cross-reference error (unknown method in a cell)."""
    other = tmp_path / "experiment.yaml"
    params["protocols"]["cifar"]["nesterov"] = "yes"
    other.write_text(yaml.safe_dump(params))
    done = run_cli(["--params", str(other), "runs", "--profile", "ci"], cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {other}: protocols.cifar.nesterov: must be true or false, "
                                   f"got 'yes'"), done.stderr
    params["protocols"]["cifar"]["nesterov"] = False
    params["tables"]["table2"]["rows"]["sum-p1"]["method"] = "at-sum-p3"
    other.write_text(yaml.safe_dump(params))
    done = run_cli(["--params", str(other), "runs", "--profile", "ci"], cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {other}: tables.table2 cell (sum-p1, error).method"), done.stderr
    assert "params.yaml" not in done.stderr


def test_train_with_another_params_file_is_checked_too(params, tmp_path, monkeypatch):
    other = tmp_path / "experiment.yaml"
    params["protocols"]["cifar"]["momentum"] = "high"
    other.write_text(yaml.safe_dump(params))
    run = "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    done = run_cli(["--params", str(other), "train", "--run", run, "--profile", "ci"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {other}: protocols.cifar.momentum: must be a number in [0, 1), got 'high'"
    assert not (tmp_path / "runs").exists()


def test_a_run_spec_with_a_bad_protocol_stops_before_training(tmp_path, monkeypatch):
    spec = {"id": "x", "dataset": "cifar10", "data_dir": str(tmp_path / "nowhere"), "student": "wrn-10-1",
            "teacher": None, "method_name": "baseline", "method": {"terms": [{"type": "ce"}]}, "seed": 0,
            "out_dir": str(tmp_path / "x"), "num_classes": 10, "profile": "custom",
            "protocol": {"epochs": 1, "batch_size": 8, "lr": 0.1, "lr_gamma": 0.2, "nesterov": "yes"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    done = run_cli(["--params", str(REPO / "params.yaml"), "train", "--spec", str(path)], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: run x: protocol.nesterov: must be true or false, got 'yes'"


def test_bn_weight_init_reaches_the_run_spec(params):
    """params.yaml's choice (the authors' uniform init) is part of every CIFAR run's spec, which
    the trainer passes to models.build; a profile can override it."""
    run = "cifar10/wrn-16-1_from_wrn-16-2/at-sum-p2/seed0"
    assert grid.run_spec(params, run, "paper").protocol.bn_weight_init == "uniform"
    params["profiles"]["ci"]["protocol"]["bn_weight_init"] = "ones"
    grid.validate(params)
    assert grid.run_spec(params, run, "ci").protocol.bn_weight_init == "ones"
