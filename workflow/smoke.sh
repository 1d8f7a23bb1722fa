#!/usr/bin/env bash
# The README's main job: the whole pipeline (download -> teachers -> students -> report) on the
# smoke profile, through real Snakemake, on this machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${AT_PROFILE:-smoke}"
python -m at --params params.yaml runs --profile "$profile" > /dev/null   # validates params.yaml first
# AT_SEEDS=1 (or 0,2): only those seeds, a long profile run in parts; the report then shows what
# has finished (the runs of other seeds as missing)
seeds=()
if [ -n "${AT_SEEDS:-}" ]; then seeds=(seeds="$AT_SEEDS"); fi
snakemake --snakefile workflow/Snakefile --cores "${AT_CORES:-$(nproc)}" --config profile="$profile" "${seeds[@]}" \
  --rerun-incomplete --printshellcmds --show-failed-logs
if [ -n "${AT_SEEDS:-}" ]; then python -m at report --profile "$profile"; fi
echo
echo "Tables and figures: results/$profile/README.md"
echo "Runs in MLflow:     .venv/bin/python -m at ui --profile $profile   (prints the address to open)"
