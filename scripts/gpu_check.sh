#!/usr/bin/env bash
# The GPU check: every path that only a GPU runs, on one H100/H200 (tiny models except the two 512 px rows), as a
# PASS/FAIL table with time and peak memory per row (printed, and rewritten in $OUT/gpu_check.md after every row when
# $OUT is set). On the device H200 (2026-11-30) each process took about 60 s before its first step, so all rows take
# about 20 minutes: more than one session's device time; pick rows with GPU_CHECK_ROWS (README, What has run on a
# GPU). Rows (scripts/gpu_check.py, where one more row is one more @row function): train.sh's fp16 recipe with the
# cache, EMA, checkpoints, validation, fp32 export, and resume; EMA weights shipped = unet_ema; validation PNGs not
# black; --offload_ema --foreach_ema --use_8bit_adam with resume; foreach and loop AdamW; bf16 without the cache with
# --random_flip --allow_tf32; DREAM + min-SNR; v-prediction; the fp16 grad scaler's skipped step holding the LR;
# generate.py from a checkpoint at batch 1 and 2 and evaluate.py, in fp16; an SD1.5-shaped 512 px run with
# --use_8bit_adam --offload_ema against README's 16 GB row; LoRA rank 16 (fp32 adapters, EMA, adapter-only checkpoints,
# resume, both files) and an SD1.5-shaped 512 px LoRA run against README's 8 GB row. Exit 0 when every row passed, 1
# when one failed.
#
# It needs no network. It uses the machine's own torch (with CUDA) and accelerate, and installs the project's other
# pinned packages that the GPU machine lacks from wheels in .whl/ (when .whl/ exists) into /tmp/gpu_check_site.
#
# Preparation, once, in the repository root of the machine that calls the device tool (needs PyPI; about 61 MiB):
#   echo /.whl/ >> .git/info/exclude   # .gitignore already ignores it; this covers an older checkout
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .whl \
#     diffusers==0.42.1 transformers==5.23.0 datasets==5.2.0 bitsandbytes==0.50.2 torch-fidelity==0.4.0 \
#     dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0 regex==2026.11.19 peft==0.21.2
# (the versions of requirements.txt, 62.5 MiB: with the repo just under the device's 64 MiB limit; the GPU image has
# torch, accelerate, huggingface_hub, safetensors, tokenizers, torchmetrics, pyarrow, pandas, Pillow, tensorboard,
# matplotlib, scikit-learn 1.9.1 and peft 0.21.0.) Then the device tool's call, rows picked to fit the time left:
#   run(command="GPU_CHECK_ROWS=generate_batches,evaluate bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=400)
# and copy the table from the reply's files (gpu_check.md; gpu_check.log holds every command's output) into README's
# "What has run on a GPU" section.
#
# Without a GPU: GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh runs the same rows at CPU sizes with bf16 in place of fp16,
# CUDA-only rows SKIP (a smoke test of this script). GPU_CHECK_ROWS=recipe,evaluate runs only those rows (function
# names or row titles). GPU_CHECK_WORK sets the scratch folder (default /tmp/gpu_check, replaced).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
# The smoke mode runs in this environment as it is (the wheels are for the GPU machine's Python 3.12).
if [[ "${GPU_CHECK_DEVICE:-}" != cpu ]] && compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/gpu_check_site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
  torch accelerate diffusers transformers datasets bitsandbytes torch_fidelity ||
  { echo "gpu_check: error: a required package is missing (see the preparation at the top of $0)" >&2; exit 2; }
exec "$PYTHON" scripts/gpu_check.py
