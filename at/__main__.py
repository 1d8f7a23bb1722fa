"""Command line of attention-transfer: ``python -m at COMMAND``, run from the repository root.

params.yaml defines the experiment; a profile of it (--profile P: paper, the full grid, by default;
smoke, mini, ...) chooses the grid of runs. What the commands write:

  data/<dataset>/             the prepared data, and source.json (where it came from)
  runs/<P>/<run id>/          each run's checkpoints, metrics.json, history.csv
  results/<P>/                tables and figures; results/runs/<P>/: the runs' records behind them
  mlruns.db, mlartifacts/     the MLflow store (or MLFLOW_TRACKING_URI)
  pipelines/<P>/dvc.yaml      the DVC pipelines

The usual way to run a whole profile is Snakemake (`snakemake --cores 8 --config profile=P`) or
`make pipeline` (README.md); `python -m at COMMAND --help` says what each command does."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path


from at import params as params_mod


def _spec_from_args(args, params: dict):
    """A run from plain arguments; what they leave out is params.yaml's (its first data set, its
    first seed), the data set's record's (its usual protocol) or the baseline method."""
    from at import grid
    from at.data import datasets
    from at.method import BASELINE_METHOD, Method
    from at.spec import RunSpec

    dataset = args.dataset or next(iter(params["data"]))
    protocol = params_mod.protocol(params, args.protocol or datasets.get(dataset).protocol)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "train_subset": args.train_subset, "test_subset": args.test_subset,
                 "augment": args.augment}
    protocol.update({k: v for k, v in overrides.items() if v is not None})
    if args.lr_drops is not None:
        protocol["lr_drops"] = [int(d) for d in args.lr_drops.split(",") if d]
    teacher = None
    method_name = args.method or BASELINE_METHOD
    method = Method.resolve(params_mod.method(params, method_name))
    if args.teacher_checkpoint:
        from at import checkpoint
        if method.needs_teacher:
            teacher = checkpoint.load(args.teacher_checkpoint)["spec"]["student"]
    out = Path(args.out)
    source = params_mod.data_source(params, dataset)
    return RunSpec.resolve({
        "id": args.id or out.as_posix(),
        "dataset": dataset,
        "data_dir": args.data_dir or grid.data_dir(dataset, params),
        "student": args.student,
        "teacher": teacher,
        "teacher_checkpoint": args.teacher_checkpoint,
        "method_name": method_name,
        "method": method,
        "seed": params["seeds"][0] if args.seed is None else args.seed,
        "out_dir": out.as_posix(),
        "num_classes": source["num_classes"],
        "protocol": protocol,
        "plugins": params.get("plugins") or [],
    })


def _train_specs(args) -> list:
    """The runs that `train` trains: a cohort of the grid, one run of the grid, a spec file
    (one spec, or a list of specs sharing a data stream), or one run from plain arguments."""
    from at import grid

    if args.cohort or args.run:
        params, profile = _validated(args)
        if args.cohort:
            cohort = grid.find_cohort(params, args.cohort, profile)
            return [grid.run_spec(params, run_id, profile) for run_id in cohort.runs]
        return [grid.run_spec(params, args.run, profile)]
    if args.spec:
        from at.spec import RunSpec

        from at import yaml_file

        try:
            loaded = yaml_file.load(args.spec)
        except yaml_file.Refused as e:
            raise ValueError(f"{args.spec}: {e}") from None
        return [RunSpec.resolve(s) for s in (loaded if isinstance(loaded, list) else [loaded])]
    if not args.student or not args.out:
        raise ValueError("train needs --cohort ID, --run ID, --spec FILE, or --student and --out")
    spec = _spec_from_args(args, params_mod.load(args.params))
    if args.teacher_checkpoint and not spec.teacher:
        raise ValueError(f"--teacher-checkpoint given, but method {spec.method_name!r} uses no teacher: "
                         f"drop it or choose a method that distils (--method)")
    return [spec]


def _warn_about(specs: list) -> None:
    for spec in specs:
        if spec.dataset.startswith("cifar") and spec.student.startswith("resnet"):
            print(f"warning: run {spec.id}: {spec.student} is an ImageNet architecture (stride-2 stem "
                  f"and max-pool): on 32x32 CIFAR images its last stage sees 1x1 maps", file=sys.stderr)


def cmd_train(args) -> int:
    from at.start import Options
    from at.train import Interrupted, TrainingDiverged, train_cohort

    from at import console, distributed

    if args.log and not distributed.from_environment().enabled:
        # a rank of a data-parallel run inherits its launcher's output, the log already
        console.log_to(args.log)
    specs = _train_specs(args)
    _warn_about(specs)
    _start_processes(specs, args)
    # an option left out is Options's default
    given = {k: getattr(args, k) for k in ("device", "precision", "threads", "backend", "layout", "compile")}
    options = Options(progress=not args.no_progress, **{k: v for k, v in given.items() if v is not None})
    try:
        train_cohort(specs, options, force=args.force)
    except Interrupted as e:
        ranks = distributed.from_environment()
        if ranks.enabled:   # each rank says so: a launcher may report a rank it stopped itself
            print(f"rank {ranks.rank} of {ranks.world_size}: stopped by {e.signal_name}, position saved by "
                  f"rank 0; exiting {e.status}", file=sys.stderr, flush=True)
        return e.status
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except distributed.RankLost as e:   # not bad input (2): a process of the run was lost
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _start_processes(specs: list, args) -> None:
    """A run that asks for N > 1 processes (protocol.processes), started as one process by the
    command line: this process becomes their launcher (srun in a SLURM job, torchrun elsewhere:
    at.distributed.launch_command), each of which runs this same command as one rank. Called
    in-process (``main(argv)``, the tests), it leaves the mismatch to train_cohort's error."""
    import os

    from at import distributed

    processes = specs[0].protocol.processes if specs else 1
    if processes == 1 or args.argv is None or distributed.from_environment().enabled:
        return
    command, passed = distributed.launch_command(processes, args.argv)
    print(f"{specs[0].id}: {processes} processes: {' '.join(command)} (each: python -m at {' '.join(args.argv)})",
          flush=True)
    os.environ.update(passed)
    os.execvp(command[0], command)


def cmd_download(args) -> int:
    from at.data.download import DownloadError

    try:
        return _download(args)
    except DownloadError as e:  # an OSError (network, missing path): one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def _download(args) -> int:
    from at import grid
    from at.data import datasets

    from at.data.download import remember_source

    params = params_mod.load(args.params)
    dataset = datasets.get(args.dataset)
    if not grid.needs_download(params, args.dataset):
        source = params_mod.data_source(params, args.dataset)
        raise params_mod.ParamsError(
            f"{dataset.title} is not downloaded: it is read from the folder set in data.{args.dataset}.folder "
            f"({source.get('folder') or 'not set'}); downloadable: "
            f"{', '.join(n for n, d in sorted(datasets.DATASETS.items()) if not d.user_folder)}")
    root = Path(args.root or grid.data_dir(args.dataset, params))
    source = params_mod.data_source(params, args.dataset, root)
    datasets.check_source(args.dataset, source)
    # a progress bar only for a person watching: in a log it is a screen of carriage returns
    where = dataset.prepare(root, source, sys.stderr.isatty())
    remember_source(root, params_mod.configured_source(params, args.dataset))
    print(f"{args.dataset} ready in {where}")
    return 0


def _validated(args) -> tuple[dict, str]:
    """params.yaml checked against the schema, and the profile asked for (or the default)."""
    from at import grid

    params = params_mod.load(args.params)
    grid.validate(params, args.params)
    return params, grid.profile_name(params, args.profile)


def cmd_runs(args) -> int:
    from at import grid

    params, profile = _validated(args)
    if args.cohorts:
        cohorts = grid.cohorts(params, profile)
        if args.json:
            print(json.dumps([cohort.to_dict() for cohort in cohorts], indent=2, sort_keys=True))
            return 0
        for cohort in cohorts:
            print("\t".join([cohort.id, str(len(cohort.runs)), ",".join(cohort.runs)]))
        return 0
    runs = grid.runs(params, profile)
    if args.json:
        print(json.dumps([run.to_dict() for run in runs], indent=2, sort_keys=True))
        return 0
    for run in runs:
        tables = ",".join(sorted({f"{c.table}:{c.row}:{c.column}" for c in run.cells})) or "(teacher)"
        print("\t".join([run.id, tables, run.student, run.teacher or "-", run.method_name,
                         str(run.seed), run.out_dir]))
    return 0


def cmd_report(args) -> int:
    """Export the records of the runs finished here (at.records), then render the report from
    the records alone; --records-only renders the committed records without reading runs/ or
    touching MLflow."""
    from at import grid, provenance, records, references, report
    from at.report.layout import grid_tables

    from at import tracking

    params, profile = _validated(args)
    out = Path(args.out or grid.report_dir(profile))
    report.check_replaceable(out)   # before records or MLflow are touched: a wrong --out changes nothing
    if not args.records_only:
        from at import atomic

        atomic.check_writable(records.root(profile), f"the records {records.root(profile)}")
        tracking.check_store()   # before results/ is rewritten: a store that fails leaves it as it was
        exported = records.export(params, profile, attention_run=_attention_run(params, profile))
        print(f"records: {len(exported.written)} written, {len(exported.kept)} kept from earlier, "
              f"{len(exported.removed)} removed (no longer in params.yaml) in {records.root(profile)}")
    runs = records.runs(params, profile)
    context = {"profile": profile, "description": provenance.describe(params, profile, runs),
               "footer": provenance.footer(params, profile, runs),
               "full_scale": provenance.full_scale(params, profile, runs),
               "purpose": (params["profiles"][profile] or {}).get("purpose"),
               "not_run": grid.not_run(params, profile), "tables": grid_tables(params, profile),
               "references": references.load(args.references or references.path_beside(args.params)),
               "data_md5": provenance.data_md5(runs)}
    # each run with its protocol's planned epochs: the report refuses a metrics.json that differs
    planned = [{**run.to_dict(), "epochs": grid.protocol_of(params, run).epochs} for run in runs]
    written = report.render(planned, out, context)
    print(f"report: {len(written)} files in {out}")
    if args.records_only:
        return 0
    parents = tracking.record_cells(profile, _cell_summaries(runs, written), Path(out),
                                    outside_cells=[run.id for run in runs if not run.cells])
    print(f"MLflow: {len(parents)} cell runs and the report in experiment {tracking.experiment_name(profile)!r}")
    return 0


def _attention_run(params: dict, profile: str) -> str | None:
    """The run whose attention maps the report draws: the lowest seed's of Table 1's AT cell."""
    from at import grid
    from at.report.attention_maps import ATTENTION_METHOD, ATTENTION_PAIR

    wanted = ("table1", ATTENTION_PAIR, ATTENTION_METHOD)
    found = sorted((run.seed, run.id) for run in grid.runs(params, profile)
                   if any((c.table, c.row, c.column) == wanted for c in run.cells))
    return found[0][1] if found else None


def _cell_summaries(runs: list, written: list) -> list[dict]:
    """The report's per-cell numbers (its <table>.csv files) with each cell's metric and runs,
    in the form tracking.record_cells takes."""
    import csv

    members: dict[tuple, dict] = {}
    for run in runs:
        for c in run.cells:
            cell = members.setdefault((c.table, c.row, c.column), {"metric": c.metric, "run_ids": []})
            cell["run_ids"].append(run.id)
    summaries = []
    for path in (Path(p) for p in written):
        if path.suffix != ".csv":
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                key = (row["table"], row["row"], row["column"])
                if key not in members:
                    continue   # a cell of the paper that this profile does not run
                summaries.append({"table": key[0], "row": key[1], "column": key[2], **members[key],
                                  "n": int(row["n"]), "mean": float(row["mean"]) if row["mean"] else None,
                                  "std": float(row["std"]) if row["std"] else None})
    return summaries


def cmd_ui(args) -> int:
    """MLflow's UI on the project's store, opened on the profile's runs table."""
    import os

    from at import tracking

    _, profile = _validated(args)
    uri = tracking.tracking_uri()
    served = uri.startswith(("http://", "https://"))
    if not served:
        problem = _cannot_listen(args.host, args.port)
        if problem is not None:
            # MLflow's server would fail to listen there, yet exit 0, and the address printed
            # would open the other program
            if problem.errno == errno.EADDRINUSE:
                print(f"error: port {args.port} on {args.host} is taken ({problem.strerror}): another program "
                      f"listens there; stop it, or choose a free port with --port", file=sys.stderr)
            else:
                print(f"error: cannot listen on {args.host} port {args.port} ({problem.strerror or problem}): "
                      f"choose another --host or --port", file=sys.stderr)
            return 2
    tracking.check_store(uri)
    experiment_id = tracking.init_store(profile)
    base = uri.rstrip("/") if served else f"http://{args.host}:{args.port}"
    print(f"{tracking.experiment_name(profile)}: {tracking.runs_url(base, experiment_id)}", flush=True)
    if served:
        return 0   # a tracking server already serves its UI
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port)]
    # MLflow's job runner (its GenAI jobs) is a second full MLflow process that browsing runs never
    # uses: off unless the user turned it on
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, command)


def _cannot_listen(host: str, port: int) -> OSError | None:
    """Why MLflow's server could not listen on ``host:port`` (None: it can), found by binding
    the port as a server does (SO_REUSEADDR: a port that only lingers after a closed connection
    is free) and letting it go at once."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        return e
    return None


def cmd_dvc(args) -> int:
    from at import atomic, dvc_pipeline

    params, profile = _validated(args)
    profiles = [profile] if args.profile else None
    wanted = dvc_pipeline.files(params, profiles)
    if args.check:
        stale = [str(path) for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
        if stale:
            print(f"error: {', '.join(stale)} not what {args.params} defines: regenerate with "
                  f"`python -m at dvc`", file=sys.stderr)
            return 1
        return 0
    for path, text in wanted.items():
        if path.is_file() and path.read_text() == text:
            continue   # unchanged: not even its mtime moves
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, text)
        print(f"wrote {path}")
    return 0


def cmd_tracking_init(args) -> int:
    from at import tracking
    from at.spec import RUN_DEFAULTS

    profile = args.profile
    if profile != RUN_DEFAULTS["profile"]:  # runs trained from command-line arguments, not the grid
        from at import grid
        profile = grid.profile_name(params_mod.load(args.params), profile)
    tracking.check_store()   # the whole check once, before the jobs fan out
    experiment_id = tracking.init_store(profile)
    print(f"MLflow store {tracking.tracking_uri()} ready, experiment "
          f"{tracking.experiment_name(profile)!r} (id {experiment_id})")
    return 0


def main(argv=None) -> int:
    from at.choices import Backend, Compile, Layout, names
    from at.data.augment import AUGMENTATIONS
    from at.precision import PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m at", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(params_mod.DEFAULT_PATH),
                        help="the experiment definition (default: params.yaml of the current folder)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="download, verify and extract a data set into data/<dataset>",
                       description="Download a data set from params.yaml's source (or AT_<DATASET>_URL and "
                                   "AT_<DATASET>_MD5: a URL, file:// URL or plain path), check its md5 and unpack "
                                   "it into data/<dataset>/, recording the source in source.json. Data already "
                                   "there from the same source is kept; so is data an override brought, in a "
                                   "shell without the variables.")
    p.add_argument("dataset", help="a data set of params.yaml's data section, e.g. cifar10")
    p.add_argument("--root", help="target folder (default: data/<dataset>)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("train", help="train (or resume) a cohort of runs, or one run, into runs/<profile>/",
                       description="Train runs, resume them where they stood, or leave them as they are if they "
                                   "finished with the same spec. Each run writes its folder (runs/<profile>/<run "
                                   "id>/ for --cohort and --run; --out for a run from arguments) and one MLflow "
                                   "run. Exit status: 0 done, 2 bad input (one line), 3 a run's loss diverged, "
                                   "143 stopped by SIGTERM with every position saved (run it again to resume). A "
                                   "protocol with processes: N starts its N ranks itself (torchrun, or srun in a "
                                   "SLURM job).")
    what = p.add_argument_group("what to train: --cohort, --run, --spec, or the arguments below")
    what.add_argument("--cohort", help="a cohort id of the grid (see `python -m at runs --cohorts`)")
    what.add_argument("--run", help="a run id of the grid (see `python -m at runs`), trained alone")
    what.add_argument("--profile", default=None,
                      help="the profile of --cohort/--run (default: params.yaml's default_profile)")
    what.add_argument("--spec", help="a run spec file (JSON or YAML, docs/interfaces.md), or a list of "
                                     "specs sharing a data stream")
    what.add_argument("--student", help="model name, e.g. wrn-16-1")
    what.add_argument("--teacher-checkpoint", help="checkpoint.pt of a trained teacher run")
    what.add_argument("--method", help="a method of params.yaml (default: baseline, a model trained alone)")
    what.add_argument("--out", help="the run's folder, e.g. runs/my-run (a run from arguments)")
    what.add_argument("--id", help="run id (default: the folder)")
    what.add_argument("--dataset", help="a data set of params.yaml's data section (default: the first listed there)")
    what.add_argument("--data-dir", help="the prepared data folder (default: data/<dataset>)")
    what.add_argument("--seed", type=int, help="the run's seed (default: the first of params.yaml's seeds)")
    what.add_argument("--protocol", help="a protocol of params.yaml (default: the data set's usual one, "
                                         "cifar for CIFAR; at.data.datasets)")
    what.add_argument("--epochs", type=int, help="override the protocol's epochs")
    what.add_argument("--batch-size", type=int, help="override the protocol's batch size")
    what.add_argument("--lr", type=float, help="override the protocol's initial learning rate")
    what.add_argument("--lr-drops", help="comma-separated epochs, e.g. 60,120,160")
    what.add_argument("--train-subset", type=int, help="train on the first N training images")
    what.add_argument("--test-subset", type=int, help="test on the first N test images")
    what.add_argument("--augment", choices=list(AUGMENTATIONS))
    how = p.add_argument_group("how to run it")
    how.add_argument("--device", help="auto (the default: CUDA if present), cpu, cuda, cuda:1, ...")
    how.add_argument("--precision", choices=list(PRECISIONS),
                     help="override the protocol's precision (auto: bf16 on CUDA and on CPUs with native "
                          "bf16, else float32)")
    how.add_argument("--layout", choices=names(Layout),
                     help="memory layout of the networks (auto, the default: measured per model on this "
                          "machine and cached in ~/.cache/attention-transfer; a tie keeps channels_last in "
                          "bf16, contiguous in float32)")
    how.add_argument("--compile", choices=names(Compile),
                     help="torch.compile the networks: off, on, reduce-overhead (CUDA graphs, CUDA only), or "
                          "auto (the default): where the measured saving over the run's steps beats the "
                          "compilation (measured per model on this machine, cached)")
    how.add_argument("--force", action="store_true",
                     help="retrain runs that already finished with this spec (default: leave them as they are)")
    how.add_argument("--threads", type=int, help="torch CPU threads (of each process)")
    how.add_argument("--backend", choices=names(Backend),
                     help="torch.distributed backend of a run on several processes (protocol.processes): "
                          "auto (the default: nccl on CUDA, gloo on the CPU)")
    how.add_argument("--no-progress", action="store_true", help="no progress bar")
    how.add_argument("--log", metavar="FILE",
                     help="write all output to FILE; the terminal gets one line per finished epoch of each run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("runs", help="list the runs of a profile's grid (what Snakemake and DVC run)",
                       description="List a profile's runs (id, table cells, student, teacher, method, seed, "
                                   "folder; tab-separated) or its cohorts (the training jobs). Checks params.yaml "
                                   "first; writes nothing.")
    p.add_argument("--profile", help="a profile of params.yaml (default: its default_profile)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cohorts", action="store_true", help="list the cohorts (the training jobs) instead")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("report", help="render the tables and figures of a profile into results/<profile>",
                       description="Copy every finished run's outputs from runs/<profile>/ into its record, "
                                   "results/runs/<profile>/<run id>/, render the tables (Markdown, LaTeX, CSV), "
                                   "figures and a README into results/<profile>/ from the records alone, and add a "
                                   "run per table cell and the report to MLflow. --records-only renders from the "
                                   "committed records without runs/ or MLflow (a clone).")
    p.add_argument("--profile", help="a profile of params.yaml (default: its default_profile)")
    p.add_argument("--references", help="published numbers to compare with (default: references.yaml beside params.yaml)")
    p.add_argument("--records-only", action="store_true",
                   help="render from the committed records (results/runs/<profile>) alone: no export "
                        "from runs/, no MLflow (what a clone without checkpoints can do)")
    p.add_argument("--out", help="render into this folder instead of results/<profile>: it must be empty, new "
                                 "or a report folder written before (the report replaces it whole)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dvc", help="write the DVC pipelines, dvc.yaml and pipelines/<profile>/dvc.yaml (the same DAG as the Snakefile)",
                       description="Write dvc.yaml at the root (the downloads and the default profile: what a bare "
                                   "`dvc repro` runs) and pipelines/<profile>/dvc.yaml for every other profile, from "
                                   "params.yaml; a file that would not change is not touched.")
    p.add_argument("--profile", help="only this profile's pipeline (and the root file's; default: every profile)")
    p.add_argument("--check", action="store_true", help="fail if a file differs from what params.yaml defines")
    p.set_defaults(func=cmd_dvc)

    p = sub.add_parser("ui", help="MLflow's UI on the runs store; prints the address of a profile's runs table",
                       description="Start `mlflow ui` on the project's store (mlruns.db of the current folder, or "
                                   "MLFLOW_TRACKING_URI) and print the address of the profile's runs table, opened "
                                   "on the view that shows the cells and their seeds. With a tracking server in "
                                   "MLFLOW_TRACKING_URI it only prints the address.")
    p.add_argument("--profile", help="a profile of params.yaml (default: its default_profile)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("tracking-init", help="create the MLflow store and experiment before a fan-out",
                       description="Check the MLflow store (mlruns.db, or MLFLOW_TRACKING_URI) and create the "
                                   "profile's experiment, attention-transfer/<profile>; Snakemake's onstart runs it "
                                   "before the training jobs fan out.")
    p.add_argument("--profile", help="grid profile whose experiment to create (default: params.yaml's "
                                     "default_profile; `custom` for runs trained from arguments)")
    p.set_defaults(func=cmd_tracking_init)

    args = parser.parse_args(argv)
    # the command line as given, for a run that starts its own processes (None: called in-process)
    args.argv = None if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C where no run was training (a run stops by itself, saved: at.start.STOP_SIGNALS),
        # or a second one that would not wait for the save
        print("error: interrupted (Ctrl-C): a run keeps what it saved last, the same command resumes it",
              file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # the reader left early (`python -m at runs --profile paper | head`): what it wanted
        # was printed; the rest goes nowhere, quietly, as for any Unix filter (exit 128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as e:
        if not _is_user_error(e):
            raise  # a bug: the traceback is what its fixer needs
        # bad params, checksums, checkpoints, data, an unreachable tracking store: the message
        # names the problem, a traceback would only hide it
        print(f"error: {e}", file=sys.stderr)
        return 2


# Errors that report bad input or an unavailable service, by the module that defines them.
USER_ERRORS = {
    "at.errors": ("ParamsError", "WriteError"),
    "at.run_lock": ("LockError",),
    "at.checkpoint": ("CheckpointError",),
    "at.tracking": ("TrackingError",),
    "at.data.download": ("ChecksumError", "DownloadError", "ArchiveError"),
    "at.data.cifar": ("CifarFormatError",),
    "at.data.folders": ("DataLayoutError",),
    "at.report.inputs": ("ReportInputError",),
    "at.records": ("RecordError",),
}
PACKAGE_DIR = Path(__file__).resolve().parent


def _is_user_error(e: Exception) -> bool:
    """Whether ``e`` is one of our reports of bad input (one line, exit 2) rather than a bug.

    Only modules already imported can have raised their errors, so the check imports nothing.
    A plain ValueError counts when our own code raised it (argument and spec validation, e.g.
    an unknown model name); one raised inside a library (torch, numpy) is a bug.
    """
    known = tuple(getattr(sys.modules[module], name) for module, names in USER_ERRORS.items()
                  if module in sys.modules for name in names)
    if isinstance(e, known + (FileNotFoundError,)):
        return True
    if isinstance(e, ValueError) and e.__traceback__ is not None:
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
    return False


if __name__ == "__main__":
    sys.exit(main())
