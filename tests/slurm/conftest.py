"""A real, throwaway single-node SLURM cluster for the tests in this folder.

Opt-in: the cluster is only started when AT_TEST_SLURM=1 and the tests run as root, because
`cluster.sh up` installs Debian packages, starts system daemons (munged, MariaDB, slurmdbd,
slurmctld, slurmd) and symlinks /etc/slurm/slurm.conf -- things a test must never do on a
machine it does not own. Everywhere else the tests are skipped with the reason.

The `slurm_cluster` fixture owns the cluster for the whole session: it runs `cluster.sh up`
(fresh state) and, whatever happens -- test failure, Ctrl-C, SIGTERM from a CI timeout -- runs
`cluster.sh down`, which stops every daemon the script started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = Path(__file__).resolve().with_name("cluster.sh")
PROFILE_DIR = REPO / "slurm"

# `cluster.sh up` may have to apt-get install the SLURM packages on a bare machine.
UP_TIMEOUT_S = 900
DOWN_TIMEOUT_S = 120


def skip_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None when they can."""
    if os.environ.get("AT_TEST_SLURM") != "1":
        return (
            "real-SLURM tests are opt-in: set AT_TEST_SLURM=1 (as root, on a throwaway Debian "
            "machine) to start a local cluster; they install packages and write /etc/slurm"
        )
    if os.geteuid() != 0:
        return "real-SLURM tests need root (they start munged/slurmctld/slurmd and write /etc/slurm)"
    return None


@dataclass(frozen=True)
class SlurmCluster:
    """What the tests need to know about the running cluster, plus helpers to drive it."""

    prefix: Path
    partition: str
    gpus: int
    cpus: int

    def snakemake(
        self, workdir: Path, *args: str, timeout_s: int = 240, env: dict | None = None
    ) -> subprocess.Popen:
        """Start `snakemake --cores 8 --profile slurm ARGS` in `workdir`, like a user would.

        `workdir/slurm` is made a symlink to the repository's profile, so `--profile slurm`
        resolves exactly as it does from the repository root and the profile is used unchanged.
        The run is wrapped in `timeout -k 10`: with no working status command the plugin waits
        forever and a SIGTERM alone does not stop it.
        """
        link = workdir / "slurm"
        if not link.exists():
            link.symlink_to(PROFILE_DIR, target_is_directory=True)
        cmd = [
            "timeout", "-k", "10", str(timeout_s),
            sys.executable, "-m", "snakemake", "--cores", "8", "--profile", "slurm", *args,
        ]
        # Output goes to a file, not a pipe: a test that polls while the run goes on would
        # otherwise block snakemake once the pipe buffer is full.
        with open(workdir / "snakemake.out", "w") as log:
            return subprocess.Popen(
                cmd, cwd=workdir, env=env if env is not None else self.env(),
                stdout=log, stderr=subprocess.STDOUT, text=True,
            )

    def run_snakemake(self, workdir: Path, *args: str, timeout_s: int = 240) -> tuple[int, str]:
        """Run snakemake to the end; returns (exit status, combined output)."""
        proc = self.snakemake(workdir, *args, timeout_s=timeout_s)
        rc = proc.wait(timeout=timeout_s + 30)
        return rc, (workdir / "snakemake.out").read_text()

    def env(self) -> dict:
        """The user's environment with the site variables of the profile pointed at this cluster."""
        env = _cluster_env()
        env.pop("AT_SLURM_ACCOUNT", None)
        env.pop("AT_SLURM_QOS", None)
        env["AT_SLURM_PARTITION"] = self.partition
        return env

    def sacct(self, job_ids: list[str], fields: str = "JobID,State,ExitCode,AllocTRES") -> list[dict]:
        """One dict per job allocation (`sacct -X`), in job id order."""
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", fields],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in out.splitlines() if line]


def _cluster_env() -> dict:
    # Variables of an enclosing SLURM job (a CI job running on a cluster) would leak into the
    # test cluster's sbatch/srun calls.
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}


def _down() -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLUSTER_SH), "down"], env=_cluster_env(), capture_output=True, text=True,
        timeout=DOWN_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)

    # A CI runner that times out sends SIGTERM, which would kill Python without running
    # finalizers and leave the daemons up; turn it into KeyboardInterrupt so `finally` runs.
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        up = subprocess.run(
            [str(CLUSTER_SH), "up"], env=_cluster_env(), capture_output=True, text=True,
            timeout=UP_TIMEOUT_S,
        )
        if up.returncode != 0:
            pytest.fail(f"cluster.sh up failed (exit {up.returncode}):\n{up.stderr}\n{up.stdout}")
        info = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
        yield SlurmCluster(
            prefix=Path(info["prefix"]),
            partition=info["partition"],
            gpus=int(info["gpus"]),
            cpus=int(info["cpus"]),
        )
    finally:
        down = _down()
        signal.signal(signal.SIGTERM, previous)
        if down.returncode != 0:
            # Not an assertion: a failing teardown must not hide the test's own result.
            sys.stderr.write(f"cluster.sh down failed (exit {down.returncode}):\n{down.stderr}\n")
