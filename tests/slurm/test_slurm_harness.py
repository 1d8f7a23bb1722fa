"""The SLURM profile (slurm/config.yaml) against a real local SLURM cluster.

Each test writes a throwaway Snakefile into tmp_path and runs it exactly as a user would,
`snakemake --cores 8 --profile slurm`, through the repository's profile file, then checks with
`sacct` what SLURM really ran. Opt-in (AT_TEST_SLURM=1, root): see conftest.py.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text).lstrip())


def parse_fields(line: str) -> dict[str, str]:
    """`KEY=value KEY=value` -> dict (values without spaces)."""
    return dict(item.split("=", 1) for item in line.split())


def snakemake_output(workdir: Path) -> str:
    return (workdir / "snakemake.out").read_text()[-6000:]


def assert_ok(rc: int, out: str) -> None:
    assert rc == 0, f"snakemake exited {rc}; last output:\n{out[-6000:]}"


def test_gpu_rule_runs_as_a_slurm_job_with_one_gpu(slurm_cluster, tmp_path):
    write(tmp_path / "Snakefile", """
        rule all:
            input: "out/gpu.txt"

        rule gpu:
            output: "out/gpu.txt"
            resources: gpu=1, runtime=5, mem_mb=200, cpus_per_task=1
            shell: "echo CVD=${{CUDA_VISIBLE_DEVICES:-unset}} JOB=$SLURM_JOB_ID PART=$SLURM_JOB_PARTITION > {output}"
    """)
    rc, out = slurm_cluster.run_snakemake(tmp_path)
    assert_ok(rc, out)

    seen = parse_fields((tmp_path / "out/gpu.txt").read_text())
    # SLURM sets CUDA_VISIBLE_DEVICES only for a real GRES allocation.
    assert re.fullmatch(r"\d+", seen["CVD"]), seen
    assert re.fullmatch(r"\d+", seen["JOB"]), seen
    # the partition came from AT_SLURM_PARTITION through the profile
    assert seen["PART"] == slurm_cluster.partition

    (job,) = slurm_cluster.sacct([seen["JOB"]], "JobID,State,AllocTRES,Partition")
    assert job["State"] == "COMPLETED", job
    assert "gres/gpu=1" in job["AllocTRES"].split(","), job


def test_sigterm_then_retry_resumes_from_an_undeclared_file(slurm_cluster, tmp_path):
    """What a preempted/time-limited training job sees, and what survives to the retry.

    `scancel --signal=TERM` signals every process of the job's steps (inner Snakemake, the
    rule's shell and its children) like a time limit or `sbatch --signal` does. The shell saves
    a resume file and exits non-zero; the job ends FAILED and the profile's `retries` resubmits
    it. Declared outputs of the failed attempt are deleted by Snakemake, an undeclared file next
    to them survives. (A plain `scancel` is not used: the job then ends "CANCELLED by <uid>",
    which snakemake-executor-plugin-slurm 2.8.0 does not recognise, and Snakemake waits forever.)
    """
    write(tmp_path / "Snakefile", r"""
        rule all:
            input: "run/done.txt"

        rule train:
            output: done="run/done.txt", ckpt="run/checkpoint.pt"
            resources: gpu=1, runtime=5, mem_mb=200, cpus_per_task=1,
                       attempt=lambda wildcards, attempt: attempt
            shell:
                '''
                if [ -e run/resume.txt ]; then
                    ckpt=absent; [ -e {output.ckpt} ] && ckpt=present
                    echo "attempt={resources.attempt} job=$SLURM_JOB_ID ckpt_at_start=$ckpt" \
                         "resumed=$(cat run/resume.txt)" > {output.done}
                    echo final > {output.ckpt}
                    exit 0
                fi
                echo partial > {output.ckpt}
                trap 'echo "attempt{resources.attempt}-job$SLURM_JOB_ID" > run/resume.txt; exit 3' TERM
                echo $SLURM_JOB_ID > started.txt
                sleep 300 &
                wait $!
                '''
    """)
    proc = slurm_cluster.snakemake(tmp_path, timeout_s=240)
    try:
        started = tmp_path / "started.txt"
        deadline = time.monotonic() + 120
        while not (started.exists() and started.read_text().strip()):
            assert proc.poll() is None, f"snakemake ended early:\n{snakemake_output(tmp_path)}"
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        first_job = started.read_text().strip()
        subprocess.run(["scancel", "--signal=TERM", first_job], check=True, timeout=30)
        proc.wait(timeout=270)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_ok(proc.returncode, snakemake_output(tmp_path))

    seen = parse_fields((tmp_path / "run/done.txt").read_text())
    assert seen["attempt"] == "2", seen
    assert seen["resumed"] == f"attempt1-job{first_job}", seen
    assert seen["ckpt_at_start"] == "absent", seen
    assert seen["job"] != first_job

    first, second = slurm_cluster.sacct([first_job, seen["job"]], "JobID,State")
    assert first["State"] == "FAILED", first
    assert second["State"] == "COMPLETED", second


def test_group_of_gpu_jobs_runs_in_one_job_on_one_gpu(slurm_cluster, tmp_path):
    """Packing: 3 grouped gpu=1 jobs -> one SLURM job, 1 GPU, time limit = sum of runtimes.

    The profile caps `gpu` at 1 per submitted job (resource scope "local"); without that cap
    Snakemake requests the sum (--gpus=3) and only the longest runtime. The members run one
    after another (the plugin starts the in-job Snakemake with --jobs 1); this test pins that
    down so a plugin upgrade that changes it is noticed.
    """
    write(tmp_path / "Snakefile", """
        rule all:
            input: expand("out/run{i}.txt", i=[1, 2, 3])

        rule train:
            output: "out/run{i}.txt"
            group: "pack"
            resources: gpu=1, runtime=2, mem_mb=200, cpus_per_task=1
            shell:
                "start=$(date +%s.%N); sleep 1; "
                "echo JOB=$SLURM_JOB_ID CVD=${{CUDA_VISIBLE_DEVICES:-unset}} "
                "START=$start END=$(date +%s.%N) > {output}"
    """)
    rc, out = slurm_cluster.run_snakemake(tmp_path, "--group-components", "pack=3")
    assert_ok(rc, out)

    runs = [parse_fields((tmp_path / f"out/run{i}.txt").read_text()) for i in (1, 2, 3)]
    assert {r["JOB"] for r in runs} == {runs[0]["JOB"]}, runs
    assert all(re.fullmatch(r"\d+", r["CVD"]) for r in runs), runs
    spans = sorted((float(r["START"]), float(r["END"])) for r in runs)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans

    (job,) = slurm_cluster.sacct([runs[0]["JOB"]], "JobID,State,AllocTRES,Timelimit")
    assert job["State"] == "COMPLETED", job
    assert "gres/gpu=1" in job["AllocTRES"].split(","), job
    assert job["Timelimit"] == "00:06:00", job
