#!/usr/bin/env bash
# GPU check of `mrisegassist batch` (issue 13), for a machine with an NVIDIA GPU, the project's venv and the
# shared data: Ray workers on cuda (num_gpus=1 each) run the shipped U-Nets on the 6 shared cohort cases, then
# `bench batch` compares 1 GPU worker with the serial loop. About 3-5 minutes. Prints the figures; exit 0 = ok.
# Usage: bash scripts/gpu_check_batch.sh [OUT_DIR]   (PYTHON=... DATA=... to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-${MRISEGASSIST_DATA:-../shared/data}}
OUT=${1:-${OUT:-/tmp/gpu-batch-check}}
export PYTHONPATH=$PWD/MRISegAssist MRISEGASSIST_DATA=$DATA
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
mkdir -p "$OUT"
{
  echo "case,flair,t1c,reference,model,site"
  for c in pat0001 pat0002 pat0003 pat0004; do d=$DATA/brats2013-deepmedic/$c
    echo "$c,$d/flair.nii.gz,$d/t1c.nii.gz,$d/labels.nii.gz,glioma-2d,brats2013"; done
  for c in patient07 patient26; do d=$DATA/ms-lesjak/$c
    echo "$c,$d/flair.nii.gz,$d/t1post.nii.gz,$d/lesions.nii.gz,ms-lesions-2d,ljubljana"; done
} > "$OUT/cohort.csv"
rm -rf "$OUT/run"
"$PY" -m mrisegassist batch "$OUT/cohort.csv" -o "$OUT/run" --workflow unet --device cuda --quiet
"$PY" - "$OUT/run" <<'PY'
import sys
import pandas as pd
t = pd.read_parquet(f"{sys.argv[1]}/results.parquet")
print(t[["case", "status", "device", "worker", "seconds", "compute_s", "energy_kwh", "dice:foreground"]].to_string())
assert (t["status"] == "done").all() and (t["device"] == "cuda").all(), "not all studies done on cuda"
PY
"$PY" -m mrisegassist report "$OUT/run" -o "$OUT/report.html"
"$PY" -m mrisegassist bench batch --workflow unet --device cuda --workers 1 --copies 2
