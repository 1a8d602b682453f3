"""train_text_to_image.py --metadata_fields end to end on a create.py-style folder whose metadata.jsonl carries
metadata: the spec beside every UNet, stock loading, the same losses cached or not, and exact resume.

Three trainer runs (~15 s each): cached and uncached in parallel, then the cached one resumed from checkpoint-2.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest

from test_train_e2e import PROMPT, assert_same_weights, load_weights, run_parallel, succeeded, trainer_command

FIELDS = "gsd,lat,lon,date,sensor"
# Rows of the tiny folder get these in turn; lat 95 is a bad value (absent, counted), the last row has none.
METADATA = [{"gsd": 0.5, "lat": 37.77, "lon": -122.42, "date": "2021-07-01", "sensor": "naip"},
            {"gsd": 2.0, "lat": -33.9, "lon": 151.2, "date": "2019-01-15T10:32:22Z", "sensor": "WV3"},
            {"gsd": 8.0, "lat": 95.0, "lon": 10.0},
            None]
FLAGS = ["--metadata_fields", FIELDS, "--proportion_empty_prompts", 0.3, "--metadata_dropout", 0.2,
         "--max_train_steps", 4, "--checkpointing_steps", 2, "--use_ema", "--validation_prompts", PROMPT,
         "--validation_epochs", 100]


@pytest.fixture(scope="module")
def metadata_dir(tiny_data_dir, tmp_path_factory) -> Path:
    """A copy of the tiny data folder whose metadata.jsonl lines carry metadata, as format.py writes them."""
    folder = tmp_path_factory.mktemp("metadata_data") / "data"
    shutil.copytree(tiny_data_dir, folder)
    path = folder / "metadata.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if METADATA[i % len(METADATA)] is not None:
            line["metadata"] = METADATA[i % len(METADATA)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.fixture(scope="module")
def runs(tiny_model_dir, metadata_dir, tmp_path_factory) -> dict:
    """name -> (output dir, CompletedProcess): cached, uncached, and the cached run resumed from checkpoint-2."""
    root = tmp_path_factory.mktemp("metadata_runs")
    outputs = {name: root / name for name in ("cached", "uncached", "resumed")}
    first = run_parallel({
        "cached": trainer_command(tiny_model_dir, metadata_dir, outputs["cached"], *FLAGS, "--cache_latents"),
        "uncached": trainer_command(tiny_model_dir, metadata_dir, outputs["uncached"], *FLAGS)})
    succeeded(first["cached"])
    shutil.copytree(outputs["cached"], outputs["resumed"])
    shutil.rmtree(outputs["resumed"] / "unet")
    (outputs["resumed"] / "loss_log.csv").unlink()
    resumed = run_parallel({"resumed": trainer_command(tiny_model_dir, metadata_dir, outputs["resumed"], *FLAGS,
                                                       "--cache_latents", "--resume_from_checkpoint", "checkpoint-2")})
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
