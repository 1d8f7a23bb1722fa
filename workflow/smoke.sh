#!/usr/bin/env bash
# The README's main job: the whole pipeline (download -> teachers -> students -> report) on the
# smoke profile, through real Snakemake, on this machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${AT_PROFILE:-smoke}"
python -m at --params params.yaml runs --profile "$profile" > /dev/null   # validates params.yaml first
snakemake --snakefile workflow/Snakefile --cores "${AT_CORES:-$(nproc)}" --config profile="$profile" \
  --rerun-incomplete --printshellcmds --show-failed-logs
echo
echo "Tables and figures: results/$profile/README.md"
echo "Runs in MLflow:     .venv/bin/python -m at ui --profile $profile   (prints the address to open)"
