#!/usr/bin/env bash
# Fine-tune Stable Diffusion on RSICD: `accelerate launch train_text_to_image.py` with the project's settings.
#
# Settings, from the environment (all optional):
#   MODEL_NAME    base pipeline, a Hub id or a local diffusers folder
#                 (default: stable-diffusion-v1-5/stable-diffusion-v1-5)
#   DATA_DIR      the folder holding metadata.jsonl (format.py's output) next to rsicd_images/, i.e. create.py's
#                 --output_dir; NOT rsicd_images/ itself; or a sharded folder (create.py --output_format
#                 webdataset, holding shards_index.parquet)                                (default: data/rsicd)
#   OUTPUT_DIR    checkpoints, logs and the final pipeline; also the Hub repo name          (default: sd-rsicd-model)
#   REPORT_TO     tracker: wandb, tensorboard, all, ...  (default: wandb; WANDB_MODE=offline needs no login)
#   PUSH_TO_HUB   1: create the Hub repo at start and upload the final model; 0: do not     (default: 1)
#                 Log in first with `hf auth login` or export HF_TOKEN; the token never goes on a command line.
#   ACCELERATE_CONFIG_FILE  accelerate config to use. Without it, ${HF_HOME:-$HOME/.cache/huggingface}/accelerate/
#                 default_config.yaml (written by `accelerate config`) when it exists, else one process on this machine.
#   LAUNCH_ARGS   more `accelerate launch` options, split on spaces, after the config's (they win over it); the
#                 multi-node recipe passes e.g. "--num_machines 2 --machine_rank 0 --num_processes 16
#                 --main_process_ip HOST --main_process_port 29500 --rdzv_backend c10d"
#                 (scripts/slurm/train_multinode.sbatch sets it on each node)                  (default: unset)
#   PYTHON        the Python that runs accelerate's launcher in-process (utils/launch.py), so a failed run ends
#                 with the trainer's own message and exit code (2: usage error, 1: diverged) and no launcher
#                 traceback; the trainer's checks run once before any process starts              (default: python)
#   ACCELERATE    run this accelerate command's `launch` instead (e.g. another install); failures then also show
#                 accelerate's own traceback                                                    (default: unset)
#   LORA_RANK     a number (e.g. 16): train LoRA adapters of that rank instead of the whole UNet, at
#                 --learning_rate=1e-4 and without EMA (add --use_ema to keep one); the output is
#                 OUTPUT_DIR/pytorch_lora_weights.safetensors plus a kohya-format copy       (default: unset, full)
#   CACHE_LATENTS 1: --cache_latents --center_crop (encode images and captions once, before training: faster
#                 steps; the centre crop equals any crop for create.py's square images at --resolution=512);
#                 0: encode every step with random crops, as the reference does                 (default: 1)
#   THROUGHPUT    1: the throughput recipe for a big GPU (40 GB or more): bf16, batch THROUGHPUT_BATCH with no
#                 gradient accumulation and no gradient checkpointing, fused AdamW, foreach EMA, channels-last
#                 weights and torch.compile, on cached latents; the learning rate stays the recipe's, so raise it
#                 for the larger batch if you want (e.g. --learning_rate=4e-06)                   (default: 0)
#   THROUGHPUT_BATCH  the per-GPU batch of THROUGHPUT=1                                           (default: 32)
#
# Extra arguments go to train_text_to_image.py after the defaults, so they win:
#   ./train.sh --max_train_steps=10 --resolution=64
#   REPORT_TO=tensorboard PUSH_TO_HUB=0 DATA_DIR=demo_output/data ./train.sh --max_train_steps=10
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL_NAME="${MODEL_NAME:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
DATA_DIR="${DATA_DIR:-data/rsicd}"
OUTPUT_DIR="${OUTPUT_DIR:-sd-rsicd-model}"
REPORT_TO="${REPORT_TO:-wandb}"
PUSH_TO_HUB="${PUSH_TO_HUB:-1}"
CACHE_LATENTS="${CACHE_LATENTS:-1}"
PYTHON="${PYTHON:-python}"
ACCELERATE="${ACCELERATE:-}"
LAUNCH_ARGS="${LAUNCH_ARGS:-}"
LORA_RANK="${LORA_RANK:-}"
THROUGHPUT="${THROUGHPUT:-0}"
THROUGHPUT_BATCH="${THROUGHPUT_BATCH:-32}"
# A sharded folder (create.py --output_format webdataset) is a DATA_DIR too (utils/launch_common.sh).
SHARDS_INDEX=shards_index.parquet
PROG=train.sh
# shellcheck source=utils/launch_common.sh
source "$SCRIPT_DIR/utils/launch_common.sh"

# Cheap checks of the other settings; the trainer's own preflight checks the rest before loading models.
check_settings() {
  check_common_settings
  if [[ -n "$LORA_RANK" && ! "$LORA_RANK" =~ ^[1-9][0-9]*$ ]]; then
    die "LORA_RANK '$LORA_RANK' must be a whole number of at least 1 (e.g. 16), or unset for a full fine-tune."
  fi
  case "$THROUGHPUT" in
    0 | 1) ;;
    *) die "THROUGHPUT '$THROUGHPUT' must be 1 or 0." ;;
  esac
  if [[ "$THROUGHPUT" == 1 && "$CACHE_LATENTS" == 0 ]]; then
    die "THROUGHPUT=1 trains on cached latents; it cannot be combined with CACHE_LATENTS=0."
  fi
  [[ "$THROUGHPUT_BATCH" =~ ^[1-9][0-9]*$ ]] ||
    die "THROUGHPUT_BATCH '$THROUGHPUT_BATCH' must be a whole number of at least 1 (e.g. 32)."
}

main() {
  check_settings
  check_data_dir
  refuse_token_args "$@"
  local -a launcher train_args launch_args extra_launch_args ema_flag=(--use_ema)
  # The seed recipe fits a 16-24 GB card; THROUGHPUT=1 trades that memory for speed on a big one.
  local -a speed_args=(--train_batch_size=1 --gradient_accumulation_steps=4 --gradient_checkpointing
                       --mixed_precision=fp16)
  if [[ "$THROUGHPUT" == 1 ]]; then
    speed_args=(--train_batch_size="$THROUGHPUT_BATCH" --gradient_accumulation_steps=1 --mixed_precision=bf16
                --optimizer_impl=fused --foreach_ema --channels_last --torch_compile)
  fi
  local learning_rate=1e-06
  # LoRA trains far fewer weights, so it takes a ~100x higher learning rate; its EMA is opt-in (--use_ema).
  if [[ -n "$LORA_RANK" ]]; then
    ema_flag=()
    learning_rate=1e-04
  fi
  set_launcher
  train_args=(
    --pretrained_model_name_or_path="$MODEL_NAME" --train_data_dir="$DATA_DIR" --output_dir="$OUTPUT_DIR"
    --resolution=512 "${speed_args[@]}" "${ema_flag[@]}"
    --max_train_steps=3500 --learning_rate="$learning_rate" --max_grad_norm=1 --lr_scheduler=constant --lr_warmup_steps=0
    --checkpointing_steps=500 --validation_prompt="A satellite image of a crop field" --validation_epochs=10
    --report_to="$REPORT_TO"
  )
  [[ -n "$LORA_RANK" ]] && train_args+=(--lora_rank="$LORA_RANK")
  [[ "$PUSH_TO_HUB" == 1 ]] && train_args+=(--push_to_hub)
  [[ "$CACHE_LATENTS" == 1 ]] && train_args+=(--center_crop --cache_latents)
  mapfile -t launch_args < <(launch_options "$(last_mixed_precision "${train_args[@]}" "$@")")
  read -r -a extra_launch_args <<<"$LAUNCH_ARGS"
  exec "${launcher[@]}" "${launch_args[@]}" "${extra_launch_args[@]}" "$SCRIPT_DIR/train_text_to_image.py" \
    "${train_args[@]}" "$@"
}

main "$@"
