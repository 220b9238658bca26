#!/usr/bin/env bash
# Reproduce the shipped U-Net models: train with the project's own `mrisegassist train`, then evaluate each on
# shared cases it was NOT trained on and install it with a generated MODEL_CARD.md.
# Run from the repository root with the real data in ../shared/data (or MRISEGASSIST_DATA). CPU only; each
# training is time-boxed by "max_minutes" in its config (the cosine learning-rate decay follows the budget).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${MRISEGASSIST_DATA:-../shared/data}
mkdir -p build/models

# (a) glioma, FLAIR + T1c, BraTS 2013 labels: train pat0002-0004 (pat0004 holds the only sizeable non-enhancing
#     tumour label), validate pat0001.
# (b) MS lesions, FLAIR: train ms-lesjak patient26 + 8 seeded synthetic MS cases, validate patient07.
# Both run at once on the 2 cores (glioma 1 torch thread, MS 2: "threads" in the configs), niced.
nice $PY -m mrisegassist train --config recipes/glioma-2d.json --cases "$DATA/brats2013-deepmedic" > build/train-glioma-2d.log 2>&1 &
nice $PY -m mrisegassist train --config recipes/ms-2d.json --cases "$DATA/ms-lesjak" > build/train-ms-2d.log 2>&1 &
wait

$PY -m mrisegassist.unet.card build/models/glioma-2d --eval "$DATA/brats2013-deepmedic/pat0001" \
    --aurora "$DATA/brats-met-aurora" --install MRISegAssist/mrisegassist/models/glioma-2d --recipe glioma-2d.json
$PY -m mrisegassist.unet.card build/models/ms-lesions-2d --eval "$DATA/ms-lesjak/patient07" \
    --install MRISegAssist/mrisegassist/models/ms-lesions-2d --recipe ms-2d.json
