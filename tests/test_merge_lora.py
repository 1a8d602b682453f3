"""merge_lora.py end to end: a LoRA run fused into its base is a full pipeline drawing the LoRA's pixels."""

import numpy as np
import torch

from inference.pipeline import generate, load_pipeline


def draw(pipeline, metadata=None):
    """One seeded 16 px image as an array (with metadata={...} for a model trained with them)."""
    image = generate(pipeline, ["a field"], [0], negative_prompt=None, num_inference_steps=2, guidance_scale=7.5,
                     height=16, width=16, conditioning={"metadata": metadata} if metadata else None)[0]
    return np.asarray(image).astype(int)


def test_merged_pipeline_draws_what_base_plus_lora_draws(run_script, lora_run_dir, tmp_path):
    """Fused at --lora_scale 0.5, the saved pipeline matches base + adapters at 0.5 (to a pixel level)."""
    merged = tmp_path / "merged"
    done = run_script("merge_lora.py", ["--model", lora_run_dir, "--output_dir", merged, "--lora_scale", 0.5],
                      timeout=300, cold=True)  # merge_lora.py's one run with its own imports (tests/warm.py)
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


def test_metadata_lora_merges_into_a_stock_unet_that_takes_the_metadata(lora_metadata_run_dir, tmp_path):
    """A LoRA run with a metadata embedding: the merged UNet has the stock keys and the trained embedding, loads in
    UNet2DConditionModel.from_pretrained, carries metadata_spec.json, and draws what base + LoRA + embedding draw,
    with metadata and without (which differ)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    import merge_lora
    from test_generate import restored_process_state
    from trainer.metadata import read_spec

    merged = tmp_path / "merged"
    with restored_process_state():  # merge_lora.py's main in this process: a process would cost seconds of imports
        torch.set_num_threads(1)
        assert merge_lora.main(["--model", str(lora_metadata_run_dir), "--output_dir", str(merged)]) == 0
    spec = read_spec(lora_metadata_run_dir)
    assert read_spec(merged / "unet") == spec
    unet = UNet2DConditionModel.from_pretrained(merged / "unet")
    assert unet.config.class_embed_type == "projection"
    assert unet.config.projection_class_embeddings_input_dim == spec.dim
    trained = load_file(str(lora_metadata_run_dir / "metadata_embedding.safetensors"))
    assert all(torch.equal(unet.state_dict()[key], value) for key, value in trained.items())
    fused = load_pipeline(str(merged), None, "cpu", torch.float32)
    unfused = load_pipeline(str(lora_metadata_run_dir), None, "cpu", torch.float32)
    metadata = {"gsd": 0.5, "lat": 37.77, "lon": -122.42, "date": "2021-07-01"}
    with_metadata, without = draw(fused, metadata), draw(fused)
    assert np.abs(with_metadata - draw(unfused, metadata)).max() <= 1 and np.abs(without - draw(unfused)).max() <= 1
    assert np.abs(with_metadata - without).max() > 1
