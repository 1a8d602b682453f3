#!/usr/bin/env bash
# The whole pipeline on the embedded default, on CPU, with nothing downloaded but the Python packages, measuring
# whether the model learns the caption: a small RSICD-schema Parquet of five distinct scene classes
# (farmland_1.jpg, river_2.jpg, ...) drawn by the project's own code -> a tiny random Stable Diffusion model
# whose VAE is first fitted to the scenes (a random VAE decodes everything to noise) -> create.py -> format.py
# -> ./train.sh (tiny model, 32 px) -> generate.py -> evaluate.py on the untrained base and on the fine-tuned
# model, same held-out captions: scene accuracy (does each image show its caption's class?) before and after
# (README: at these sizes the fine-tuned model does not yet beat chance; more steps are needed). The evaluation's
# Inception and CLIP are random stand-ins, so FID and CLIP score only show the plumbing works.
# Usage: ./demo.sh [OUT]   (default OUT: demo_output; a previous demo's OUT is replaced, any other non-empty
# folder is refused)
# Sizes, from the environment: DEMO_ROWS (training rows, 100), DEMO_STEPS (optimizer steps, 300),
# DEMO_RESOLUTION (training and sampling size, 32), DEMO_SAMPLE_STEPS (denoising steps, 20),
# DEMO_EVAL_SAMPLES (held-out captions evaluated, 40), DEMO_VAE_STEPS (VAE fitting steps, 150).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
. .venv/bin/activate

OUT="${1:-demo_output}"
ROWS="${DEMO_ROWS:-100}"
STEPS="${DEMO_STEPS:-300}"
RESOLUTION="${DEMO_RESOLUTION:-32}"
SAMPLE_STEPS="${DEMO_SAMPLE_STEPS:-20}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-40}"
VAE_STEPS="${DEMO_VAE_STEPS:-150}"
# Captions in the training data's words, one per scene class: the model learns only these words.
PROMPTS=("an aerial view of green fields ." "an aerial view of a wide winding river and green fields ."
         "an aerial view of several large dark ponds ." "an aerial view of many dense buildings and a straight road ."
         "an aerial view of some bare sandy land and a straight road .")
PROMPT="${PROMPTS[0]}"
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

step "1/8 sample data: $ROWS training rows and $EVAL_SAMPLES held-out rows in RSICD's Parquet schema, 5 scene classes"
python diffusion_model/sample_data.py --output "$OUT/rsicd_train.parquet" --num_rows "$ROWS" --seed 0
python diffusion_model/sample_data.py --output "$OUT/rsicd_test.parquet" --num_rows "$EVAL_SAMPLES" --seed 1

step "2/8 tiny random Stable Diffusion pipeline (stands in for SD1.5, which cannot be downloaded here)"
python -m trainer.tiny_model "$OUT/tiny_model"

step "3/8 create.py: Parquet -> 512 px JPEGs + captions.txt"
python diffusion_model/create.py --parquet_path "$OUT/rsicd_train.parquet" --output_dir "$OUT/data"

step "4/8 format.py: captions.txt -> metadata.jsonl"
python diffusion_model/format.py --caption_file "$OUT/data/captions.txt" --output_file "$OUT/data/metadata.jsonl"

step "5/8 fit the tiny model's random VAE to the scenes ($VAE_STEPS steps), so what the UNet learns decodes to pictures"
python -m trainer.vae_fit "$OUT/tiny_model" "$OUT/data/rsicd_images" --resolution "$RESOLUTION" --steps "$VAE_STEPS"

step "6/8 train.sh: $STEPS steps at ${RESOLUTION} px on CPU, checkpoints, validation and its progress picture"
# The recipe's fp16 and learning rate are for SD1.5 on a GPU; a random tiny model on CPU needs fp32 and a far
# larger rate to learn five scenes in a few hundred steps. The VAE runs once per image (--cache_latents).
BATCH=8
EPOCHS=$(( (STEPS + (ROWS + BATCH - 1) / BATCH - 1) / ((ROWS + BATCH - 1) / BATCH) ))
MODEL_NAME="$OUT/tiny_model" DATA_DIR="$OUT/data" OUTPUT_DIR="$OUT/model" REPORT_TO=tensorboard PUSH_TO_HUB=0 \
  ./train.sh --resolution="$RESOLUTION" --center_crop --random_flip --cache_latents --mixed_precision=no \
  --train_batch_size="$BATCH" --gradient_accumulation_steps=1 --learning_rate=1e-3 --max_train_steps="$STEPS" \
  --checkpointing_steps="$((STEPS / 2 > 0 ? STEPS / 2 : 1))" --checkpoints_total_limit=2 \
  --validation_prompts "${PROMPTS[@]}" --validation_epochs="$(( EPOCHS / 4 > 0 ? EPOCHS / 4 : 1 ))" --seed=0

step "7/8 generate.py: ${#PROMPTS[@]} prompts (one per scene class) x 2 images from the trained pipeline"
prompt_args=()
for prompt in "${PROMPTS[@]}"; do prompt_args+=(--prompt "$prompt"); done
python generate.py --model "$OUT/model" --output_dir "$OUT/generated" --seed 0 --num_images_per_prompt 2 \
  --batch_size 5 --height "$RESOLUTION" --width "$RESOLUTION" --num_inference_steps "$SAMPLE_STEPS" "${prompt_args[@]}"

step "8/8 evaluate.py: the untrained base, then the fine-tuned model, on the same $EVAL_SAMPLES held-out captions"
# Random stand-in Inception and CLIP: FID and CLIP score only show the plumbing; scene accuracy compares the two
# models on the same features, so before vs after means something even with them.
python -m evaluation.stand_ins "$OUT/eval_models"
for model in base model; do
  model_dir="$OUT/model"
  [[ "$model" == base ]] && model_dir="$OUT/tiny_model"
  python evaluate.py --model "$model_dir" --parquet_path "$OUT/rsicd_test.parquet" --num_samples "$EVAL_SAMPLES" \
    --inception_weights "$OUT/eval_models/inception_random.pth" --clip_model "$OUT/eval_models/clip_tiny" \
    --output_dir "$OUT/eval_$model" --num_inference_steps "$SAMPLE_STEPS" --resolution "$RESOLUTION" --seed 0 \
    --batch_size 8
done
python -m evaluation.compare "untrained base=$OUT/eval_base/eval_report.json" \
  "fine-tuned=$OUT/eval_model/eval_report.json"

checkpoints="$(ls -d "$OUT"/model/checkpoint-* | sort -V)"
last_checkpoint="$(tail -1 <<< "$checkpoints")"
echo
echo "Done. Where everything is:"
echo "  images (create.py):    $OUT/data/rsicd_images/"
echo "  metadata.jsonl:        $OUT/data/metadata.jsonl   (DATA_DIR: $OUT/data)"
echo "  checkpoints:           $(tr '\n' ' ' <<< "$checkpoints")"
echo "  validation images:     $OUT/model/validation/"
echo "  training progress:     $OUT/model/validation_progress.png   (base model first, then each validation)"
echo "  trained pipeline:      $OUT/model"
echo "  loss curve:            $OUT/model/loss_curve.png   (values: $OUT/model/loss_log.csv)"
echo "  generated grid:        $OUT/generated/grid.png   (PNGs + JSON sidecars beside it)"
echo "  evaluation report:     $OUT/eval_model/eval_report.json   (real vs generated: $OUT/eval_model/sheet.html)"
echo "  base model's report:   $OUT/eval_base/eval_report.json"
echo "Sample a checkpoint:     python generate.py --model $last_checkpoint --prompt \"$PROMPT\" --num_inference_steps 20 --output_dir $OUT/generated_checkpoint"
