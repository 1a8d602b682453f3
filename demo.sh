#!/usr/bin/env bash
# The whole pipeline on the embedded default, on CPU, with nothing downloaded but the Python packages, measuring
# whether the model learns the caption: a small RSICD-schema Parquet of five distinct scene classes
# (farmland_1.jpg, river_2.jpg, ...) drawn by the project's own code -> create.py -> format.py -> a tiny random
# Stable Diffusion model whose VAE and text encoder are first fitted to the scenes (stand-ins for SD's pretrained
# ones; the UNet stays random) -> ./train.sh (16 px) -> generate.py -> evaluate.py on the untrained base and on the
# fine-tuned model, same held-out captions: scene accuracy (does each image show its caption's class?) before and
# after. The evaluation's Inception and CLIP are random stand-ins, so FID and CLIP score only show the plumbing
# works; the scene accuracies compare the two models on the same features.
# Usage: ./demo.sh [OUT]   (default OUT: demo_output; a previous demo's OUT is replaced, any other non-empty
# folder is refused)
#        ./demo.sh --control [OUT]   the ControlNet demo instead: scripts/demo_control.sh (a ControlNet trained on
# class masks, its control mIoU against the untrained ControlNet's and the shuffled floor; default OUT
# demo_control_output)
# Sizes, from the environment: DEMO_ROWS (training rows, 100), DEMO_STEPS (optimizer steps, 300),
# DEMO_RESOLUTION (training and sampling size, 16), DEMO_SAMPLE_STEPS (denoising steps, 20),
# DEMO_EVAL_SAMPLES (held-out captions evaluated, 40), DEMO_VAE_STEPS (VAE fitting steps, 150),
# DEMO_TEXT_STEPS (text-encoder fitting steps, 150).
# DEMO_METADATA=1: each scene class is drawn at DEMO_GSD_LEVELS (4) ground sample distances, the fine-tune is
# conditioned on the GSD (--metadata_fields gsd), and evaluate.py also measures whether the images follow the GSD
# asked for (a sweep's Spearman rho for the base and the fine-tuned model, with its shuffled floor).
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == --control ]]; then
  shift
  exec scripts/demo_control.sh "$@"
fi
scripts/setup_env.sh
. .venv/bin/activate

OUT="${1:-demo_output}"
ROWS="${DEMO_ROWS:-100}"
STEPS="${DEMO_STEPS:-300}"
RESOLUTION="${DEMO_RESOLUTION:-16}"
SAMPLE_STEPS="${DEMO_SAMPLE_STEPS:-20}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-40}"
VAE_STEPS="${DEMO_VAE_STEPS:-150}"
TEXT_STEPS="${DEMO_TEXT_STEPS:-150}"
METADATA="${DEMO_METADATA:-0}"
GSD_LEVELS="${DEMO_GSD_LEVELS:-4}"
# With metadata: scenes at several GSDs, the GSD read from their column, trained on, and measured on a held-out
# create.py folder (it carries each row's GSD as the training folder does).
sample_args=() create_args=() train_args=() eval_source=(--parquet_path "$OUT/rsicd_test.parquet")
if [[ "$METADATA" == 1 ]]; then
  sample_args=(--gsd_levels "$GSD_LEVELS")
  create_args=(--metadata_columns gsd=gsd)
  train_args=(--metadata_fields gsd)
  eval_source=(--data_dir "$OUT/test_data" --gsd_probe_data "$OUT/data" --gsd_sweep_rows 5)
fi
# Guidance off: the tiny base never learnt an unconditional image (SD1.5 did, hence its 7.5), so guiding away from
# it only adds noise.
GUIDANCE=1
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
# A step that fails stops the demo; its background steps stop with it.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

step "1/7 sample data: $ROWS training rows and $EVAL_SAMPLES held-out rows in RSICD's Parquet schema, 5 scene classes"
python diffusion_model/sample_data.py --output "$OUT/rsicd_train.parquet" --num_rows "$ROWS" --seed 0 \
  "${sample_args[@]}"
python diffusion_model/sample_data.py --output "$OUT/rsicd_test.parquet" --num_rows "$EVAL_SAMPLES" --seed 1 \
  "${sample_args[@]}"

step "2/7 create.py: Parquet -> 512 px JPEGs + captions.txt"
python diffusion_model/create.py --parquet_path "$OUT/rsicd_train.parquet" --output_dir "$OUT/data" "${create_args[@]}"
if [[ "$METADATA" == 1 ]]; then
  python diffusion_model/create.py --parquet_path "$OUT/rsicd_test.parquet" --output_dir "$OUT/test_data" \
    "${create_args[@]}"
fi

step "3/7 format.py: captions.txt -> metadata.jsonl"
python diffusion_model/format.py --caption_file "$OUT/data/captions.txt" --output_file "$OUT/data/metadata.jsonl"
if [[ "$METADATA" == 1 ]]; then
  python diffusion_model/format.py --caption_file "$OUT/test_data/captions.txt" \
    --output_file "$OUT/test_data/metadata.jsonl"
fi

step "4/7 tiny random Stable Diffusion pipeline (stands in for SD1.5, which cannot be downloaded here), its VAE and text encoder fitted to the scenes"
# SD fine-tuning keeps a pretrained VAE and text encoder. Random ones decode everything to noise and give every
# caption nearly the same states, so they get a short stand-in for that pretraining ($VAE_STEPS and $TEXT_STEPS steps);
# the UNet stays random, so the base draws no scene from its caption.
python -m stand_in.tiny_model "$OUT/tiny_model" --fit_data "$OUT/data" --fit_resolution "$RESOLUTION" \
  --vae_steps "$VAE_STEPS" --text_steps "$TEXT_STEPS"

# --shared_seed: every held-out caption drawn from the same seed, so images differ only by their caption; the
# caption-blind base then scores chance exactly, where per-row seeds give it 0.2, 0.4 or more by luck at this N.
evaluate_model() {  # evaluate_model NAME MODEL_DIR: evaluate.py on the held-out captions into $OUT/eval_NAME
  python evaluate.py --model "$2" "${eval_source[@]}" --num_samples "$EVAL_SAMPLES" \
    --inception_weights "$OUT/eval_models/inception_random.pth" --clip_model "$OUT/eval_models/clip_tiny" \
    --output_dir "$OUT/eval_$1" --num_inference_steps "$SAMPLE_STEPS" --resolution "$RESOLUTION" --seed 0 \
    --batch_size 8 --guidance_scale "$GUIDANCE" --shared_seed
}

finish() {  # finish PID LOG WHAT: wait for a background step; on failure show its log and stop
  if ! wait "$1"; then
    cat "$2" >&2
    echo "demo.sh: error: $3 failed (log above: $2)" >&2
    exit 1
  fi
}

step "5/7 evaluate.py on the untrained base, in the background while the fine-tune trains (log: $OUT/eval_base.log)"
# Random stand-in Inception and CLIP: FID and CLIP score only show the plumbing; scene accuracy compares the two
# models on the same features, so before vs after means something even with them. Much of an evaluation is start-up
# on one core, so it overlaps the training well.
# One thread: two multi-threaded torch processes on the same cores spin against each other and both crawl.
(export OMP_NUM_THREADS=1; python -m evaluation.stand_ins "$OUT/eval_models" && evaluate_model base "$OUT/tiny_model") \
  > "$OUT/eval_base.log" 2>&1 &
base_eval=$!

step "6/7 train.sh: $STEPS steps at ${RESOLUTION} px on CPU, checkpoints, validation and its progress picture"
# The recipe's fp16, batch and learning rate are for SD1.5 on a GPU; a random tiny UNet on CPU needs fp32, a larger
# batch (per-step overhead dominates at 16 px, so 32 images cost little more than 8) and a far larger rate to learn
# five scenes in a few hundred steps. The VAE runs once per image (--cache_latents).
BATCH=32
EPOCHS=$(( (STEPS + (ROWS + BATCH - 1) / BATCH - 1) / ((ROWS + BATCH - 1) / BATCH) ))
MODEL_NAME="$OUT/tiny_model" DATA_DIR="$OUT/data" OUTPUT_DIR="$OUT/model" REPORT_TO=tensorboard PUSH_TO_HUB=0 \
  ./train.sh --resolution="$RESOLUTION" --center_crop --random_flip --cache_latents --mixed_precision=no \
  --train_batch_size="$BATCH" --gradient_accumulation_steps=1 --learning_rate=2e-3 --max_train_steps="$STEPS" \
  --checkpointing_steps="$((STEPS / 2 > 0 ? STEPS / 2 : 1))" --checkpoints_total_limit=2 \
  --validation_prompts "${PROMPTS[@]}" --validation_guidance_scale "$GUIDANCE" \
  --validation_epochs="$(( EPOCHS / 3 > 0 ? EPOCHS / 3 : 1 ))" --seed=0 "${train_args[@]}"

step "7/7 generate.py (${#PROMPTS[@]} prompts, one per scene class, x 2 images; log: $OUT/generate.log) and evaluate.py on the fine-tuned model, same $EVAL_SAMPLES held-out captions"
prompt_args=()
for prompt in "${PROMPTS[@]}"; do prompt_args+=(--prompt "$prompt"); done
OMP_NUM_THREADS=1 python generate.py --model "$OUT/model" --output_dir "$OUT/generated" --seed 0 \
  --num_images_per_prompt 2 --batch_size 5 --height "$RESOLUTION" --width "$RESOLUTION" \
  --num_inference_steps "$SAMPLE_STEPS" --guidance_scale "$GUIDANCE" "${prompt_args[@]}" > "$OUT/generate.log" 2>&1 &
generating=$!
finish "$base_eval" "$OUT/eval_base.log" "evaluating the base"
evaluate_model model "$OUT/model"
finish "$generating" "$OUT/generate.log" "generate.py"
echo
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
