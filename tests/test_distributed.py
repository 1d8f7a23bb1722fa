"""Data-parallel runs, what needs no second process: the rank slices of the data stream (in-memory
CIFAR and an image folder), the rendezvous read from torchrun's and SLURM's environments, the
SLURM job a data-parallel cohort asks for, and the errors for layouts that cannot work. The
real processes (torchrun, gloo) are in tests/test_distributed_processes.py."""

from __future__ import annotations

import json

import copy
import shutil
from pathlib import Path

import pytest
import torch

from at import distributed, grid
from at.data import datasets, sources
from at.data.datasets import training_data
from at.data.stream import DataStream, check_shared_stream
from at.spec import RunSpec
from at.train import Options, train_cohort
from test_cohort import make_spec   # noqa: the spec builder of the training tests
from test_datasets import _imagenet_folder   # noqa: a tiny ImageNet-layout folder

CPU = torch.device("cpu")


def _epoch(stream: DataStream, start_step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(stream.batches(start_step))


def _ranks_epochs(data, seed: int, batch_size: int, world: int, epochs: int = 2):
    """Each rank's batches over ``epochs`` epochs, read the way the loop reads them (a stream
    of its own per rank, as each process holds one)."""
    streams = [DataStream(data, seed, batch_size, CPU, rank, world) for rank in range(world)]
    out = []
    for _ in range(epochs):
        per_rank = []
        for stream in streams:
            stream.start_epoch()
            per_rank.append(_epoch(stream))
        out.append(per_rank)
    return out, streams


def _assert_union_is_the_one_process_batch(data, seed: int, batch_size: int, world: int) -> None:
    one = DataStream(data, seed, batch_size, CPU)
    ranks, streams = _ranks_epochs(data, seed, batch_size, world)
    for per_rank in ranks:
        one.start_epoch()
        whole = _epoch(one)
        assert all(len(batches) == len(whole) for batches in per_rank)
        for step, (x, y) in enumerate(whole):
            slices = [batches[step] for batches in per_rank]
            sizes = [len(s[1]) for s in slices]
            assert sizes == [hi - lo for lo, hi in (distributed.bounds(len(y), r, world) for r in range(world))]
            assert torch.equal(torch.cat([s[0] for s in slices]), x), f"step {step}: the ranks' images differ"
            assert torch.equal(torch.cat([s[1] for s in slices]), y)
    # every rank's generator stands where the one-process run's does: their resume states agree
    assert all(torch.equal(s.generator.get_state(), one.generator.get_state()) for s in streams)


@pytest.mark.parametrize("world", [2, 3])
def test_cifar_ranks_together_read_the_one_process_batch_bit_for_bit(cifar_mini_dir, world):
    # 100 images in batches of 12: the last batch (4 images) splits unevenly over 3 ranks
    spec = RunSpec.resolve(make_spec(Path("unused"), cifar_mini_dir, "wrn-10-1", "baseline", train_subset=100,
                                     batch_size=12, augment="crop_flip"))
    _assert_union_is_the_one_process_batch(training_data(spec, CPU), seed=5, batch_size=12, world=world)


@pytest.fixture
def folder_data(params, tmp_path):
    with_folder = copy.deepcopy(params)
    folder = _imagenet_folder(tmp_path / "imagenet")
    with_folder["data"]["imagenet"]["folder"] = str(folder)
    with_folder["profiles"]["imagenet_only"] = {"tables": ["imagenet"]}
    spec = grid.run_spec(with_folder, "imagenet/resnet18/baseline/seed0", "imagenet_only")
    return spec, folder


def test_image_folder_ranks_together_read_the_one_process_batch_whatever_the_workers(folder_data):
    spec, _ = folder_data
    record = datasets.get("imagenet")
    one_worker = sources.FolderData(spec, record, CPU, workers=0)
    _assert_union_is_the_one_process_batch(one_worker, seed=1, batch_size=4, world=2)
    # the augmentation of an image depends on its position in the epoch, not on who decodes it
    two_workers = sources.FolderData(spec, record, CPU, workers=2)
    a, b = DataStream(one_worker, 1, 4, CPU), DataStream(two_workers, 1, 4, CPU)
    a.start_epoch(), b.start_epoch()
    for (xa, ya), (xb, yb) in zip(_epoch(a), _epoch(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # resumed mid-epoch from a saved state, the epoch goes on with the same images and views
    a.start_epoch()
    saved = a.state(mid_epoch=True)
    rest = _epoch(a, start_step=1)
    b.restore(saved)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(rest, _epoch(b, start_step=1), strict=True))


def test_a_rank_never_decodes_an_image_it_does_not_train_on(folder_data):
    spec, folder = folder_data
    record = datasets.get("imagenet")
    data = sources.FolderData(spec, record, CPU, workers=0)
    rank0 = DataStream(data, 3, 4, CPU, rank=0, world_size=2)
    rank0.start_epoch()
    order = rank0.perm.tolist()
    # break every image that only rank 1 trains on this epoch: rank 0 must not notice
    theirs = [order[s + i] for s in range(0, len(order), 4)
              for i in range(*distributed.bounds(len(order[s:s + 4]), 1, 2))]
    for index in theirs:
        _image_path(data, index).write_bytes(b"not an image")
    mine = _epoch(rank0)
    assert sum(len(y) for _, y in mine) == len(order) - len(theirs)
    rank1 = DataStream(data, 3, 4, CPU, rank=1, world_size=2)
    rank1.start_epoch()
    with pytest.raises(Exception, match="cannot identify image file"):
        _epoch(rank1)


def _image_path(data, index: int) -> Path:
    import os

    return Path(os.fsdecode(data.train_set._paths[index]))


# ---------------------------------------------------------------------------------------------
# Rendezvous


def test_rendezvous_from_torchrun_variables():
    ranks = distributed.from_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                          "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.master_addr, ranks.master_port,
            ranks.launcher) == (3, 8, 1, "node7", 29400, "torchrun")
    assert not ranks.is_main and ranks.enabled
    assert distributed.from_environment({}) is distributed.SINGLE


def test_rendezvous_from_an_srun_step():
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[007-010,012],cpu1"}
    ranks = distributed.from_environment(env)
    # the step's task count, not the job's; rank 0 on the first host of the compressed list
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.master_addr, ranks.launcher) == \
        (5, 8, 1, "gpu007", "srun")
    assert ranks.master_port == distributed.SLURM_PORT_BASE + 123456 % distributed.SLURM_PORT_SPAN == 15456
    # a port the user set wins; a one-task step (the plugin's `srun -n1`) is one process
    assert distributed.from_environment({**env, "MASTER_PORT": "40000"}).master_port == 40000
    assert distributed.from_environment({**env, "SLURM_STEP_NUM_TASKS": "1"}) is distributed.SINGLE
    # the batch script of a job of 8 tasks (no srun step) is one process: the one that starts them
    batch = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert distributed.from_environment(batch) is distributed.SINGLE
    assert distributed.from_environment({**batch, "SLURM_STEP_ID": "4294967291"}) is distributed.SINGLE


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("node1,node2", "node1"), ("n[3-4]", "n3"), ("gpu[07,09]", "gpu07"),
    ("rack1-n[12-14]-ib,x", "rack1-n12-ib"), ("a[1-2],b[3-4]", "a1"),
])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert distributed.first_host(nodelist) == first


def test_a_run_on_n_processes_starts_them_with_srun_in_a_job_and_torchrun_elsewhere():
    # the command's arguments travel in the environment: torchrun's parser would take --run and
    # --log for abbreviations of its --run-path and --log-dir (tests/test_distributed_processes.py
    # starts real ranks with them)
    argv = ["train", "--run", "r/seed0", "--log", "logs/x.log"]
    srun, passed = distributed.launch_command(8, argv, {"SLURM_JOB_ID": "7"}, python="py")
    assert srun == ["srun", "--ntasks=8", "--kill-on-bad-exit=1", "py", "-m", "at.rank"]
    assert json.loads(passed[distributed.RANK_ARGV]) == argv
    local, passed = distributed.launch_command(2, argv, {}, python="py")
    # torchrun through its own entry (at.launch: a failed rank is one line)
    assert local == ["py", "-m", "at.launch", "--standalone", "--nproc-per-node=2", "-m", "at.rank"]
    assert json.loads(passed[distributed.RANK_ARGV]) == argv
    # what torchrun's own parser makes of that command: nothing of ours
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(local[3:])
    assert (parsed.module, parsed.training_script, parsed.training_script_args) == (True, "at.rank", [])


@pytest.mark.parametrize("n, world, slices", [
    (8, 2, [(0, 4), (4, 8)]), (5, 2, [(0, 3), (3, 5)]), (4, 3, [(0, 2), (2, 3), (3, 4)]),
])
def test_a_batch_splits_into_contiguous_slices_in_rank_order(n, world, slices):
    assert [distributed.bounds(n, r, world) for r in range(world)] == slices


def test_ranks_draw_their_own_dropout_masks():
    def masks(state):
        torch.set_rng_state(state["torch"])
        return torch.nn.functional.dropout(torch.ones(1000), 0.5).nonzero().flatten()

    with torch.random.fork_rng(devices=[]):
        rank1, rank2 = (masks(distributed.rank_rng_state(7, r, CPU)) for r in (1, 2))
        again = masks(distributed.rank_rng_state(7, 1, CPU))
        torch.manual_seed(7)
        rank0 = masks({"torch": torch.get_rng_state()})
    assert torch.equal(rank1, again), "a rank's stream is a function of the seed and the rank"
    assert not torch.equal(rank0, rank1) and not torch.equal(rank1, rank2)


@pytest.mark.parametrize("n, world", [(16, 2), (93, 2), (10, 4), (7, 3)])
def test_weighted_rank_losses_average_to_the_batch_mean(n, world):
    # DDP averages the ranks' gradients; with the weights, the average of the ranks' weighted
    # slice means is the mean over the whole batch, even when the slices differ in size
    losses = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    weighted = [distributed.loss_weight(n, r, world) * losses[slice(*distributed.bounds(n, r, world))].mean()
                for r in range(world)]
    assert float(sum(weighted) / world) == pytest.approx(float(losses.mean()), rel=1e-12)
    if n % world == 0:
        assert all(distributed.loss_weight(n, r, world) == 1.0 for r in range(world))


# ---------------------------------------------------------------------------------------------
# The SLURM job of a data-parallel cohort


def test_slurm_resources_follow_the_processes_of_a_table(params):
    params = copy.deepcopy(params)
    params["profiles"]["ci"]["resources"] = {"gpu": 1, "cpus_per_task": 6, "mem_mb": 30000, "runtime": 120}
    (one,) = [c for c in grid.cohorts(params, "ci") if c.level == 1][:1]
    assert grid.job_resources(params, "ci", one) == {"gpu": 1, "cpus_per_task": 6, "mem_mb": 30000, "runtime": 120,
                                                     "threads": 6}
    for protocol in params["protocols"].values():
        protocol["processes"] = 8
    cohorts = grid.cohorts(params, "ci")
    assert {c.processes for c in cohorts} == {8}
    # 8 tasks of one GPU each: --gpus=8 --ntasks=8 --ntasks-per-gpu=1 --cpus-per-task=6 --mem=240000
    assert grid.job_resources(params, "ci", cohorts[0]) == {
        "gpu": 8, "tasks": 8, "tasks_per_gpu": 1, "cpus_per_task": 6, "mem_mb": 240000, "runtime": 120,
        "mpi": "srun", "threads": 48}


def test_the_snakefile_gives_each_cohort_job_its_resources(params, tmp_path):
    """The training rules' resources as Snakemake itself reads them from the workflow (a dry
    run of the ci grid with its protocol on 2 processes): what the SLURM plugin turns into
    sbatch flags."""
    import re
    import subprocess
    import sys

    import yaml

    from at import snakemake_log

    params = copy.deepcopy(params)
    params["protocols"]["cifar"]["processes"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(Path(__file__).resolve().parents[1] / "references.yaml", tmp_path / "references.yaml")
    snakefile = Path(__file__).resolve().parents[1] / "workflow" / "Snakefile"
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "-n", "--cores", "4",
                           "--forceall", "--config", "profile=ci", "params=params.yaml"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = snakemake_log.unfold(done.stdout)   # the Snakefile folds long lines (at.snakemake_log)
    jobs = re.findall(r"rule (train_\w+):.*?threads: (\d+)\n\s+resources: ([^\n]+)", plan, re.S)
    assert len(jobs) == 2, plan[-3000:]
    for _, threads, resources in jobs:
        values = dict(item.split("=", 1) for item in resources.split(", "))
        # the ci profile's resources (gpu 1, 1 CPU, 2000 MB) are per process
        assert (threads, values["gpu"], values["tasks"], values["tasks_per_gpu"], values["cpus_per_task"],
                values["mem_mb"], values["mpi"]) == ("2", "2", "2", "1", "1", "4000", "srun"), resources


# ---------------------------------------------------------------------------------------------
# Layouts that cannot work, refused in one line


def test_a_batch_that_does_not_split_over_the_processes_is_refused(cifar_mini_dir):
    with pytest.raises(ValueError, match="batch_size 30 does not split over 4 processes"):
        distributed.check_layout("r", 30, 300, 4)
    with pytest.raises(ValueError, match="last batch of an epoch has 1 image"):
        distributed.check_layout("r", 16, 33, 2)
    distributed.check_layout("r", 16, 34, 2)


def test_a_run_asking_for_two_processes_started_as_one_says_how_to_start_it(cifar_mini_dir, tmp_path):
    spec = make_spec(tmp_path / "two", cifar_mini_dir, "wrn-10-1", "baseline", processes=2)
    with pytest.raises(ValueError, match=r"asks for 2 process\(es\).*torchrun --nproc-per-node 2"):
        train_cohort([spec], Options(device="cpu", progress=False, tracking=False))
    assert not (tmp_path / "two").exists(), "nothing may be left behind"


def test_runs_on_different_numbers_of_processes_are_not_one_cohort(cifar_mini_dir, tmp_path):
    specs = [RunSpec.resolve(make_spec(tmp_path / n, cifar_mini_dir, "wrn-10-1", "baseline", processes=p))
             for n, p in (("a", 1), ("b", 2))]
    with pytest.raises(ValueError, match="1 and 2 processes"):
        check_shared_stream(specs)


def test_nccl_without_cuda_is_refused_before_any_process_group():
    ranks = distributed.Ranks(rank=0, world_size=2)
    with pytest.raises(ValueError, match="--backend nccl needs CUDA devices"):
        ranks.start(CPU, "nccl")
    import torch.distributed as dist
    assert not dist.is_initialized()


def test_the_throughput_benchmark_writes_its_report(tmp_path):
    """benchmarks/ddp_throughput.py end to end on its one-process row (the N-process rows start
    torchrun, as tests/test_distributed_processes.py does)."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ddp_throughput.py"
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(script), "--processes", "1", "--steps", "2", "--warmup", "1",
                           "--batch", "16", "--dataset-size", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert (row["processes"], row["steps"], row["batch"], row["loss_finite"]) == (1, 2, 16, True)
    assert row["images_per_s"] == pytest.approx(16 * 2 / row["seconds"])
    assert report["speedup_over_one_process"] == {"1": 1.0}
    bad = subprocess.run([sys.executable, str(script), "--processes", "3", "--batch", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must split evenly" in bad.stderr
