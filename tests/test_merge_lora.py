"""merge_lora.py end to end: a LoRA run fused into its base is a full pipeline drawing the LoRA's pixels."""

import numpy as np
import torch

from inference.pipeline import generate, load_pipeline


def draw(pipeline):
    """One seeded 16 px image as an array."""
    image = generate(pipeline, ["a field"], [0], negative_prompt=None, num_inference_steps=2, guidance_scale=7.5,
                     height=16, width=16)[0]
    return np.asarray(image).astype(int)


def test_merged_pipeline_draws_what_base_plus_lora_draws(run_script, lora_run_dir, tmp_path):
    """Fused at --lora_scale 0.5, the saved pipeline matches base + adapters at 0.5 (to a pixel level)."""
    merged = tmp_path / "merged"
    done = run_script("merge_lora.py", ["--model", lora_run_dir, "--output_dir", merged, "--lora_scale", 0.5],
                      timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (merged / "model_index.json").is_file() and not list(merged.rglob("*lora*"))
    torch.set_num_threads(1)
    fused = draw(load_pipeline(str(merged), None, "cpu", torch.float32))
    unfused = draw(load_pipeline(str(lora_run_dir), None, "cpu", torch.float32, lora_scale=0.5))
    full = draw(load_pipeline(str(lora_run_dir), None, "cpu", torch.float32))
    assert np.abs(fused - unfused).max() <= 1 and np.abs(fused - full).max() > 1


def test_refusals_are_one_line(run_script, lora_run_dir, tiny_model_dir, tmp_path):
    """An existing --output_dir, or a --model without LoRA weights: exit 2, one line, nothing written."""
    (tmp_path / "exists").mkdir()
    for args, message in ((["--model", lora_run_dir, "--output_dir", tmp_path / "exists"], "already exists"),
                          (["--model", tiny_model_dir, "--output_dir", tmp_path / "new"], "no LoRA weights")):
        done = run_script("merge_lora.py", args, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "new").exists()
