#!/usr/bin/env bash
# The test suite (`make test`): every test but the real-SLURM ones on one pytest-xdist worker per
# CPU, and beside them, at the same time, the real-SLURM tests in a pytest process of their own.
# Those share one throwaway cluster per process, so they must not be spread over workers
# (pytest-xdist's `--dist loadgroup`, made for that, does nothing under pytest 9: it renames test
# ids through an attribute pytest 9 no longer reads). They spend most of their time waiting on
# the scheduler, so they run while the other part computes; their output is printed when both
# are done.
#
# Arguments go to both pytest calls (the SLURM one keeps only the SLURM tests of what they
# select). Exit status: the first part's failure, else the SLURM part's; pytest's 5 ("no tests
# collected") only when neither part collected a test, so that .ci/run can refuse a suite that
# ran nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"

slurm_log="$(mktemp "${TMPDIR:-/tmp}/at-slurm-tests.XXXXXX")"
trap 'rm -f "$slurm_log"' EXIT
"$python" -m pytest tests/slurm "$@" -m slurm >"$slurm_log" 2>&1 &   # the last -m wins: only SLURM tests
slurm_pid=$!
# a suite stopped from outside (Ctrl-C, CI's timeout) stops the SLURM part too, which then takes
# its throwaway cluster down (tests/slurm/conftest.py)
trap 'kill -TERM "$slurm_pid" 2>/dev/null; wait "$slurm_pid"; exit 143' INT TERM

# --dist loadscope: a module's tests on one worker, so that its module-scoped fixtures (a real
# Snakemake run, a copy of the repository) are built once, not once per worker.
# --no-loadscope-reorder: modules go to the workers in collection order, which tests/conftest.py
# makes slowest first; xdist's own order (most tests first) left a long module for the end.
"$python" -m pytest -n "${TEST_WORKERS:-auto}" --dist loadscope --no-loadscope-reorder --ignore=tests/slurm "$@"
rest=$?
wait "$slurm_pid"
slurm=$?
echo
echo "---- the real-SLURM tests (run beside the above) ----"
cat "$slurm_log"

for rc in "$rest" "$slurm"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
if [ "$rest" -eq 5 ] && [ "$slurm" -eq 5 ]; then exit 5; fi
exit 0
