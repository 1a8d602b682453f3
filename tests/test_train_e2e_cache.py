"""train_text_to_image.py --cache_latents end to end: same losses as uncached, exact resume, memory modes, token ids.

Four trainer runs (~10 s each), two at a time, shared through module fixtures.
"""

import csv
import shutil
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path; caption_list_dataset is a fixture, imported so this module can use it.
from test_train_e2e import (PROMPT, assert_same_weights, caption_list_command, caption_list_dataset,  # noqa: F401
                            load_weights, run_parallel, succeeded, trainer_command)

CACHE_FLAGS = ["--cache_latents"]
# Caption lists, flips, 2 rows in one batch of 2 (from batch 2 on, the VAE's CPU convolutions return channels_last
# latents where the cache serves contiguous ones: the same noise must be drawn for both), so one step per epoch,
# validation after the first epoch (step 1, mid-training) and the fourth (the last), checkpoint at step 2.
SHARED = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--validation_prompts", PROMPT, "--train_batch_size", 2,
          "--validation_epochs", 3]


def losses(output: Path) -> list:
    """The per-step losses of a run's loss_log.csv."""
    with open(Path(output) / "loss_log.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def cached_command(model, dataset, output, *extra) -> list:
    """caption_list_command's run (v_prediction, min-SNR, offsets, EMA) with a checkpoint at 2, optionally cached."""
    command = caption_list_command(model, dataset, output)
    at = command.index("--max_train_steps")
    del command[at:at + 4]  # its own --max_train_steps 3 --checkpointing_steps 10
    return command + [str(e) for e in (*SHARED, *extra)]


@pytest.fixture(scope="module")
def first_runs(tiny_model_dir, caption_list_dataset, tmp_path_factory) -> dict:
    """The same run uncached and cached: name → (output dir, CompletedProcess)."""
    root = tmp_path_factory.mktemp("cache_first")
    outputs = {"uncached": root / "uncached", "cached": root / "cached"}
    commands = {"uncached": cached_command(tiny_model_dir, caption_list_dataset, outputs["uncached"]),
                "cached": cached_command(tiny_model_dir, caption_list_dataset, outputs["cached"], *CACHE_FLAGS)}
    results = run_parallel(commands)
    return {name: (outputs[name], succeeded(results[name])) for name in commands}


@pytest.fixture(scope="module")
def second_runs(first_runs, tiny_model_dir, tiny_data_dir, caption_list_dataset, tmp_path_factory) -> dict:
    """A copy of the cached run resumed from checkpoint-2, and a cached run (token ids only) through the memory
    modes."""
    root = tmp_path_factory.mktemp("cache_second")
    resumed = root / "resumed"
    shutil.copytree(first_runs["cached"][0], resumed)
    shutil.rmtree(resumed / "unet")
    memory = root / "memory"
    commands = {
        "resumed": cached_command(tiny_model_dir, caption_list_dataset, resumed, *CACHE_FLAGS,
                                  "--resume_from_checkpoint", "checkpoint-2"),
        "memory": trainer_command(tiny_model_dir, tiny_data_dir, memory, "--max_train_steps", 2,
                                  "--gradient_accumulation_steps", 2, "--gradient_checkpointing", "--use_ema",
                                  "--offload_ema", "--foreach_ema", "--use_8bit_adam", "--dataloader_num_workers", 2,
                                  "--checkpointing_steps", 2, "--text_cache", "off", *CACHE_FLAGS),
    }
    results = run_parallel(commands)
    return {"resumed": (resumed, results["resumed"]), "memory": (memory, results["memory"])}


def test_cached_losses_match_uncached(first_runs):
    """Same seed, batches of 2: the cached run's per-step losses equal the uncached run's within float tolerance."""
    uncached, cached = losses(first_runs["uncached"][0]), losses(first_runs["cached"][0])
    assert len(uncached) == len(cached) == 4
    assert cached == pytest.approx(uncached, rel=1e-4, abs=1e-6)


def test_cache_is_built_once_with_both_views_and_all_captions(first_runs):
    """The cache lives under OUTPUT_DIR/.cache/latents: one folder, 2 rows × 2 views, the 4 distinct captions."""
    from safetensors import safe_open

    output, done = first_runs["cached"]
    assert "Building the latent cache" in done.stderr and "encoder batch 2)" in done.stderr  # --train_batch_size
    (folder,) = (output / ".cache" / "latents").iterdir()
    with safe_open(str(folder / "latents-0000000-0000002.safetensors"), framework="pt") as shard:
        assert shard.get_slice("mean").get_shape() == [2, 2, 4, 32, 32]
    with safe_open(str(folder / "captions-0000000-0000004.safetensors"), framework="pt") as shard:
        assert shard.get_slice("states").get_shape()[:2] == [4, 77]
    assert (folder / "index.parquet").is_file() and (folder / "captions.parquet").is_file()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert (output / "validation" / "step-1" / "0.png").is_file()  # mid-run validation with the encoders brought back


def test_resume_with_cache_is_exact_and_reuses_it(first_runs, second_runs):
    """Resumed from checkpoint-2: cache reused, final UNet and EMA bit-identical to the uninterrupted cached run."""
    output, done = second_runs["resumed"]
    succeeded(done)
    assert "Reusing the latent cache" in done.stderr and "Building the latent cache" not in done.stderr
    reference = first_runs["cached"][0]
    assert_same_weights(load_weights(output / "unet"), load_weights(reference / "unet"))
    assert_same_weights(load_weights(output / "checkpoint-4" / "unet_ema"),
                        load_weights(reference / "checkpoint-4" / "unet_ema"))


def test_memory_modes_train_from_the_cache(second_runs):
    """8-bit AdamW, offloaded foreach EMA, gradient checkpointing, 2 workers, --text_cache off (token ids cached,
    text encoder run each step): trains, checkpoints, finite weights."""
    import torch
    from safetensors import safe_open

    output, done = second_runs["memory"]
    succeeded(done)
    assert len(losses(output)) == 2
    assert "--text_cache off" in done.stderr and "caching token ids" in done.stderr
    (folder,) = (output / ".cache" / "latents").iterdir()
    (captions,) = folder.glob("captions-*.safetensors")
    with safe_open(str(captions), framework="pt") as chunk:
        assert list(chunk.keys()) == ["input_ids"] and chunk.get_slice("input_ids").get_dtype() == "I32"
    assert (output / "checkpoint-2" / "unet_ema").is_dir()
    weights = load_weights(output / "unet")
    assert all(torch.isfinite(t).all() for t in weights.values())
