#!/usr/bin/env bash
# The main job on the embedded default, on CPU, with nothing to download but the Python packages:
# generate a small RSICD-schema Parquet sample, then create.py (Parquet -> 512 px JPEGs + captions.txt)
# and format.py (captions.txt -> metadata.jsonl). Output goes to demo_output/ (or $1).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
. .venv/bin/activate
OUT="${1:-demo_output}"
mkdir -p "$OUT"
python diffusion_model/sample_data.py --output "$OUT/rsicd_sample.parquet" --num_rows 64
python diffusion_model/create.py --parquet_path "$OUT/rsicd_sample.parquet" --output_dir "$OUT/data"
python diffusion_model/format.py --caption_file "$OUT/data/captions.txt" --output_file "$OUT/data/metadata.jsonl"
echo
echo "images:         $OUT/data/rsicd_images/"
echo "captions:       $OUT/data/captions.txt"
echo "metadata:       $OUT/data/metadata.jsonl   (DATA_DIR for training: $OUT/data)"
echo "create report:  $OUT/data/create_report.json"
