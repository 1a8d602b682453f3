#!/usr/bin/env bash
# Run diffusers' own SD1 ControlNet example tests (examples/controlnet/test_controlnet.py, class TestControlNet)
# against this project's train_controlnet.py, offline, with local stand-ins for the Hub fixtures they use
# (hf-internal-testing/tiny-stable-diffusion-torch, /tiny-controlnet, /fill10: stand_in/tiny_controlnet.py).
#
# Usage: scripts/run_diffusers_controlnet_tests.sh [DIFFUSERS_EXAMPLES_DIR]
#   DIFFUSERS_EXAMPLES_DIR holds test_controlnet.py and test_examples_utils.py, copied from a diffusers checkout
#   (examples/controlnet/ and examples/); default: .reference/. Nothing is downloaded: HF_HOME is a temporary
#   folder holding the stand-ins, with HF_HUB_OFFLINE=1. Extra pytest options: PYTEST_ARGS (e.g. "-x -q").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE="${1:-$ROOT/.reference}"
PYTHON="${PYTHON:-python}"

die() {
  echo "run_diffusers_controlnet_tests.sh: error: $*" >&2
  exit 2
}

[[ -f "$SOURCE/test_controlnet.py" ]] ||
  die "no test_controlnet.py in '$SOURCE': copy diffusers' examples/controlnet/test_controlnet.py there."
[[ -f "$SOURCE/test_examples_utils.py" ]] ||
  die "no test_examples_utils.py in '$SOURCE': copy diffusers' examples/test_examples_utils.py there."
command -v accelerate >/dev/null || die "accelerate is not on PATH: activate the project's virtualenv."

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# diffusers' layout: the tests launch examples/controlnet/train_controlnet.py relative to the working directory.
mkdir -p "$WORK/examples/controlnet"
cp "$SOURCE/test_examples_utils.py" "$WORK/examples/"
cp "$SOURCE/test_controlnet.py" "$WORK/examples/controlnet/"
ln -s "$ROOT/train_controlnet.py" "$WORK/examples/controlnet/train_controlnet.py"

export HF_HOME="$WORK/hf_home" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1
(cd "$ROOT" && "$PYTHON" -m stand_in.tiny_controlnet "$HF_HOME" >/dev/null)
cd "$WORK"
# TestControlNet: the SD1 cases (the SDXL, SD3 and Flux classes need their own trainers).
PYTHONPATH="$WORK/examples" "$PYTHON" -m pytest -p no:cacheprovider --rootdir "$WORK" ${PYTEST_ARGS:--q} \
  "examples/controlnet/test_controlnet.py::TestControlNet"
