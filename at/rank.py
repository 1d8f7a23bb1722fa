"""One rank of a data-parallel run: ``python -m at.rank``, what the launcher (torchrun, srun)
starts in each process for a run that `python -m at train` spread over several
(at.distributed.launch_command). The command's arguments come from the environment
(at.distributed.RANK_ARGV), so no launcher can take them for its own."""

from __future__ import annotations

import json
import os
import sys

from at.__main__ import main
from at.distributed import RANK_ARGV


def rank_argv() -> list[str]:
    text = os.environ.get(RANK_ARGV)
    if not text:
        raise SystemExit(f"error: {RANK_ARGV} is not set: `python -m at.rank` is started by "
                         "`python -m at train` for a run on several processes, not by hand")
    return json.loads(text)


if __name__ == "__main__":
    sys.exit(main(rank_argv()))
