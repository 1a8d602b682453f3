#!/usr/bin/env bash
# Train a ControlNet on a create.py + format.py folder with conditioning images (masks, maps, bands):
# `accelerate launch train_controlnet.py` with the project's recipe (fp16, gradient checkpointing, cached latents,
# EMA, checkpoints every 500 steps, validation every 500 steps on the data folder's first row).
#
# Settings, from the environment (all optional), as train.sh reads them:
#   MODEL_NAME    base pipeline, a Hub id or a local diffusers folder
#                 (default: stable-diffusion-v1-5/stable-diffusion-v1-5)
#   DATA_DIR      the folder holding metadata.jsonl with conditioning_image paths (create.py with
#                 --conditioning_column or --conditioning_dir, then format.py)                  (default: data/loveda)
#   OUTPUT_DIR    checkpoints, logs and the final ControlNet; also the Hub repo name     (default: controlnet-rs-model)
#   REPORT_TO     tracker: wandb, tensorboard, all, ...  (default: wandb; WANDB_MODE=offline needs no login)
#   PUSH_TO_HUB   1: create the Hub repo at start and upload the final ControlNet; 0: do not      (default: 1)
#   CACHE_LATENTS 1: --cache_latents (target latents and captions encoded once; the conditioning is still read
#                 every step); 0: encode every step                                              (default: 1)
#   VALIDATION_PROMPT, VALIDATION_IMAGE  the validation pair; by default the caption and the conditioning file of
#                 DATA_DIR's first metadata.jsonl line (both or neither)                  (default: that first row)
#   ACCELERATE_CONFIG_FILE, LAUNCH_ARGS, PYTHON, ACCELERATE   as for train.sh (utils/launch.py runs the launch
#                 in-process: a usage error is one line, exit 2, checked once before any process starts)
#
# Extra arguments go to train_controlnet.py after the defaults, so they win:
#   ./train_controlnet.sh --max_train_steps=10 --resolution=64 --num_classes=8
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL_NAME="${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
DATA_DIR="${DATA_DIR:-data/loveda}"
OUTPUT_DIR="${OUTPUT_DIR:-controlnet-rs-model}"
REPORT_TO="${REPORT_TO:-wandb}"
PUSH_TO_HUB="${PUSH_TO_HUB:-1}"
CACHE_LATENTS="${CACHE_LATENTS:-1}"
VALIDATION_PROMPT="${VALIDATION_PROMPT:-}"
VALIDATION_IMAGE="${VALIDATION_IMAGE:-}"
PYTHON="${PYTHON:-python}"
ACCELERATE="${ACCELERATE:-}"
LAUNCH_ARGS="${LAUNCH_ARGS:-}"
PROG=train_controlnet.sh
# shellcheck source=utils/launch_common.sh
source "$SCRIPT_DIR/utils/launch_common.sh"

# The string value of KEY in a metadata.jsonl line (format.py writes one JSON object a line), its \" and \\
# escapes undone.
json_field() {
  local line="$1" key="$2" value
  [[ "$line" =~ \"$key\":\ \"(([^\"\\]|\\.)*)\" ]] || return 1
  value="${BASH_REMATCH[1]//\\\"/\"}"
  printf '%s' "${value//\\\\/\\}"
}

# The validation pair: both given, or the first row's caption and conditioning file.
validation_pair() {
  if [[ -n "$VALIDATION_PROMPT" || -n "$VALIDATION_IMAGE" ]]; then
    [[ -n "$VALIDATION_PROMPT" && -n "$VALIDATION_IMAGE" ]] ||
      die "set both VALIDATION_PROMPT and VALIDATION_IMAGE, or neither (then DATA_DIR's first row is used)."
    [[ -f "$VALIDATION_IMAGE" ]] || die "VALIDATION_IMAGE '$VALIDATION_IMAGE' does not exist."
    return 0
  fi
  local first
  first="$(head -n 1 "$DATA_DIR/$METADATA")"
  VALIDATION_PROMPT="$(json_field "$first" text)" || true
  VALIDATION_IMAGE="$(json_field "$first" conditioning_image)" || true
  [[ -n "$VALIDATION_IMAGE" ]] ||
    die "DATA_DIR '$DATA_DIR': its first $METADATA line names no conditioning_image: run create.py with" \
      "--conditioning_column or --conditioning_dir, then format.py."
  VALIDATION_IMAGE="$DATA_DIR/$VALIDATION_IMAGE"
}

main() {
  check_common_settings
  check_data_dir
  refuse_token_args "$@"
  validation_pair
  local -a launcher train_args launch_args extra_launch_args
  set_launcher
  train_args=(
    --pretrained_model_name_or_path="$MODEL_NAME" --train_data_dir="$DATA_DIR" --output_dir="$OUTPUT_DIR"
    --resolution=512 --train_batch_size=4 --gradient_accumulation_steps=1 --gradient_checkpointing
    --mixed_precision=fp16 --use_ema --random_flip --max_train_steps=5000 --learning_rate=1e-05
    --lr_scheduler=constant --lr_warmup_steps=0 --checkpointing_steps=500 --checkpoints_total_limit=3
    --validation_prompt="$VALIDATION_PROMPT" --validation_image="$VALIDATION_IMAGE" --num_validation_images=2
    --validation_steps=500 --report_to="$REPORT_TO"
  )
  [[ "$PUSH_TO_HUB" == 1 ]] && train_args+=(--push_to_hub)
  [[ "$CACHE_LATENTS" == 1 ]] && train_args+=(--cache_latents)
  mapfile -t launch_args < <(launch_options "$(last_mixed_precision "${train_args[@]}" "$@")")
  read -r -a extra_launch_args <<<"$LAUNCH_ARGS"
  exec "${launcher[@]}" "${launch_args[@]}" "${extra_launch_args[@]}" "$SCRIPT_DIR/train_controlnet.py" \
    "${train_args[@]}" "$@"
}

main "$@"
