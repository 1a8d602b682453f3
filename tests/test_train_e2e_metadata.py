"""train_text_to_image.py --metadata_fields end to end on a create.py-style folder whose metadata.jsonl carries
metadata: the spec beside every UNet, stock loading, the same losses cached or not, and exact resume.

Five trainer runs (~10 s each), two at a time: cached, uncached and LoRA (--lora_rank 4: adapters plus the metadata
embedding), then the cached and the LoRA run resumed from checkpoint-2.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from test_train_e2e import PROMPT, assert_same_weights, load_weights, run_parallel, succeeded, trainer_command

FIELDS = "gsd,lat,lon,date,sensor"
FLAGS = ["--metadata_fields", FIELDS, "--proportion_empty_prompts", 0.3, "--metadata_dropout", 0.2,
         "--max_train_steps", 4, "--checkpointing_steps", 2, "--use_ema", "--validation_prompts", PROMPT,
         "--validation_epochs", 100]
LORA_FLAGS = [*FLAGS, "--cache_latents", "--lora_rank", 4]
# What a LoRA run writes beside each adapter file with --metadata_fields.
LORA_FILES = ("pytorch_lora_weights.safetensors", "metadata_embedding.safetensors", "metadata_spec.json")


def resume_copy(source: Path, target: Path, final: tuple) -> None:
    """target = source's folder as it stood at checkpoint-2 (checkpoint-4, the final files and loss log removed)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoint-4")
    for name in final:
        path = target / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, metadata_dir, tmp_path_factory) -> dict:
    """name -> (output dir, CompletedProcess): cached, uncached, LoRA, and the cached and LoRA runs resumed from
    checkpoint-2."""
    root = tmp_path_factory.mktemp("metadata_runs")
    outputs = {name: root / name for name in ("cached", "uncached", "resumed", "lora", "lora_resumed")}
    first = run_parallel({
        "cached": trainer_command(tiny_model_dir, metadata_dir, outputs["cached"], *FLAGS, "--cache_latents"),
        "lora": trainer_command(tiny_model_dir, metadata_dir, outputs["lora"], *LORA_FLAGS),
        "uncached": trainer_command(tiny_model_dir, metadata_dir, outputs["uncached"], *FLAGS)})
    succeeded(first["cached"])
    succeeded(first["lora"])
    resume_copy(outputs["cached"], outputs["resumed"], ("unet", "loss_log.csv"))
    resume_copy(outputs["lora"], outputs["lora_resumed"], (*LORA_FILES, "loss_log.csv"))
    resume = ["--resume_from_checkpoint", "checkpoint-2"]
    resumed = run_parallel({
        "resumed": trainer_command(tiny_model_dir, metadata_dir, outputs["resumed"], *FLAGS, "--cache_latents",
                                   *resume),
        "lora_resumed": trainer_command(tiny_model_dir, metadata_dir, outputs["lora_resumed"], *LORA_FLAGS, *resume)})
    return {name: (outputs[name], {**first, **resumed}[name]) for name in outputs}


def losses(output: Path) -> list:
    """The per-step losses of a run's loss_log.csv."""
    with open(Path(output) / "loss_log.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_spec_beside_every_unet_and_stock_loading(runs):
    """unet/, checkpoint-N/unet/ and unet_ema/ hold metadata_spec.json; stock diffusers loads the projection UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    output, done = succeeded(runs["cached"][1]) and runs["cached"]
    spec = json.loads((output / "unet" / "metadata_spec.json").read_text())
    assert spec["fields"] == FIELDS.split(",") and spec["sensors"] == ["naip", "wv3"]
    assert spec["dim"] == 9 + 27 + 11 + 3 + 4
    for folder in ("checkpoint-2/unet", "checkpoint-2/unet_ema", "checkpoint-4/unet"):
        assert json.loads((output / folder / "metadata_spec.json").read_text()) == spec
    ema = UNet2DConditionModel.from_pretrained(output / "checkpoint-2" / "unet_ema")
    assert ema.config.projection_class_embeddings_input_dim == spec["dim"] and ema.class_embedding is not None
    unet = UNet2DConditionModel.from_pretrained(output / "unet")
    assert unet.config.class_embed_type == "projection"
    assert unet.config.projection_class_embeddings_input_dim == spec["dim"]
    assert unet.class_embedding.linear_2.weight.abs().sum() > 0, "the metadata embedding did not train"
    assert torch.isfinite(unet.class_embedding.linear_1.weight).all()
    assert "2 bad value(s) treated as absent (lat 2)" in done.stderr  # rows 2 and 6
    assert (output / "validation_progress.png").is_file() or (output / "validation").exists()


def test_cached_and_uncached_draw_the_same_metadata_and_captions(runs):
    """Same seed: the metadata vectors and dropped captions travel with their rows through the cache."""
    cached, uncached = losses(succeeded(runs["cached"][1]) and runs["cached"][0]), losses(runs["uncached"][0])
    succeeded(runs["uncached"][1])
    assert len(cached) == 4 and cached == pytest.approx(uncached, rel=1e-4, abs=1e-6)


def test_resume_equals_the_uninterrupted_run_bitwise(runs):
    """Resumed at checkpoint-2 (metadata embedding, EMA, dropout draws): the same final weights, bit for bit."""
    resumed, done = runs["resumed"]
    succeeded(done)
    assert_same_weights(load_weights(resumed / "unet"), load_weights(runs["cached"][0] / "unet"))
    assert losses(resumed) == losses(runs["cached"][0])[2:]


def tensors(path: Path) -> dict:
    """A safetensors file's tensors."""
    from safetensors.torch import load_file

    return load_file(str(path))


def test_lora_run_ships_the_trained_embedding_beside_every_lora_file(runs):
    """--lora_rank with --metadata_fields: OUTPUT_DIR, each checkpoint and its lora_ema/ hold the adapters, the
    metadata embedding and its spec (no UNet); the embedding trained, the EMA averages it, and the final one is the
    EMA one."""
    output = succeeded(runs["lora"][1]) and runs["lora"][0]
    spec = json.loads((runs["cached"][0] / "unet" / "metadata_spec.json").read_text())
    for folder in ("", "checkpoint-2", "checkpoint-2/lora_ema", "checkpoint-4", "checkpoint-4/lora_ema"):
        assert all((output / folder / name).is_file() for name in LORA_FILES), folder
        assert json.loads((output / folder / "metadata_spec.json").read_text()) == spec
    assert not (output / "unet").exists() and not (output / "checkpoint-4" / "unet").exists()
    final = tensors(output / "metadata_embedding.safetensors")
    assert final["class_embedding.linear_1.weight"].shape[1] == spec["dim"]
    assert final["class_embedding.linear_2.weight"].abs().sum() > 0, "the metadata embedding did not train"
    assert_same_weights(final, tensors(output / "checkpoint-4" / "lora_ema" / "metadata_embedding.safetensors"))
    raw = tensors(output / "checkpoint-4" / "metadata_embedding.safetensors")
    assert not torch.equal(final["class_embedding.linear_2.weight"], raw["class_embedding.linear_2.weight"])
    assert not [key for key in tensors(output / LORA_FILES[0]) if "class_embedding" in key]


def test_lora_resume_equals_the_uninterrupted_run_bitwise(runs):
    """The LoRA run resumed at checkpoint-2: adapters, embedding and their EMA at checkpoint-4, and the final files,
    bit for bit, with the same losses."""
    resumed, done = runs["lora_resumed"]
    succeeded(done)
    uninterrupted = runs["lora"][0]
    for rel in ("", "checkpoint-4", "checkpoint-4/lora_ema"):
        for name in LORA_FILES[:2]:
            assert_same_weights(tensors(resumed / rel / name), tensors(uninterrupted / rel / name))
    assert losses(resumed) == losses(uninterrupted)[2:]
