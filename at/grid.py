"""params.yaml -> the runs of the experiment, with ids, output folders and dependencies.

The Snakefile, dvc.yaml and the report all take their runs from here, so a run, a path or a
hyperparameter is spelled in params.yaml and nowhere else; what a run computes is its
:class:`at.spec.RunSpec` (:func:`run_spec`), resolved once. A run is a pure function of its
spec: the same params give the same ids and paths (docs/interfaces.md).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from at import models, names, schema, sweep as sweeps
from at.choices import Trained, names as names_of
from at.data import datasets as data_sets
from at.errors import ParamsError, shown
from at.method import BASELINE_METHOD, requires_teacher
from at.params import method as resolve_method
from at.schema import CELL_DEFAULTS
from at.spec import Protocol, RunSpec, default_data_dir

RUNS_ROOT = "runs"
RESULTS_ROOT = "results"
CELL_KEYS = frozenset(schema.CELL_PROPERTIES)
ROW_KEYS = frozenset(schema.ROW_SCHEMA["properties"])   # a row may also sweep a key of its method (at.sweep)


@dataclass(frozen=True)
class Cell:
    """A table cell that a run fills, and the metric the cell reports."""

    table: str
    row: str
    column: str
    metric: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GridRun:
    """One run of a profile's grid: what it computes as params.yaml spells it (the names its
    spec is resolved from, :func:`run_spec`), and what the grid adds to it: its id, folder,
    teacher run and the table cells it fills. Every layer after the grid (Snakemake, DVC, the
    records, the report) reads these fields; `python -m at runs --json` prints :meth:`to_dict`."""

    id: str
    profile: str
    dataset: str
    protocol_name: str
    student: str
    weights: str | None
    teacher: str | None
    teacher_weights: str | None
    teacher_run: str | None       # the id of the run that trains its teacher (None: no such run)
    method_name: str              # as run ids spell it (a sweep's value included)
    method: dict = field(hash=False)   # the method's terms as params.yaml writes them (a sweep's value set)
    method_base: str              # the params.yaml method a sweep's run changes (at.sweep); its own name otherwise
    seed: int
    out_dir: str
    cells: tuple[Cell, ...]       # sorted by (table, row, column); none for a teacher outside the tables

    def to_dict(self) -> dict:
        """The run as JSON (`python -m at runs --json`)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["method"] = copy.deepcopy(self.method)
        values["cells"] = [cell.to_dict() for cell in self.cells]
        return values


@dataclass(frozen=True)
class Cohort:
    """Runs of a profile that train together in one process (:func:`cohorts` says which): a
    training job of Snakemake and a stage of DVC. `python -m at runs --cohorts --json` prints
    :meth:`to_dict`."""

    id: str
    profile: str
    level: int                    # 0: its runs teach others; 1: they learn from level 0's
    seed: int
    runs: tuple[str, ...]         # its members' run ids
    teacher_runs: tuple[str, ...]   # the runs whose checkpoints its members learn from, sorted
    dataset: str
    processes: int                # the processes each run of it trains on (protocol key; one value per protocol)

    def to_dict(self) -> dict:
        """The cohort as JSON (`python -m at runs --cohorts --json`)."""
        return {**dataclasses.asdict(self), "runs": list(self.runs), "teacher_runs": list(self.teacher_runs)}


def _fail(key: str, problem: str, allowed=None) -> ParamsError:
    message = f"{key}: {problem}"
    if allowed is not None:
        message += f"; allowed: {', '.join(map(str, sorted(allowed, key=str)))}"
    return ParamsError(message)


def profile_name(params: dict, profile: str | None) -> str:
    """The profile to use: the one asked for, else params.yaml's default_profile."""
    profiles = params.get("profiles") or {}
    if profile:
        if profile not in profiles:
            # asked for on the command line (--profile, or --config profile=... for Snakemake)
            raise ParamsError(f"profile {profile!r} is not defined in params.yaml (key profiles); "
                              f"allowed: {', '.join(sorted(profiles))}")
        return profile
    name = params.get("default_profile", schema.DEFAULT_PROFILE)
    if name not in profiles:
        raise _fail("default_profile", f"unknown profile {name!r}", profiles)
    return name


def _check_keys(key: str, mapping, allowed: set) -> None:
    if not isinstance(mapping, dict):
        raise _fail(key, f"must be a mapping, got {type(mapping).__name__}")
    unknown = set(mapping) - allowed
    if unknown:
        raise _fail(key, f"unknown key(s) {sorted(unknown)}", allowed)


def validate(params: dict, source: str = "params.yaml") -> None:
    """Check params.yaml before any job starts: one clear error naming the file (``source``),
    the key and the allowed values. The structure and types are at.schema's; what follows are
    the references between parts, which a schema cannot see."""
    schema.check(params, source)
    try:
        _validate_references(params)
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}") from None


def _validate_references(params: dict) -> None:
    data, protocols, methods = params.get("data") or {}, params.get("protocols") or {}, params.get("methods") or {}
    tables, profiles = params.get("tables") or {}, params.get("profiles") or {}
    for name, source in data.items():
        data_sets.check_source(name, source)
    for name in methods:
        resolve_method(params, name)
    profile_name(params, None)
    for name, profile in profiles.items():
        profile = profile or {}
        for table in list(profile.get("tables", [])) + list(profile.get("not_run", {})):
            if table not in tables:
                raise _fail(f"profiles.{name}.tables", f"unknown table {table!r}", tables)
        for table, rows in (profile.get("rows") or {}).items():
            if table not in tables:
                raise _fail(f"profiles.{name}.rows", f"unknown table {table!r}", tables)
            for row in rows:
                if row not in (tables[table].get("rows") or {}):
                    raise _fail(f"profiles.{name}.rows.{table}", f"unknown row {row!r}", tables[table]["rows"])
    for table_name, table in tables.items():
        for row in table.get("rows") or {}:
            for column in table.get("columns") or {}:
                cell = _cell(params, table_name, row, column)
                _check_augment(f"tables.{table_name} cell ({row}, {column})", cell["dataset"],
                               protocols[cell["protocol"]])
        for row in table.get("rows") or {}:
            # a sweep's rows are named by the key and values: the same in every column
            added = {column: [r for r, _ in cells_of(params, table_name, row, column)]
                     for column in table.get("columns") or {}}
            if len({tuple(rows) for rows in added.values()}) > 1:
                raise _fail(f"tables.{table_name}.rows.{row}.sweep",
                            "the key names a different term in different columns: write term.key "
                            f"(rows per column: {added})")
        for model in table.get("teachers") or []:
            if not models.is_known(model):
                raise _fail(f"tables.{table_name}.teachers", f"unknown model {model!r}; allowed: "
                            f"{models.allowed_forms()}")
            for k in ("dataset", "protocol"):
                if k not in table:
                    raise _fail(f"tables.{table_name}", f"`teachers` needs the table's {k}")
    for profile in profiles:
        # listing every run checks that each student's teacher is trained by the grid; resolving
        # its spec checks the run as the trainer will read it (a profile's protocol included)
        for run in runs(params, profile):
            try:
                run_spec(params, run)
            except ParamsError as e:
                raise ParamsError(f"profiles.{profile}, {e}") from None


def _check_augment(key: str, dataset: str, protocol: dict) -> None:
    try:
        data_sets.check_augment(dataset, Protocol.resolve(protocol, key).augment)
    except ParamsError as e:
        raise _fail(key, str(e)) from None


def _cell(params: dict, table_name: str, row: str, column: str) -> dict:
    """The merged definition of one cell, checked: {dataset, protocol, model, teacher, ...}."""
    table = params["tables"][table_name]
    key = f"tables.{table_name} cell ({row}, {column})"
    for part, where, allowed in ((table["rows"][row], f"tables.{table_name}.rows.{row}", ROW_KEYS),
                                 (table["columns"][column], f"tables.{table_name}.columns.{column}", CELL_KEYS)):
        _check_keys(where, part or {}, allowed)
    cell = {k: v for k, v in table.items() if k in CELL_KEYS}
    cell.update({k: v for k, v in (table["rows"][row] or {}).items() if k in CELL_KEYS})
    cell.update(table["columns"][column] or {})
    data, protocols, methods = params.get("data") or {}, params.get("protocols") or {}, params.get("methods") or {}
    for k in ("dataset", "protocol", "student", "method"):
        if k not in cell:
            raise _fail(key, f"no {k} given (in the table, the row or the column)")
    if cell["dataset"] not in data:
        raise _fail(f"{key}.dataset", f"unknown data set {cell['dataset']!r}", data)
    if cell["protocol"] not in protocols:
        raise _fail(f"{key}.protocol", f"unknown protocol {cell['protocol']!r}", protocols)
    if cell["method"] not in methods:
        raise _fail(f"{key}.method", f"unknown method {cell['method']!r}", methods)
    cell = {**CELL_DEFAULTS, **cell}
    if cell["train"] not in names_of(Trained):
        raise _fail(f"{key}.train", f"unknown value {cell['train']!r}", names_of(Trained))
    for k, weights in (("student", "weights"), ("teacher", "teacher_weights")):
        if k in cell:
            try:
                models.check(cell[k], cell[weights])
            except ValueError as e:
                raise _fail(f"{key}.{k}", str(e)) from None
    if cell["train"] == Trained.TEACHER:
        if "teacher" not in cell:
            raise _fail(key, "train: teacher, but no teacher model is given")
        trained, teacher = cell["teacher"], None
    else:
        trained = cell["student"]
        needs_teacher = requires_teacher(methods[cell["method"]])
        teacher = cell.get("teacher") if needs_teacher else None
        if needs_teacher and teacher is None:
            raise _fail(key, f"method {cell['method']!r} needs a teacher, but none is given")
    return {"dataset": cell["dataset"], "protocol": cell["protocol"], "model": trained,
            "weights": cell["weights"], "teacher": teacher,
            "teacher_weights": cell["teacher_weights"] if teacher else None,
            "method": cell["method"], "method_spec": methods[cell["method"]],
            "metric": cell["metric"]}


def row_sweep(params: dict, table_name: str, row: str, column: str) -> sweeps.Sweep | None:
    """The sweep a row declares (at.sweep), resolved against the method of its cell in
    ``column``; None where the row sweeps nothing."""
    declared = (params["tables"][table_name]["rows"][row] or {}).get("sweep")
    if declared is None:
        return None
    cell = _cell(params, table_name, row, column)
    try:
        return sweeps.resolve(f"tables.{table_name}.rows.{row}.sweep", row, cell["method"],
                              cell["method_spec"], declared)
    except ValueError as e:
        raise ParamsError(str(e)) from None


def table_rows(params: dict, table_name: str, rows: list[str]) -> list[str]:
    """``rows`` of a table with, after each row that sweeps, the rows its values add
    (sum-p4, sum-p4/beta=100, sum-p4/beta=300, ...): the rows of the table's report."""
    table = params["tables"][table_name]
    out = []
    for row in rows:
        out.append(row)
        found = row_sweep(params, table_name, row, next(iter(table["columns"])))
        if found is not None:
            out += [found.row_of(value) for value in found.values]
    return out


def cells_of(params: dict, table_name: str, row: str, column: str) -> list[tuple[str, dict]]:
    """(row, cell) of one declared row in one column: the row's own cell, then one per value of
    its sweep, whose method is the swept one (``method`` its name in run ids, ``method_spec``
    its terms, ``method_base`` the params.yaml method it changes)."""
    cell = _cell(params, table_name, row, column)
    found = row_sweep(params, table_name, row, column)
    out = [(row, {**cell, "method_base": cell["method"]})]
    for value in found.values if found is not None else ():
        out.append((found.row_of(value), {
            **cell, "method": found.method_name_of(cell["method_spec"], value),
            "method_spec": found.method(cell["method_spec"], value),
            "method_base": found.method_name}))
    return out


def _segment(dataset: str, protocol: str) -> str:
    # the data set alone when it runs under its usual protocol, else both: ids stay short and unique
    return dataset if data_sets.usual_protocol(dataset) == protocol else f"{dataset}-{protocol}"


def _model_segment(model: str, weights) -> str:
    return f"{model}-pretrained" if weights else model


def run_id(dataset, protocol, model, weights, teacher, teacher_weights, method, seed) -> str:
    who = _model_segment(model, weights)
    if teacher:
        who += "_from_" + _model_segment(teacher, teacher_weights or weights)
    return f"{_segment(dataset, protocol)}/{who}/{method}/seed{seed}"


def _tables_of(params: dict, profile: str) -> list[str]:
    selected = (params["profiles"][profile] or {}).get("tables")
    tables = list(params.get("tables") or {}) if selected is None else list(selected)
    return [t for t in tables if t not in not_run(params, profile)]


def rows_of(params: dict, profile: str, table: str) -> list[str]:
    """The rows of ``table`` that the profile runs: all, or those its `rows` key lists."""
    rows = list(params["tables"][table].get("rows") or {})
    selected = ((params["profiles"][profile] or {}).get("rows") or {}).get(table)
    return rows if selected is None else [r for r in rows if r in selected]


def not_run(params: dict, profile: str) -> dict[str, str]:
    """Tables the profile does not run, with the reason (the report shows it)."""
    prof = params["profiles"][profile] or {}
    reasons = dict(prof.get("not_run") or {})
    selected = prof.get("tables")
    for table in params.get("tables") or {}:
        if selected is not None and table not in selected and table not in reasons:
            reasons[table] = f"not part of the {profile} profile"
    for name, table in (params.get("tables") or {}).items():
        datasets = {table.get("dataset")} | {c.get("dataset") for c in (table.get("columns") or {}).values()}
        for d in sorted(d for d in datasets if d in data_sets.DATASETS and data_sets.get(d).user_folder):
            if not ((params.get("data") or {}).get(d) or {}).get("folder") and name not in reasons:
                reasons[name] = f"no {data_sets.get(d).title} folder given (set data.{d}.folder in params.yaml)"
    return reasons


def runs(params: dict, profile: str | None = None) -> list[GridRun]:
    """Every run of the profile's grid, each once, sorted by id, teachers included."""
    profile = profile_name(params, profile)
    prof = params["profiles"][profile] or {}
    found: dict[str, GridRun] = {}
    cells: dict[str, list[Cell]] = {}

    def add(cell: dict, seed: int) -> GridRun:
        rid = run_id(cell["dataset"], cell["protocol"], cell["model"], cell["weights"],
                     cell["teacher"], cell["teacher_weights"], cell["method"], seed)
        if rid not in found:
            found[rid] = GridRun(
                id=rid, profile=profile, dataset=cell["dataset"], protocol_name=cell["protocol"],
                student=cell["model"], weights=cell["weights"], teacher=cell["teacher"],
                teacher_weights=cell["teacher_weights"], teacher_run=None,
                method_name=cell["method"], method=copy.deepcopy(cell["method_spec"]),
                method_base=cell["method_base"], seed=seed,
                out_dir=names.inside(RUNS_ROOT, f"{RUNS_ROOT}/{profile}/{rid}"), cells=())
            cells[rid] = []
        return found[rid]

    for table in _tables_of(params, profile):
        spec = params["tables"][table]
        seeds = prof.get("seeds") or spec.get("seeds") or params["seeds"]
        for declared in rows_of(params, profile, table):
            for column in spec["columns"]:
                for row, cell in cells_of(params, table, declared, column):
                    for seed in seeds:
                        run = add(cell, seed)
                        cells[run.id].append(Cell(table=table, row=row, column=column, metric=cell["metric"]))

    # every student's teacher must be a run that some cell of the grid trains
    trained_anywhere = _all_trained_cells(params)
    for run in list(found.values()):
        if run.teacher is None or run.teacher_weights:
            continue  # no teacher, or a pretrained one used as it is (ImageNet): no teacher run
        teacher_cell = {"dataset": run.dataset, "protocol": run.protocol_name, "model": run.teacher,
                        "weights": run.weights, "teacher": None, "teacher_weights": None,
                        "method": BASELINE_METHOD, "method_spec": params["methods"][BASELINE_METHOD],
                        "method_base": BASELINE_METHOD,
                        "metric": CELL_DEFAULTS["metric"]}
        key = (run.dataset, run.protocol_name, run.teacher, run.weights)
        if key not in trained_anywhere:
            cell = cells[run.id][0]
            trained = sorted(m for d, p, m, w in trained_anywhere
                             if (d, p, w) == (run.dataset, run.protocol_name, run.weights))
            raise _fail(f"tables.{cell.table} cell ({cell.row}, {cell.column}).teacher",
                        f"teacher {run.teacher!r} of run {run.id} is not trained by any cell of the "
                        f"grid (as a baseline on {run.dataset} with protocol {run.protocol_name}); "
                        f"add a cell with `train: teacher` for it, or pick a trained one",
                        trained or ["(none trained for this data set and protocol)"])
        found[run.id] = dataclasses.replace(run, teacher_run=add(teacher_cell, run.seed).id)
    return [dataclasses.replace(found[k], cells=tuple(sorted(cells[k], key=lambda c: (c.table, c.row, c.column))))
            for k in sorted(found)]


def _all_trained_cells(params: dict) -> set[tuple]:
    trained = set()
    for table, spec in (params.get("tables") or {}).items():
        for row in spec.get("rows") or {}:
            for column in spec.get("columns") or {}:
                cell = _cell(params, table, row, column)
                if cell["teacher"] is None and cell["method"] == BASELINE_METHOD:
                    trained.add((cell["dataset"], cell["protocol"], cell["model"], cell["weights"]))
        for model in spec.get("teachers") or []:
            trained.add((spec["dataset"], spec["protocol"], model, spec.get("weights")))
    return trained


def _one(by_id: dict, wanted: str, what: str, params: dict, profile: str | None, lister: str):
    if wanted not in by_id:
        raise ParamsError(f"{what} {wanted!r} is not in the {profile_name(params, profile)} profile's grid "
                          f"(`{lister}` lists them)")
    return by_id[wanted]


def find(params: dict, run: str, profile: str | None = None) -> GridRun:
    return _one({r.id: r for r in runs(params, profile)}, run, "run", params, profile, "python -m at runs --profile ...")


def teacher_runs(runs_: list[GridRun]) -> set[str]:
    return {r.teacher_run for r in runs_ if r.teacher_run}


def cohort_max_size(params: dict) -> int:
    return int((params.get("cohort") or {}).get("max_size", schema.COHORT_DEFAULTS["max_size"]))


def cohorts(params: dict, profile: str | None = None) -> list[Cohort]:
    """The runs of the profile grouped into cohorts: the jobs of Snakemake and the stages of DVC.

    A cohort is a set of runs that share a data stream (data set, protocol, seed: at.data.stream)
    and of which none needs another's output. Teachers are trained first: a run that some other
    run learns from is in a cohort of level 0, every other run in level 1 (teachers are always
    baselines, so no chain is longer). Within a level, runs are grouped by student model (members
    of similar cost; a model's runs from one teacher stay together, so that teacher's forward runs
    once per batch for all of them), and a group larger than params.yaml's `cohort.max_size` is
    split. Cohort ids read like `cifar10/wrn-16-1/seed0/cohort0`; each run is in exactly one.
    """
    profile = profile_name(params, profile)
    selected = runs(params, profile)
    teachers = teacher_runs(selected)
    limit = cohort_max_size(params)
    groups: dict[tuple, list[GridRun]] = {}
    for run in selected:
        level = 0 if run.id in teachers else 1
        segment = _segment(run.dataset, run.protocol_name)
        key = (segment, _model_segment(run.student, run.weights), run.seed, level)
        groups.setdefault(key, []).append(run)
    found: list[Cohort] = []
    counters: dict[tuple, int] = {}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3])):
        segment, model, seed, level = key
        members = sorted(groups[key], key=lambda r: (r.teacher_run or "", r.id))
        for start in range(0, len(members), limit):
            n = counters.get(key[:3], 0)
            counters[key[:3]] = n + 1
            chunk = members[start:start + limit]
            found.append(Cohort(
                id=f"{segment}/{model}/seed{seed}/cohort{n}", profile=profile, level=level, seed=seed,
                runs=tuple(r.id for r in chunk),
                teacher_runs=tuple(sorted({r.teacher_run for r in chunk if r.teacher_run})),
                dataset=chunk[0].dataset, processes=protocol_of(params, chunk[0]).processes))
    return sorted(found, key=lambda c: c.id)


def cohort_rule_name(cohort_id: str) -> str:
    """The Snakemake rule of a cohort (rule names are identifiers): train_cifar10_wrn_16_1_seed0_cohort0."""
    return "train_" + re.sub(r"\W", "_", cohort_id)


def find_cohort(params: dict, cohort: str, profile: str | None = None) -> Cohort:
    return _one({c.id: c for c in cohorts(params, profile)}, cohort, "cohort", params, profile,
                "python -m at runs --cohorts --profile ...")


def protocol_of(params: dict, run: GridRun) -> Protocol:
    """A run's protocol: its params.yaml protocol, the profile's overrides on top, resolved."""
    protocol = copy.deepcopy(params["protocols"][run.protocol_name])
    protocol.update((params["profiles"][run.profile] or {}).get("protocol") or {})
    return Protocol.resolve(protocol, f"protocols.{run.protocol_name} (profile {run.profile})")


def resources_of(params: dict, profile: str) -> dict:
    prof = params["profiles"][profile] or {}
    return dict(prof.get("resources") or (params.get("resources") or {}).get("train") or {})


def job_resources(params: dict, profile: str, cohort: dict) -> dict:
    """The Snakemake resources (SLURM flags through the profile) of one cohort's training job.

    params.yaml's resources are those of one process. A cohort whose protocol asks for N > 1
    processes (``processes``, at.distributed) is one SLURM job of N tasks, one GPU each:
    ``tasks`` N, ``gpu`` N times the per-process GPUs, ``mem_mb`` N times, ``cpus_per_task`` as
    given; ``tasks_per_gpu`` 1 (the plugin would otherwise ask ``--ntasks-per-gpu=N``) and
    ``mpi`` set, which makes the SLURM plugin run the job's command in the batch script itself
    instead of inside a one-task ``srun`` step, so that `python -m at train` can start its N
    tasks with ``srun`` (at.distributed.launch_command). ``threads``: every process's CPUs, what
    a local Snakemake counts against ``--cores``."""
    base = {**schema.RESOURCE_DEFAULTS, **resources_of(params, profile)}
    processes = cohort.processes
    out = dict(base, threads=base["cpus_per_task"] * processes)
    if processes > 1:
        out.update(gpu=base["gpu"] * processes, mem_mb=base["mem_mb"] * processes, tasks=processes, mpi="srun",
                   tasks_per_gpu=1 if base["gpu"] == 1 else 0)
    return out


def has_nvidia_device() -> bool:
    """Whether this machine has an NVIDIA GPU (its driver's control device), read without torch:
    a local job's resources claim a GPU only where there is one (the Snakefile)."""
    return Path("/dev/nvidiactl").exists()


def data_dir(dataset: str, params: dict | None = None) -> str:
    """The folder a data set is read from: data/<name>, or for a data set the user supplies as a
    folder (ImageNet) the folder params.yaml names in data.<name>.folder (needs ``params``)."""
    if params is not None and data_sets.get(dataset).user_folder:
        folder = ((params.get("data") or {}).get(dataset) or {}).get("folder")
        if not folder:
            raise ParamsError(f"params.yaml: data.{dataset}.folder: {dataset} is read from a folder you "
                              f"supply; set it to the folder (with train/ and val/ inside)")
        return str(folder)
    return default_data_dir(dataset)


def needs_download(params: dict, dataset: str) -> bool:
    """Whether `python -m at download <dataset>` prepares the data set (False: a user's folder)."""
    return not data_sets.get(dataset).user_folder


def teacher_checkpoint(params: dict, run: GridRun) -> str | None:
    if not run.teacher_run:
        return None
    return f"{RUNS_ROOT}/{run.profile}/{run.teacher_run}/checkpoint.pt"


def run_spec(params: dict, run: str | GridRun, profile: str | None = None) -> RunSpec:
    """The resolved spec that `python -m at train` runs (docs/interfaces.md)."""
    r = find(params, run, profile) if isinstance(run, str) else run
    return RunSpec.resolve({
        "id": r.id, "dataset": r.dataset, "data_dir": data_dir(r.dataset, params),
        "student": r.student, "weights": r.weights,
        "teacher": r.teacher, "teacher_weights": r.teacher_weights,
        "teacher_checkpoint": teacher_checkpoint(params, r),
        "method_name": r.method_name, "method": r.method,
        "seed": r.seed, "out_dir": r.out_dir,
        "num_classes": params["data"][r.dataset]["num_classes"],
        "protocol": protocol_of(params, r).to_dict(), "profile": r.profile,
        "plugins": params.get("plugins") or [],
    })


def outputs(run: GridRun) -> dict[str, str]:
    out = Path(run.out_dir)
    return {"checkpoint": str(out / "checkpoint.pt"), "metrics": str(out / "metrics.json"),
            "history": str(out / "history.csv")}


def seed_selection(params: dict, profile: str, asked) -> list[int] | None:
    """The seeds a partial run of the profile trains (Snakemake's ``--config seeds=1`` or
    ``seeds=0,2``, the main command's ``AT_SEEDS``), or None for all of them. A profile too long
    for one sitting is run seed by seed: each seed is a teacher with all of its students, the
    pairs a paired difference needs, so every part adds whole pairs to the report."""
    if asked is None or asked == "":
        return None
    items = asked if isinstance(asked, (list, tuple)) else str(asked).replace(" ", "").split(",")
    try:
        chosen = sorted({int(item) for item in items})
    except (TypeError, ValueError):
        raise ParamsError(f"seeds: expected seed numbers such as 1 or 0,2, got {shown(asked)}") from None
    available = sorted({cohort.seed for cohort in cohorts(params, profile)})
    unknown = [seed for seed in chosen if seed not in available]
    if unknown:
        raise ParamsError(f"seeds: profile {profile!r} has no seed {', '.join(map(str, unknown))}; "
                          f"its seeds: {', '.join(map(str, available))}")
    return chosen


def seed_outputs(params: dict, profile: str, seeds: list[int]) -> list[str]:
    """Every file the runs of these seeds write: a partial run's Snakemake targets."""
    return sorted(path for run in runs(params, profile) if run.seed in seeds for path in outputs(run).values())


def report_inputs(params: dict, profile: str) -> list[str]:
    """What `python -m at report` reads: every run's files and the data (provenance, attention maps).

    The Snakefile's report rule and dvc.yaml's report stage both take their inputs from here.
    """
    selected = runs(params, profile)
    files = [path for run in selected for path in outputs(run).values()]
    # the published numbers the tables are rendered beside: a corrected reference re-renders
    references = ["references.yaml"]
    return sorted(files) + [data_dir(d, params) for d in sorted({r.dataset for r in selected})] + references


def datasets(params: dict, profile: str | None = None) -> list[str]:
    return sorted({r.dataset for r in runs(params, profile)})


def report_dir(profile: str) -> str:
    return names.inside(RESULTS_ROOT, f"{RESULTS_ROOT}/{profile}")
