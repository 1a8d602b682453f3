#!/usr/bin/env bash
# ControlNet from masks on the embedded default, on CPU, offline, measuring whether the images obey their masks:
# scenes drawn from random class layouts with their class masks (sample_data.py --masks) -> create.py + format.py
# (one training folder, one held-out folder) -> the tiny random Stable Diffusion pipeline, its VAE and text encoder
# fitted to the scenes -> train_text_to_image.py fine-tunes its UNet on the scenes (a base that can draw them, as
# SD1.5 can draw aerial views before anyone trains a ControlNet on it) -> train_controlnet.py (16 px) beside that
# frozen base, and the same with --max_train_steps 0 for the untrained ControlNet -> evaluate.py --controlnet on the
# held-out masks for both: control mIoU from a segmenter fitted on the real training pairs, with the real images'
# mIoU (ceiling) and the images drawn from shuffled masks (floor).
# Usage: ./demo.sh --control [OUT] or scripts/demo_control.sh [OUT]   (default OUT: demo_control_output; a previous
# demo's OUT is replaced, any other non-empty folder is refused)
# Sizes, from the environment: DEMO_ROWS (training rows, 96), DEMO_BASE_STEPS (the base's fine-tuning steps, 300),
# DEMO_STEPS (ControlNet steps, 300), DEMO_RESOLUTION (training and sampling size, 16), DEMO_SAMPLE_STEPS (denoising
# steps, 20), DEMO_EVAL_SAMPLES (held-out masks, 24), DEMO_VAE_STEPS (VAE fitting steps, 400), DEMO_TEXT_STEPS
# (text-encoder fitting steps, 50).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
. .venv/bin/activate

OUT="${1:-demo_control_output}"
ROWS="${DEMO_ROWS:-96}"
BASE_STEPS="${DEMO_BASE_STEPS:-300}"
STEPS="${DEMO_STEPS:-300}"
RESOLUTION="${DEMO_RESOLUTION:-16}"
SAMPLE_STEPS="${DEMO_SAMPLE_STEPS:-20}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-24}"
VAE_STEPS="${DEMO_VAE_STEPS:-400}"
TEXT_STEPS="${DEMO_TEXT_STEPS:-50}"
CLASSES=5  # sample_data.py's layout classes: bare land, fields, water, buildings, road
# Guidance off, as in demo.sh: the tiny base never learnt an unconditional image.
GUIDANCE=1
# CPU-sized settings for both trainers, as demo.sh's: fp32, batch 32 (per-step overhead dominates at 16 px), a rate
# far above SD1.5's recipe (a tiny net learning in a few hundred steps), cached latents.
TRAIN_ARGS=(--train_data_dir "$OUT/train" --resolution "$RESOLUTION" --random_flip --cache_latents
            --mixed_precision no --train_batch_size 32 --learning_rate 2e-3 --seed 0 --report_to tensorboard
            --checkpointing_steps 100000)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

step() {
  echo
  echo "=== $*"
}

MARKER=.rsdiff_demo_control_output
if [[ -d "$OUT" && -n "$(ls -A "$OUT")" ]]; then
  if [[ ! -f "$OUT/$MARKER" ]]; then
    echo "demo_control.sh: error: '$OUT' is a non-empty folder not made by this demo; pass another OUT." >&2
    exit 2
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
touch "$OUT/$MARKER"

step "1/7 sample data: $ROWS training and $EVAL_SAMPLES held-out scenes from random class layouts, with their masks"
python diffusion_model/sample_data.py --output "$OUT/train.parquet" --num_rows "$ROWS" --seed 0 --masks
python diffusion_model/sample_data.py --output "$OUT/test.parquet" --num_rows "$EVAL_SAMPLES" --seed 1 --masks

step "2/7 create.py + format.py: images, masks (conditioning_images/) and metadata.jsonl, training and held-out"
for split in train test; do
  python diffusion_model/create.py --parquet_path "$OUT/$split.parquet" --output_dir "$OUT/$split" \
    --resolution $((RESOLUTION * 4)) --conditioning_column mask --conditioning_type mask --num_classes "$CLASSES"
  python diffusion_model/format.py --caption_file "$OUT/$split/captions.txt" --output_file "$OUT/$split/metadata.jsonl"
done

step "3/7 tiny random Stable Diffusion pipeline, its VAE and text encoder fitted to the scenes (the UNet stays random)"
python -m stand_in.tiny_model "$OUT/tiny_model" --fit_data "$OUT/train" --fit_resolution "$RESOLUTION" \
  --vae_steps "$VAE_STEPS" --text_steps "$TEXT_STEPS"

step "4/7 train_text_to_image.py: the base's UNet learns to draw the scenes (v-prediction), $BASE_STEPS steps at $RESOLUTION px"
# A ControlNet steers a base that can already draw; SD1.5 can, the random tiny UNet cannot (a ControlNet trained
# beside it scored barely above the shuffled floor). v-prediction, as SD 2.1 uses: the layout is settled in the
# noisiest steps, where an epsilon loss barely sees the image and a v loss sees mostly the image; with epsilon the
# ControlNet stayed near 0.3 control mIoU however it was trained (docs/demo.md). The ControlNet trains with the
# base's own prediction type, read from its scheduler.
python train_text_to_image.py --pretrained_model_name_or_path "$OUT/tiny_model" --output_dir "$OUT/base" \
  --center_crop --prediction_type v_prediction --max_train_steps "$BASE_STEPS" "${TRAIN_ARGS[@]}"

evaluate_controlnet() {  # evaluate_controlnet NAME CONTROLNET_DIR: evaluate.py --controlnet into $OUT/eval_NAME
  python evaluate.py --model "$OUT/base" --controlnet "$2" --data_dir "$OUT/test" \
    --inception_weights "$OUT/eval_models/inception_random.pth" --clip_model "$OUT/eval_models/clip_tiny" \
    --output_dir "$OUT/eval_$1" --num_inference_steps "$SAMPLE_STEPS" --resolution "$RESOLUTION" --seed 0 \
    --batch_size 8 --guidance_scale "$GUIDANCE"
}

train_controlnet() {  # train_controlnet OUTPUT_DIR STEPS: train_controlnet.py beside the fine-tuned base
  python train_controlnet.py --pretrained_model_name_or_path "$OUT/base" --output_dir "$1" --max_train_steps "$2" \
    "${TRAIN_ARGS[@]}"
}

# One step at a time: a job in the background made the training beside it 5x slower on 2 cores (threads of two torch
# processes spinning against each other), more than the overlap saved.
step "5/7 the untrained ControlNet: train_controlnet.py --max_train_steps 0 (zero outputs, so it draws what the base draws), evaluate.py --controlnet on the $EVAL_SAMPLES held-out masks"
python -m evaluation.stand_ins "$OUT/eval_models"
train_controlnet "$OUT/controlnet_untrained" 0
evaluate_controlnet untrained "$OUT/controlnet_untrained"

step "6/7 train_controlnet.py: $STEPS steps at $RESOLUTION px beside the frozen base"
train_controlnet "$OUT/controlnet" "$STEPS"

step "7/7 evaluate.py --controlnet on the same held-out masks: the trained ControlNet"
evaluate_controlnet trained "$OUT/controlnet"
echo
# Both reports score the same held-out masks; the shuffled floor and the real ceiling are per report (the floor is
# drawn by each ControlNet: for the untrained one it is the same as its own figure, give or take the seeds).
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'':22}{'control mIoU':>14}{'pixel acc.':>12}{'shuffled (floor)':>18}{'real (ceiling)':>16}")
for name in ("untrained", "trained"):
    r = json.load(open(f"{out}/eval_{name}/eval_report.json"))
    print(f"{name + ' ControlNet':22}{r['control_miou']:>14.3f}{r['control_pixel_accuracy']:>12.3f}"
          f"{r['control_miou_shuffled']:>18.3f}{r['control_miou_real']:>16.3f}")
print("control mIoU: a segmenter fitted on the real training pairs labels each generated image, against its mask; "
      "floor: images drawn from another row's mask; ceiling: the real held-out images")
PY
echo
echo "Done. Where everything is:"
echo "  training folder:       $OUT/train   (images, conditioning_images/, metadata.jsonl, conditioning.json)"
echo "  base (fine-tuned):     $OUT/base"
echo "  trained ControlNet:    $OUT/controlnet   (config.json, weights, conditioning.json)"
echo "  untrained ControlNet:  $OUT/controlnet_untrained"
echo "  reports:               $OUT/eval_trained/eval_report.json, $OUT/eval_untrained/eval_report.json"
echo "  masks, real, generated: $OUT/eval_trained/sheet.html"
echo "Sample it:               python generate.py --model $OUT/base --controlnet $OUT/controlnet --control_image $OUT/test/conditioning_images --prompt \"an aerial view of bare land and water .\" --height $RESOLUTION --width $RESOLUTION --num_inference_steps $SAMPLE_STEPS --guidance_scale $GUIDANCE --output_dir $OUT/generated"
