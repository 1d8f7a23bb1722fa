#!/usr/bin/env bash
# The test suite (`make test`): every test but the real-SLURM ones on one pytest-xdist worker per
# CPU, then the real-SLURM tests in a pytest process of their own. Those share one throwaway
# cluster per process, so they must not be spread over workers; pytest-xdist's `--dist
# loadgroup`, made for that, does nothing under pytest 9 (it renames test ids through an
# attribute pytest 9 no longer reads), hence two processes.
#
# Arguments go to both pytest calls (the second keeps only the SLURM tests of what they select). Exit status: the first part's failure, else the second's;
# pytest's 5 ("no tests collected") only when neither part collected a test, so that .ci/run can
# refuse a suite that ran nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"

"$python" -m pytest -n "${TEST_WORKERS:-auto}" --ignore=tests/slurm "$@"
rest=$?
"$python" -m pytest tests/slurm "$@" -m slurm   # the last -m wins: only SLURM tests here
slurm=$?

for rc in "$rest" "$slurm"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
if [ "$rest" -eq 5 ] && [ "$slurm" -eq 5 ]; then exit 5; fi
exit 0
