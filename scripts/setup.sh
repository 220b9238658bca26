#!/usr/bin/env bash
# Set up MRISegAssist's engine, command line, tests and browser front end in ./.venv (Python 3.10+).
# Usage: bash scripts/setup.sh [--no-browser]
#   torch + torchvision: the pair segment-anything needs (torchvision imports beside this torch build).
#   sam2 is installed with --no-deps (its own requirement list would pull a CUDA torch upgrade).
#   The batch extra brings Ray, pyarrow and CodeCarbon (mrisegassist batch / report; about 500 MB, 40 s).
#   The test extra brings pytest and import-linter (the layer contracts in pyproject.toml, Testing/test_layers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
$PIP install -q -e ".[sam,sam2,atlas,web,batch,test]"
SAM2_BUILD_CUDA=0 $PIP install -q --no-deps "sam2==1.1.0"
if [ "${1:-}" != "--no-browser" ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  # Browser tests drive Debian's chromium through Playwright (no browser download).
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "note: chromium not installed; browser tests will skip"
fi
if [ ! -d /usr/share/mricron/templates ] && command -v apt-get >/dev/null; then
  # Colin27 + AAL built-in atlas (Debian mricron-data).
  (apt-get update -qq && apt-get install -y -qq mricron-data >/dev/null) || echo "note: mricron-data not installed; the Colin27 atlas will be unavailable"
fi
"$VENV/bin/python" -c "import mrisegassist, monai, SimpleITK, segment_anything, sam2; print('mrisegassist', mrisegassist.__version__, 'ready in', '$VENV')"
