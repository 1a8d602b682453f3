"""train_controlnet.py end to end, run as users run it: diffusers' two SD1 ControlNet example tests re-expressed on
local stand-ins (tiny pipeline, tiny ControlNet, fill10), and a mask-conditioned run from a create.py folder that
resumes exactly, validates, and loads with ControlNetModel.from_pretrained.

Four trainer runs (~15 s each), two at a time, and a 0-step one beside the first two, shared through module fixtures.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

# pytest puts tests/ on sys.path.
from test_train_e2e import assert_same_weights, checkpoints, load_weights, run_parallel, succeeded

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_controlnet.py"
MASK_CLASSES = 5
PROMPT = "an aerial view of fields and water"


@pytest.fixture(scope="module")
def mask_data_dir(tmp_path_factory) -> Path:
    """sample_data --masks -> create.py (mask conditioning, 64 px) -> format.py, in-process."""
    from diffusion_model import create, format as format_script
    from diffusion_model.sample_data import make_sample_parquet

    root = tmp_path_factory.mktemp("mask_data")
    parquet = make_sample_parquet(root / "masks.parquet", 6, seed=3, masks=True)
    data = root / "data"
    assert create.main(["--input", str(parquet), "--conditioning_column", "mask", "--conditioning_type", "mask",
                        "--num_classes", str(MASK_CLASSES), "--output_dir", str(data), "--resolution", "64"]) == 0
    assert format_script.main(["--caption_file", str(data / "captions.txt"),
                               "--output_file", str(data / "metadata.jsonl")]) == 0
    return data


@pytest.fixture(scope="module")
def stand_ins(tiny_model_dir, tmp_path_factory) -> dict:
    """The fill10 stand-in (a saved dataset folder) and the tiny ControlNet, made in-process."""
    from stand_in.tiny_controlnet import save_fill_dataset, save_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnet_stand_ins")
    return {"fill10": save_fill_dataset(root / "fill10"), "controlnet": save_tiny_controlnet(tiny_model_dir,
                                                                                            root / "controlnet")}


def command(model, output, *extra) -> list:
    """diffusers' example-test flags (64 px, batch 1, GA 1) on the tiny model, seeded, no warmup."""
    import sys

    return [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(model), "--output_dir", str(output),
            "--resolution", "64", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--seed", "0", *[str(e) for e in extra]]


def fill_flags(stand_ins) -> list:
    """diffusers' test case data and ControlNet: fill10 and tiny-controlnet (local stand-ins)."""
    return ["--dataset_name", stand_ins["fill10"], "--controlnet_model_name_or_path", stand_ins["controlnet"]]


def mask_flags(data: Path) -> list:
    """The RS recipe at test size: masks from conditioning.json, flips, cache, EMA, checkpointing, validation."""
    return ["--train_data_dir", data, "--random_flip", "--cache_latents", "--use_ema", "--gradient_checkpointing",
            "--checkpointing_steps", 2, "--checkpoints_total_limit", 2, "--max_train_steps", 6,
            "--validation_prompt", PROMPT, "--validation_image", data / "conditioning_images" / "image_000001.png",
            "--num_validation_images", 1, "--validation_steps", 100]


@pytest.fixture(scope="module")
def first_runs(tiny_model_dir, stand_ins, mask_data_dir, tmp_path_factory) -> dict:
    """fill10 for 6 steps without a limit; the mask recipe for 6 steps with limit 2; the mask folder for 0 steps
    (polynomial schedule, which divides by the run's length): name -> output dir."""
    root = tmp_path_factory.mktemp("controlnet_runs")
    outputs = {"fill": root / "fill", "mask": root / "mask", "zero": root / "zero"}
    results = run_parallel({
        "zero": command(tiny_model_dir, outputs["zero"], "--train_data_dir", mask_data_dir, "--max_train_steps", 0,
                        "--lr_scheduler", "polynomial", "--cache_latents"),
        "fill": command(tiny_model_dir, outputs["fill"], *fill_flags(stand_ins), "--max_train_steps", 6,
                        "--checkpointing_steps", 2),
        "mask": command(tiny_model_dir, outputs["mask"], *mask_flags(mask_data_dir)),
    })
    for done in results.values():
        succeeded(done)
    return outputs


@pytest.fixture(scope="module")
def resumed_runs(first_runs, tiny_model_dir, stand_ins, mask_data_dir, tmp_path_factory) -> dict:
    """fill resumed from checkpoint-6 to 8 with limit 2; a copy of the mask run resumed from checkpoint-4."""
    root = tmp_path_factory.mktemp("controlnet_resumed")
    outputs = {"fill": root / "fill", "mask": root / "mask"}
    shutil.copytree(first_runs["fill"], outputs["fill"])
    shutil.copytree(first_runs["mask"], outputs["mask"])
    (outputs["mask"] / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(outputs["mask"] / "checkpoint-6")
    results = run_parallel({
        "fill": command(tiny_model_dir, outputs["fill"], *fill_flags(stand_ins), "--max_train_steps", 8,
                        "--checkpointing_steps", 2, "--resume_from_checkpoint", "checkpoint-6",
                        "--checkpoints_total_limit", 2),
        "mask": command(tiny_model_dir, outputs["mask"], *mask_flags(mask_data_dir), "--resume_from_checkpoint",
                        "checkpoint-4"),
    })
    for done in results.values():
        succeeded(done)
    return outputs


def test_checkpoints_total_limit_keeps_the_newest_two(first_runs):
    """diffusers' case 1: 6 steps, a checkpoint every 2, limit 2 -> exactly checkpoint-4 and checkpoint-6."""
    assert checkpoints(first_runs["mask"]) == {"checkpoint-4", "checkpoint-6"}


def test_no_limit_then_resume_with_limit_two(first_runs, resumed_runs):
    """diffusers' case 2: {2, 4, 6} without a limit; resumed from checkpoint-6 to 8 with limit 2 -> {6, 8}."""
    assert checkpoints(first_runs["fill"]) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert checkpoints(resumed_runs["fill"]) == {"checkpoint-6", "checkpoint-8"}


def test_checkpoints_and_output_hold_loadable_controlnets(first_runs):
    """checkpoint-N/controlnet/ (and controlnet_ema/ with EMA) and OUTPUT_DIR load with from_pretrained; the fill
    run trained its starting ControlNet (RGB), the mask run one with a channel per class."""
    from diffusers import ControlNetModel

    for name, channels in (("fill", 3), ("mask", MASK_CLASSES)):
        final = ControlNetModel.from_pretrained(first_runs[name])
        assert final.config.conditioning_channels == channels
        assert (first_runs[name] / "checkpoint-6" / "controlnet" / "config.json").is_file()
    assert (first_runs["mask"] / "checkpoint-6" / "controlnet_ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (first_runs["fill"] / "checkpoint-6" / "controlnet_ema").exists()


def test_fill_run_trained_the_given_controlnet(first_runs, stand_ins):
    """The final weights moved away from --controlnet_model_name_or_path's."""
    start, final = load_weights(stand_ins["controlnet"]), load_weights(first_runs["fill"])
    assert start.keys() == final.keys()
    assert any(not torch.equal(start[key], final[key]) for key in start)


def test_mask_run_resumed_from_checkpoint_4_is_exact(first_runs, resumed_runs):
    """Cached latents, flips, EMA: resumed at step 4 (seen batches skipped) it ends bit-identical to the full run."""
    assert_same_weights(load_weights(first_runs["mask"]), load_weights(resumed_runs["mask"]))
    assert_same_weights(load_weights(first_runs["mask"] / "checkpoint-6" / "controlnet"),
                        load_weights(resumed_runs["mask"] / "checkpoint-6" / "controlnet"))


def test_conditioning_json_describes_the_input(first_runs, mask_data_dir):
    """OUTPUT_DIR/conditioning.json: the folder's document, the prepared channels, base and training folder."""
    document = json.loads((first_runs["mask"] / "conditioning.json").read_text())
    assert document["type"] == "mask" and document["classes"] == MASK_CLASSES
    assert document["channels"] == MASK_CLASSES and document["class_pixels"]
    assert Path(document["train_data_dir"]) == mask_data_dir.absolute()
    assert Path(document["train_data_dir"]).is_absolute()
    assert Path(document["base_model"]).name == "pipeline"
    fill = json.loads((first_runs["fill"] / "conditioning.json").read_text())
    assert fill["type"] == "image" and fill["channels"] == 3


def test_validation_grid_and_card(first_runs):
    """The final validation (StableDiffusionControlNetPipeline on the trained 5-channel ControlNet) wrote its step
    images and a grid (conditioning in false colour, then the image); the card names base and conditioning."""
    from PIL import Image

    output = first_runs["mask"]
    with Image.open(output / "validation_grid.png") as grid:
        assert grid.width > grid.height  # one row: the conditioning, then one image
    assert (output / "validation" / "step-6" / "0_0.png").is_file()
    card = (output / "README.md").read_text()
    assert "A ControlNet for `pipeline`" in card and "class mask (5 classes" in card


def test_cache_latents_trains_from_the_latent_cache(first_runs):
    """--cache_latents (mask run) builds the latent cache under OUTPUT_DIR/.cache/latents and trains from it; the
    fill run, without the flag, has none."""
    assert len(list((first_runs["mask"] / ".cache" / "latents").glob("*/manifest.json"))) == 1
    assert not (first_runs["fill"] / ".cache").exists()


def test_zero_steps_write_the_initial_controlnet(first_runs, tiny_model_dir):
    """--max_train_steps 0 writes the ControlNet as training would start it: the base UNet's encoder copied, every
    output convolution zero (so it leaves the base's images unchanged: evaluate.py's untrained ControlNet), with its
    conditioning.json, and no checkpoint."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    output = first_runs["zero"]
    controlnet = ControlNetModel.from_pretrained(output)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    assert controlnet.config.conditioning_channels == MASK_CLASSES
    for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]:
        assert not block.weight.any() and not block.bias.any()
    assert_same_weights(controlnet.down_blocks.state_dict(), unet.down_blocks.state_dict())
    assert json.loads((output / "conditioning.json").read_text())["type"] == "mask"
    assert not checkpoints(output)
