#!/usr/bin/env bash
# The GPU check, in one command: (1) every path that only a GPU runs, on one H100/H200 (tiny models except the two
# SD1.5-shaped 512 px memory rows), as a PASS/FAIL table with time and peak memory per row (scripts/gpu_check.py;
# printed, and rewritten in $OUT/gpu_check.md after every row when $OUT is set); then (2) the speed table
# (bench/bench_train.py --configs sd15 --sd15_rows speed): our trainer uncached and cached against diffusers' own
# train_text_to_image.py in the seed recipe, and the THROUGHPUT=1 recipe, at 512 px on the SD1.5-shaped model
# ($OUT/bench_train.txt). Exit 0 when every row passed, 1 when one failed.
#
# Rows (one @row function each in gpu_check.py): a trainer process's start-up (imports, CUDA init: measured alone,
# first); train.sh's fp16 recipe with the cache, EMA, checkpoints, validation, fp32 export, and resume; EMA weights
# shipped = unet_ema; validation PNGs not black; --offload_ema --foreach_ema --use_8bit_adam with resume; foreach and
# loop AdamW; bf16 without the cache with --random_flip --allow_tf32; DREAM + min-SNR; v-prediction; the fp16 grad
# scaler's skipped step holding the LR; generate.py from a checkpoint at batch 1 and 2 and evaluate.py, in fp16; an
# SD1.5-shaped 512 px run with --use_8bit_adam --offload_ema against docs/training.md's 16 GB row; LoRA rank 16
# (fp32 adapters, EMA, adapter-only checkpoints, resume, both files) and an SD1.5-shaped 512 px LoRA run against
# docs/lora.md's 8 GB row; --metadata_fields training and generate.py --metadata; train_controlnet.sh on masks (cache,
# EMA, checkpoints, validation, resume, loading in diffusers); the SD1.5-shaped 512 px ControlNet cached and uncached
# (samples/s, peak memory). Independent rows run GPU_CHECK_JOBS at once (default 6 on CUDA, 1 in smoke mode), each
# after the rows whose output it reads: on the device each process spent about a minute before its first step
# (2026-11-30), nearly all of it outside the GPU, so one at a time the rows took about 20 minutes.
#
# It needs no network. It uses the machine's own torch (with CUDA) and accelerate, and installs the project's other
# pinned packages that the GPU machine lacks from wheels in .whl/ (when .whl/ exists) into /tmp/gpu_check_site,
# then compiles their bytecode once, in parallel, so no process pays for it.
#
# Preparation, once, in the repository root of the machine that calls the device tool (needs PyPI; about 62 MiB):
#   echo /.whl/ >> .git/info/exclude   # .gitignore already ignores it; this covers an older checkout
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .whl \
#     diffusers==0.42.1 transformers==5.23.0 datasets==5.2.0 bitsandbytes==0.50.2 torch-fidelity==0.4.0 \
#     dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0 peft==0.21.2
#   (the versions of requirements.txt, 61.8 MiB, under the device's 64 MiB with the repo; the GPU image has torch,
#   torchvision, accelerate, huggingface_hub, safetensors, tokenizers, torchmetrics, pyarrow, pandas, Pillow, regex,
#   tensorboard, matplotlib, scikit-learn and peft 0.21.0.)
#   For the reference rows, copies of diffusers' examples/text_to_image/train_text_to_image.py and
#   examples/controlnet/train_controlnet.py (the project ships neither) in .reference/ (git-ignored):
#   mkdir -p .reference && cp PATH/train_text_to_image.py PATH/train_controlnet.py .reference/
# Then one device call does everything (about 8-10 minutes; the tables come back even when it is stopped early):
#   run(command="PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh", carry=[".whl", ".reference"], timeout_s=600)
# and copy gpu_check.md and bench_train.txt from the reply's files into docs/gpu.md.
#
# Settings: GPU_CHECK_ROWS=recipe,evaluate runs only those rows (function names or row titles; the rows they need
# run too); GPU_CHECK_JOBS=N rows at once; GPU_CHECK_SPEED=0 skips the speed table, =only runs it alone;
# GPU_CHECK_WORK sets the scratch folder (default /tmp/gpu_check, replaced). Without a GPU:
# GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh runs the same rows at CPU sizes with bf16 in place of fp16, CUDA-only
# rows SKIP, and no speed table (a smoke test of this script).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
# The smoke mode runs in this environment as it is (the wheels are for the GPU machine's Python 3.12).
if [[ "${GPU_CHECK_DEVICE:-}" != cpu ]] && compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/gpu_check_site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  "$PYTHON" -m compileall -q -j 0 "$site" >/dev/null || true  # bytecode once, on every core, not in each process
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
  torch accelerate diffusers transformers datasets bitsandbytes torch_fidelity ||
  { echo "gpu_check: error: a required package is missing (see the preparation at the top of $0)" >&2; exit 2; }
speed="${GPU_CHECK_SPEED:-1}"
case "$speed" in
  0 | 1 | only) ;;
  *) echo "gpu_check: error: GPU_CHECK_SPEED '$speed' must be 0, 1 or only" >&2; exit 2 ;;
esac
status=0
if [[ "$speed" != only ]]; then
  "$PYTHON" scripts/gpu_check.py || status=$?
  [[ $status -le 1 ]] || exit "$status"
fi
if [[ "$speed" != 0 && "${GPU_CHECK_DEVICE:-}" != cpu ]] &&
  "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then  # the table is for a GPU
  work="${GPU_CHECK_WORK:-/tmp/gpu_check}"
  bench=(bench/bench_train.py --configs sd15 --sd15_rows speed --work_dir "$work/bench")
  [[ -f .reference/train_text_to_image.py ]] && bench+=(--reference .reference/train_text_to_image.py)
  [[ -f "$work/model_sd15/model_index.json" ]] && bench+=(--model "$work/model_sd15")  # the memory rows' model
  table="${OUT:-$work}/bench_train.txt"
  benches="${GPU_CHECK_BENCHES:-train controlnet}"
  if [[ " $benches " == *" train "* ]]; then
    "$PYTHON" "${bench[@]}" 2>&1 | tee "$table" || status=1
  fi
  if [[ " $benches " == *" controlnet "* ]]; then  # the ControlNet rows, against diffusers' script when supplied
    control=(bench/bench_controlnet.py --configs sd15 --steps 6 --max_attempts 1 --work_dir "$work/bench_controlnet")
    [[ -f .reference/train_controlnet.py ]] && control+=(--reference .reference/train_controlnet.py)
    [[ -f "$work/model_sd15/model_index.json" ]] && control+=(--model "$work/model_sd15")
    "$PYTHON" "${control[@]}" 2>&1 | tee "${OUT:-$work}/bench_controlnet.txt" || status=1
  fi
fi
exit "$status"
