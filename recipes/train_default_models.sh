#!/usr/bin/env bash
# Reproduce the shipped U-Net models (glioma-2d, ms-lesions-2d):
# 1. leave-one-case-out cross-validation of each recipe (python -m mrisegassist.unet.crossval): every labelled real
#    case is held out once, its fold model is trained on all the other cases (plus the recipe's synthetic cases)
#    and never sees it, and is scored on it against the expert labels;
# 2. install the ensemble of the fold models (python -m mrisegassist.unet.card) with a generated MODEL_CARD.md that
#    shows those cross-validated scores, and a check of the ensemble on held-out synthetic cases (and, for gliomas,
#    against the AURORA model output of brats-met-aurora, NOT expert labels).
# Run from the repository root with the real data in ../shared/data (or MRISEGASSIST_DATA). CPU only, fixed step
# counts (no wall-clock cap), niced, one torch thread per process; a finished fold is never trained again, so the
# script can be stopped and re-run. PREVIOUS=1 also cross-validates the previous recipes (recipes/previous/) for
# comparison in the cards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${MRISEGASSIST_DATA:-../shared/data}
mkdir -p build/cv
CV="nice -n 10 $PY -m mrisegassist.unet.crossval"

$CV --config recipes/glioma-2d.json --cases "$DATA/brats2013-deepmedic" --out build/cv/glioma-2d \
    --folds pat0001,pat0002 > build/cv-glioma-2d-a.log 2>&1 &
$CV --config recipes/glioma-2d.json --cases "$DATA/brats2013-deepmedic" --out build/cv/glioma-2d \
    --folds pat0003,pat0004 > build/cv-glioma-2d-b.log 2>&1 &
$CV --config recipes/ms-2d.json --cases "$DATA/ms-lesjak" --out build/cv/ms-lesions-2d > build/cv-ms-lesions-2d.log 2>&1 &
wait

if [ "${PREVIOUS:-0}" = 1 ]; then
    $CV --config recipes/previous/glioma-2d.json --cases "$DATA/brats2013-deepmedic" --out build/cv/glioma-2d-previous \
        > build/cv-glioma-2d-previous.log 2>&1 &
    $CV --config recipes/previous/ms-2d.json --cases "$DATA/ms-lesjak" --out build/cv/ms-lesions-2d-previous \
        > build/cv-ms-lesions-2d-previous.log 2>&1 &
    wait
fi
# shown in the cards when present: the previous recipes' folds, and the previously shipped models (PREVIOUS_MODELS:
# a folder holding copies of their model folders) run through the same checks
EXTRA_GLIOMA=() EXTRA_MS=()
[ -d build/cv/glioma-2d-previous ] && EXTRA_GLIOMA+=(--before build/cv/glioma-2d-previous)
[ -d build/cv/ms-lesions-2d-previous ] && EXTRA_MS+=(--before build/cv/ms-lesions-2d-previous)
if [ -n "${PREVIOUS_MODELS:-}" ]; then
    EXTRA_GLIOMA+=(--previous "$PREVIOUS_MODELS/glioma-2d") EXTRA_MS+=(--previous "$PREVIOUS_MODELS/ms-lesions-2d")
fi

$PY -m mrisegassist.unet.card build/cv/glioma-2d --install MRISegAssist/mrisegassist/models/glioma-2d \
    --recipe glioma-2d.json --check-synthetic lgg:2,glioma:1 --aurora "$DATA/brats-met-aurora" "${EXTRA_GLIOMA[@]}"
$PY -m mrisegassist.unet.card build/cv/ms-lesions-2d --install MRISegAssist/mrisegassist/models/ms-lesions-2d \
    --recipe ms-2d.json --check-synthetic ms-confluent:2,ms:1 "${EXTRA_MS[@]}"
# the tables again: python -m mrisegassist.unet.crossval --out build/cv/glioma-2d --report
