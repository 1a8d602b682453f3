"""The trainer in bf16 mixed precision on the CPU, as users run it: checkpoints, EMA, exact resume, the latent
cache, validation images, and a final pipeline in fp32; also through train.sh (accelerate launch).

Five trainer runs (~10-15 s each; two through train.sh), two at a time where they are independent, shared
through a module fixture.
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# pytest puts tests/ on sys.path; caption_list_dataset is a fixture, imported so this module can use it.
from test_train_e2e import (PROMPT, assert_same_weights, caption_list_dataset, checkpoints,  # noqa: F401
                            load_weights, run_command, run_parallel, succeeded, trainer_command)
from test_train_e2e_cache import losses
from utils.quiet import NOTICES

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO_ROOT / "train.sh"
# Caption lists, 2 rows (2 steps per epoch: validation after epoch 0, at step 2, runs in bf16), EMA, flips.
BF16_FLAGS = ["--mixed_precision", "bf16", "--max_train_samples", 2, "--caption_column", "captions", "--use_ema",
              "--max_train_steps", 4, "--checkpointing_steps", 2, "--validation_prompts", PROMPT,
              "--validation_epochs", 1]
# bf16 matmuls and convolutions are emulated on CPUs without native bf16 (slow: a 20-step validation at 64 px takes
# ~30 s), and nothing checked here depends on the size: train and validate at 16 px.
BF16_RESOLUTION = 16
# bf16 keeps 8 bits of mantissa: cached and uncached latents come from differently batched VAE calls.
BF16_LOSS_TOLERANCE = 2e-2


def bf16_command(model, dataset, output, *extra) -> list:
    """The bf16 run on the caption-list dataset, at BF16_RESOLUTION."""
    command = trainer_command(model, "unused", output, *BF16_FLAGS, *extra)
    command[command.index("--resolution") + 1] = str(BF16_RESOLUTION)
    at = command.index("--train_data_dir")
    command[at:at + 2] = ["--dataset_name", str(dataset)]
    return command


def safetensors_dtypes(path: Path) -> set:
    """The dtypes of every tensor in a safetensors file, read from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {handle.get_slice(key).get_dtype() for key in handle.keys()}


def assert_fp32_pipeline(output: Path) -> None:
    """Every weight file of the saved pipeline holds float32 tensors only."""
    files = sorted(output.glob("*/*.safetensors"))
    assert {p.parent.name for p in files} >= {"unet", "vae", "text_encoder"}, files
    for path in files:
        assert safetensors_dtypes(path) == {"F32"}, path


@pytest.fixture(scope="module")
def bf16_runs(tiny_model_dir, tiny_data_dir, caption_list_dataset, tmp_path_factory) -> dict:
    """The bf16 run uncached and cached; then the uncached one resumed from checkpoint-2 (a copy), next to a first
    train.sh run (2 steps) that test_train_sh_bf16_... resumes."""
    root = tmp_path_factory.mktemp("bf16")
    outputs = {"uncached": root / "uncached", "cached": root / "cached", "resumed": root / "resumed",
               "train_sh": root / "train_sh"}
    results = run_parallel({
        "uncached": bf16_command(tiny_model_dir, caption_list_dataset, outputs["uncached"]),
        "cached": bf16_command(tiny_model_dir, caption_list_dataset, outputs["cached"], "--cache_latents"),
    })
    succeeded(results["uncached"])
    shutil.copytree(outputs["uncached"], outputs["resumed"])
    shutil.rmtree(outputs["resumed"] / "unet")
    with ThreadPoolExecutor(max_workers=2) as pool:
        resumed = pool.submit(run_command, bf16_command(tiny_model_dir, caption_list_dataset, outputs["resumed"],
                                                        "--resume_from_checkpoint", "checkpoint-2"))
        first = pool.submit(run_train_sh, tiny_model_dir, tiny_data_dir, outputs["train_sh"], "--max_train_steps=2")
        results["resumed"], results["train_sh"] = resumed.result(), first.result()
    return {name: (outputs[name], results[name]) for name in outputs}


def test_bf16_checkpoints_ema_and_fp32_pipeline(bf16_runs):
    """Checkpoints with EMA; the shipped UNet is the EMA one; every saved weight is float32 whatever bf16 trained."""
    output, done = bf16_runs["uncached"]
    succeeded(done)
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}
    assert_same_weights(load_weights(output / "unet"), load_weights(output / "checkpoint-4" / "unet_ema"))
    trained = load_weights(output / "checkpoint-4" / "unet")
    assert any(not torch.equal(trained[k], v) for k, v in load_weights(output / "unet").items()), "EMA did nothing"
    assert_fp32_pipeline(output)
    for model in ("unet", "unet_ema"):
        assert safetensors_dtypes(output / "checkpoint-4" / model / "diffusion_pytorch_model.safetensors") == {"F32"}
    assert all(np.isfinite(losses(output)))


def test_bf16_validation_images_are_not_blank(bf16_runs):
    """The mid-run validation (bf16 autocast, bf16 VAE) and the final one give images with content (a NaN decodes
    to a constant image)."""
    output, done = bf16_runs["uncached"]
    succeeded(done)
    for step in (2, 4):
        pixels = np.asarray(Image.open(output / "validation" / f"step-{step}" / "0.png"), dtype=np.float32)
        assert np.isfinite(pixels).all() and pixels.std() > 1.0, f"step {step}: a constant image"


def test_bf16_cached_losses_match_uncached(bf16_runs):
    """Same seed, cached or not: the per-step losses agree within bf16's precision."""
    for name in ("uncached", "cached"):
        succeeded(bf16_runs[name][1])
    uncached, cached = losses(bf16_runs["uncached"][0]), losses(bf16_runs["cached"][0])
    assert len(uncached) == len(cached) == 4
    assert cached == pytest.approx(uncached, rel=BF16_LOSS_TOLERANCE)
    assert_fp32_pipeline(bf16_runs["cached"][0])


def test_bf16_resume_is_exact(bf16_runs):
    """Resumed from checkpoint-2, step 4's UNet and EMA are bit-identical to the uninterrupted run's."""
    output, done = bf16_runs["resumed"]
    succeeded(done)
    assert "starting at step 2" in done.stderr
    reference = bf16_runs["uncached"][0]
    for model in ("unet", "unet_ema"):
        assert_same_weights(load_weights(output / "checkpoint-4" / model),
                            load_weights(reference / "checkpoint-4" / model))
    assert_same_weights(load_weights(output / "unet"), load_weights(reference / "unet"))
    assert losses(output) == losses(reference)


def run_train_sh(tiny_model_dir, tiny_data_dir, output, *extra) -> subprocess.CompletedProcess:
    """train.sh with the real accelerate launch on the tiny model at 16 px, tensorboard, no push, a fresh HOME."""
    home = Path(output).parent / f"{Path(output).name}-home"
    home.mkdir(exist_ok=True)
    # No accelerate settings or config from the caller: train.sh launches one process with the flag's precision.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE") and k not in ("HF_HOME", "XDG_CACHE_HOME")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", HOME=str(home),
               MODEL_NAME=str(tiny_model_dir), DATA_DIR=str(tiny_data_dir), OUTPUT_DIR=str(output),
               REPORT_TO="tensorboard", PUSH_TO_HUB="0", CACHE_LATENTS="0", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    command = [str(TRAIN_SH), f"--resolution={BF16_RESOLUTION}", "--mixed_precision=bf16",
               "--gradient_accumulation_steps=1", "--checkpointing_steps=1", "--validation_epochs=1000",
               "--dataloader_num_workers=0", *extra]
    return subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=600)


def test_train_sh_bf16_checkpoints_resumes_and_exports_fp32(bf16_runs, tiny_model_dir, tiny_data_dir):
    """./train.sh --mixed_precision=bf16 on the CPU: 2 steps with checkpoints, resumed to 3, an fp32 pipeline."""
    output, done = bf16_runs["train_sh"]
    succeeded(done)
    assert checkpoints(output) == {"checkpoint-1", "checkpoint-2"}
    done = succeeded(run_train_sh(tiny_model_dir, tiny_data_dir, output, "--max_train_steps=3",
                                  "--resume_from_checkpoint=latest"))
    assert "starting at step 2" in done.stderr
    # the bf16 VAE cast and the EMA resume each drew a diffusers notice through train.sh (seen on the GPU check)
    for _, fragment in NOTICES:
        assert fragment not in done.stdout + done.stderr, fragment
    assert checkpoints(output) == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}
    assert_same_weights(load_weights(output / "unet"), load_weights(output / "checkpoint-3" / "unet_ema"))
    assert_fp32_pipeline(output)
