#!/usr/bin/env bash
# The whole pipeline on the embedded default, on CPU, with nothing downloaded but the Python packages:
# a small RSICD-schema Parquet drawn by the project's own code -> a tiny random Stable Diffusion model ->
# create.py -> format.py -> ./train.sh (tiny model, 64 px, 120 steps) -> generate.py ->
# evaluate.py (with stand-in Inception/CLIP weights, so its figures only show the plumbing works).
# Usage: ./demo.sh [OUT]   (default OUT: demo_output; a previous demo's OUT is replaced, any other non-empty
# folder is refused)
# Sizes, from the environment: DEMO_ROWS (training rows, 64), DEMO_STEPS (optimizer steps, 120),
# DEMO_RESOLUTION (training and sampling size, 64), DEMO_SAMPLE_STEPS (denoising steps, 20),
# DEMO_EVAL_SAMPLES (held-out captions evaluated, 16).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
. .venv/bin/activate

OUT="${1:-demo_output}"
ROWS="${DEMO_ROWS:-64}"
STEPS="${DEMO_STEPS:-120}"
RESOLUTION="${DEMO_RESOLUTION:-64}"
SAMPLE_STEPS="${DEMO_SAMPLE_STEPS:-20}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-16}"
PROMPT="A satellite image of a crop field"
# Offline by construction: every model is local, and the trackers must not try to log in.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

step() {
  echo
  echo "=== $*"
}

# Only a folder this script made (it holds the marker) is ever deleted.
MARKER=.rsdiff_demo_output
if [[ -d "$OUT" && -n "$(ls -A "$OUT")" ]]; then
  if [[ ! -f "$OUT/$MARKER" ]]; then
    echo "demo.sh: error: '$OUT' is a non-empty folder not made by demo.sh; pass another OUT." >&2
    exit 2
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
touch "$OUT/$MARKER"

step "1/7 sample data: $ROWS training rows and $EVAL_SAMPLES held-out rows in RSICD's Parquet schema"
python diffusion_model/sample_data.py --output "$OUT/rsicd_train.parquet" --num_rows "$ROWS" --seed 0
python diffusion_model/sample_data.py --output "$OUT/rsicd_test.parquet" --num_rows "$EVAL_SAMPLES" --seed 1

step "2/7 tiny random Stable Diffusion pipeline (stands in for SD1.5, which cannot be downloaded here)"
python -m trainer.tiny_model "$OUT/tiny_model"

step "3/7 create.py: Parquet -> 512 px JPEGs + captions.txt"
python diffusion_model/create.py --parquet_path "$OUT/rsicd_train.parquet" --output_dir "$OUT/data"

step "4/7 format.py: captions.txt -> metadata.jsonl"
python diffusion_model/format.py --caption_file "$OUT/data/captions.txt" --output_file "$OUT/data/metadata.jsonl"

step "5/7 train.sh: $STEPS steps at ${RESOLUTION} px on CPU, checkpoints, validation, loss curve"
# The recipe's fp16 and learning rate are for SD1.5 on a GPU; a random tiny model on CPU needs fp32 and a larger
# rate to show a falling loss in a hundred steps. The VAE runs once per image (--cache_latents), not every step.
MODEL_NAME="$OUT/tiny_model" DATA_DIR="$OUT/data" OUTPUT_DIR="$OUT/model" REPORT_TO=tensorboard PUSH_TO_HUB=0 \
  ./train.sh --resolution="$RESOLUTION" --center_crop --random_flip --cache_latents --mixed_precision=no \
  --train_batch_size=4 --gradient_accumulation_steps=1 --learning_rate=1e-4 --max_train_steps="$STEPS" \
  --checkpointing_steps="$((STEPS / 2 > 0 ? STEPS / 2 : 1))" --checkpoints_total_limit=2 \
  --validation_prompt="$PROMPT" --validation_epochs=5 --seed=0

step "6/7 generate.py: 4 prompts x 2 images from the trained pipeline"
python generate.py --model "$OUT/model" --output_dir "$OUT/generated" --seed 0 --num_images_per_prompt 2 --batch_size 4 \
  --height "$RESOLUTION" --width "$RESOLUTION" --num_inference_steps "$SAMPLE_STEPS" \
  --prompt "$PROMPT" --prompt "A satellite image of a river" --prompt "A satellite image of a road" \
  --prompt "A satellite image of ponds and buildings"

step "7/7 evaluate.py: FID and CLIP score on $EVAL_SAMPLES held-out captions (stand-in weights: figures meaningless)"
python -m evaluation.stand_ins "$OUT/eval_models"
python evaluate.py --model "$OUT/model" --parquet_path "$OUT/rsicd_test.parquet" --num_samples "$EVAL_SAMPLES" \
  --inception_weights "$OUT/eval_models/inception_random.pth" --clip_model "$OUT/eval_models/clip_tiny" \
  --output_dir "$OUT/eval" --num_inference_steps "$SAMPLE_STEPS" --resolution "$RESOLUTION" --seed 0 --batch_size 4

checkpoints="$(ls -d "$OUT"/model/checkpoint-* | sort -V)"
last_checkpoint="$(tail -1 <<< "$checkpoints")"
echo
echo "Done. Where everything is:"
echo "  images (create.py):    $OUT/data/rsicd_images/"
echo "  metadata.jsonl:        $OUT/data/metadata.jsonl   (DATA_DIR: $OUT/data)"
echo "  checkpoints:           $(tr '\n' ' ' <<< "$checkpoints")"
echo "  validation images:     $OUT/model/validation/"
echo "  trained pipeline:      $OUT/model"
echo "  loss curve:            $OUT/model/loss_curve.png   (values: $OUT/model/loss_log.csv)"
echo "  generated grid:        $OUT/generated/grid.png   (PNGs + JSON sidecars beside it)"
echo "  evaluation report:     $OUT/eval/eval_report.json   (real vs generated: $OUT/eval/sheet.html)"
echo "Sample a checkpoint:     python generate.py --model $last_checkpoint --prompt \"$PROMPT\" --num_inference_steps 20 --output_dir $OUT/generated_checkpoint"
