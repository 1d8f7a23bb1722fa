"""torchrun for a run on several processes on one machine: ``python -m at.launch TORCHRUN-ARGS``.

The same launcher as ``python -m torch.distributed.run`` (torchrun), through its own entry
point, with one difference: when a rank fails (killed, crashed, stopped by SIGTERM), torchrun
ends the others and raises ChildFailedError, whose traceback and summary table filled a screen
for what is one fact. Here that fact is one line naming the rank that failed first and how, and
the exit status is that rank's (128 + the signal for a signal, as a shell reports it), so that
Snakemake or a script sees what a run in one process would have given. The same for a signal
that stops torchrun itself (SIGTERM from SLURM or Snakemake: it passes it to the ranks, which
save and say so). torchrun's own log lines (which process it stopped, with which signal) are
left as they are.
"""

from __future__ import annotations

import signal
import sys


def _how(exitcode: int) -> tuple[str, int]:
    """How a rank ended, in words, and the exit status that says the same."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}", 128 - exitcode
    return f"exited with status {exitcode}", exitcode


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun, parse_args

    processes = parse_args(argv).nproc_per_node
    try:
        torchrun(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how, status = _how(failure.exitcode)
        print(f"error: rank {rank} of {processes} {how} (pid {failure.pid}), the first of the run's processes "
              f"to end; the others were stopped: started again, the run resumes from its last saved state",
              file=sys.stderr, flush=True)
        return status or 1
    except SignalException as e:
        print(f"error: torchrun received {e.sigval.name} and passed it to the {processes} ranks (each says "
              f"whether its position was saved)", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
