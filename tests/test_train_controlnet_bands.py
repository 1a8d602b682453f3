"""A 4-band ControlNet end to end, as users run it: Sentinel-2-like GeoTIFFs (bands 2,3,4,8, zscore) beside RGB
scenes → create.py --conditioning_dir + format.py → train_controlnet.py, resumed from a checkpoint to the same bits →
ControlNetModel.from_pretrained → generate.py and evaluate.py --controlnet with a GeoTIFF. Two rows of the folder
have a conditioning file that cannot be used (not a .npy; 3 bands): the runs record them and go on.

One training run, then the resumed run beside generate.py's and evaluate.py's mains, in one module fixture.
"""

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

import warm
from conftest import REPO_ROOT
from test_evaluate import evaluate_command
from test_train_controlnet import command
from test_train_e2e import assert_same_weights, load_weights, run_command, succeeded
from warm import single_thread_env

BANDS = "2,3,4,8"  # Sentinel-2 blue, green, red, near-infrared
ROWS = 6
RESOLUTION = 32
PROMPT = "an aerial view of fields and a river"
# Rows whose conditioning file is broken after create.py: bytes that are no .npy, and an array of 3 bands.
CORRUPT, THREE_BANDS = "conditioning_images/image_000003.npy", "conditioning_images/image_000005.npy"


def write_sources(root) -> None:
    """index.csv naming images/scene_k.png, and s2/scene_k.tif: a 12-band Sentinel-2-like tile of the same scene."""
    from PIL import Image

    from diffusion_model.sample_geotiff import SENTINEL2_BANDS, encode_geotiff, scene_pixels, sentinel2_like
    from source_cases import first_caption

    (root / "images").mkdir(parents=True)
    (root / "s2").mkdir()
    rows = []
    for index in range(ROWS):
        rgb, _, captions = scene_pixels(index, 0)
        Image.fromarray(rgb).save(root / "images" / f"scene_{index}.png")
        tile = sentinel2_like(rgb, np.random.default_rng(index))
        (root / "s2" / f"scene_{index}.tif").write_bytes(encode_geotiff(tile, "sentinel2", nodata=0,
                                                                        names=SENTINEL2_BANDS))
        rows.append({"file_name": f"images/scene_{index}.png", "text": first_caption(captions)})
    with open(root / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def bands_data(tmp_path_factory) -> dict:
    """The sources and the create.py + format.py folder made from them (in-process), two files then broken."""
    from diffusion_model import create, format as format_script

    root = tmp_path_factory.mktemp("bands")
    write_sources(root / "src")
    data = root / "data"
    assert create.main(["--input", str(root / "src" / "index.csv"), "--images_dir", str(root / "src"),
                        "--conditioning_dir", str(root / "src" / "s2"), "--conditioning_type", "bands",
                        "--conditioning_bands", BANDS, "--conditioning_norm", "zscore", "--output_dir", str(data),
                        "--resolution", str(RESOLUTION)]) == 0
    assert format_script.main(["--caption_file", str(data / "captions.txt"),
                               "--output_file", str(data / "metadata.jsonl")]) == 0
    (data / CORRUPT).write_bytes(b"not a numpy file")
    np.save(data / THREE_BANDS, np.load(data / THREE_BANDS)[:3])
    return {"src": root / "src", "data": data}


def train_command(model, data: dict, output, *extra) -> list:
    """4 steps of 2 rows at 32 px from the bands folder (every row is met: 3 steps an epoch), flips on, a checkpoint
    every 2, validation on a GeoTIFF."""
    return command(model, output, "--train_data_dir", data["data"], "--resolution", RESOLUTION, "--random_flip",
                   "--train_batch_size", 2,
                   "--max_train_steps", 4, "--checkpointing_steps", 2, "--validation_prompt", PROMPT,
                   "--validation_image", data["src"] / "s2" / "scene_0.tif", "--num_validation_images", 1, *extra)


@pytest.fixture(scope="module")
def bands_runs(tiny_model_dir, bands_data, stand_in_models, tmp_path_factory) -> dict:
    """The full run; then a copy resumed from checkpoint-2 (a process) while generate.py, on two GeoTIFFs for one
    prompt, and evaluate.py --controlnet, on the training folder, run their mains in this process (as processes
    their imports alone would take seconds each)."""
    import evaluate
    from test_generate import generate_here, restored_process_state

    root = tmp_path_factory.mktemp("bands_runs")
    full, resumed = root / "full", root / "resumed"
    first = succeeded(run_command(train_command(tiny_model_dir, bands_data, full)))
    shutil.copytree(full, resumed)
    (resumed / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(resumed / "checkpoint-4")
    resuming = warm.start(train_command(tiny_model_dir, bands_data, resumed, "--resume_from_checkpoint", "checkpoint-2"),
                          cwd=REPO_ROOT, env=single_thread_env())
    controls = root / "controls"
    controls.mkdir()
    for index in (1, 2):
        shutil.copy(bands_data["src"] / "s2" / f"scene_{index}.tif", controls)
    generate_here(["generate.py", "--model", tiny_model_dir, "--controlnet", full, "--control_image", controls,
                   "--prompt", PROMPT, "--output_dir", root / "generated", "--height", RESOLUTION, "--width",
                   RESOLUTION, "--num_inference_steps", 2, "--seed", 5])
    with restored_process_state():
        torch.set_num_threads(1)
        assert evaluate.main(evaluate_command(tiny_model_dir, "--data_dir", bands_data["data"], stand_in_models,
                                              root / "evaluated", "--controlnet", full, "--seed", 3)[2:]) == 0
    out, err = resuming.communicate(timeout=300)
    succeeded(subprocess.CompletedProcess(resuming.args, resuming.returncode, out, err))
    return {"full": full, "resumed": resumed, "generated": root / "generated", "evaluated": root / "evaluated",
            "first_log": first.stderr, "controls": controls}


def test_resumed_from_checkpoint_2_it_ends_bit_identical(bands_runs):
    """Flips, a stand-in for each bad row, and the seen batches skipped: the resumed run is the full run, bit for
    bit, at checkpoint-4 and at the end."""
    assert_same_weights(load_weights(bands_runs["full"]), load_weights(bands_runs["resumed"]))
    assert_same_weights(load_weights(bands_runs["full"] / "checkpoint-4" / "controlnet"),
                        load_weights(bands_runs["resumed"] / "checkpoint-4" / "controlnet"))


def test_the_controlnet_loads_with_four_conditioning_channels(bands_runs, bands_data):
    """ControlNetModel.from_pretrained(OUTPUT_DIR), 4 inputs; conditioning.json keeps the bands and zscore."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(bands_runs["full"])
    assert controlnet.config.conditioning_channels == 4
    assert controlnet.controlnet_cond_embedding.conv_in.in_channels == 4
    document = json.loads((bands_runs["full"] / "conditioning.json").read_text())
    assert (document["type"], document["channels"], document["bands"]) == ("bands", 4, [2, 3, 4, 8])
    assert document["normalisation"]["mode"] == "zscore" and len(document["normalisation"]["offset"]) == 4
    with open(bands_runs["full"] / "validation_grid.png", "rb") as grid:
        assert grid.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unusable_conditioning_files_are_recorded_and_the_run_goes_on(bands_runs):
    """Exit 0 (checked by the fixture), a warning per bad row, and bad_rows.json naming both with why, in the full
    run and in the resumed one."""
    assert "cannot be read, so the next readable row stands in for it" in bands_runs["first_log"]
    for name in ("full", "resumed"):
        report = json.loads((bands_runs[name] / "bad_rows.json").read_text())
        assert report["count"] == 2 and report["by_reason"] == {"bad_conditioning_image": 2}
        details = {entry["file"]: entry["detail"] for entry in report["rows"]}
        assert details.keys() == {CORRUPT, THREE_BANDS}
        assert "3 bands, the ControlNet was trained on 4" in details[THREE_BANDS]
        assert "cannot read conditioning file" in details[CORRUPT]


def test_generate_samples_from_geotiffs(bands_runs):
    """generate.py --control_image a folder of two 12-band GeoTIFFs: two images, sidecars naming each tile."""
    from PIL import Image

    folder = bands_runs["generated"]
    records = [json.loads((folder / f"{index:06d}.json").read_text()) for index in range(2)]
    assert [record["control_image"] for record in records] == [str(bands_runs["controls"] / f"scene_{index}.tif")
                                                               for index in (1, 2)]
    assert {record["conditioning_type"] for record in records} == {"bands"}
    for index in range(2):
        with Image.open(folder / f"{index:06d}.png") as image:
            assert image.size == (RESOLUTION, RESOLUTION)


def test_evaluate_reports_psnr_and_ssim_with_the_shuffled_floor(bands_runs):
    """evaluate.py --controlnet on the bands folder: control_psnr/ssim and their shuffled floors, finite; the two
    rows with an unusable conditioning file are bad rows with their reason, the other four are scored."""
    report = json.loads((bands_runs["evaluated"] / "eval_report.json").read_text())
    for key in ("control_psnr", "control_psnr_shuffled", "control_ssim", "control_ssim_shuffled"):
        assert np.isfinite(report[key]), key
    assert -1 <= report["control_ssim"] <= 1 and report["control_psnr"] > 0
    # 4 steps barely train it, but its conditioning must reach it: own and shuffled conditioning draw differently.
    assert (report["control_psnr"], report["control_ssim"]) != (report["control_psnr_shuffled"],
                                                                report["control_ssim_shuffled"])
    assert report["control_details"]["conditioning_type"] == "bands"
    assert "against its own real image" in report["control_details"]["shuffled"]  # PSNR/SSIM: no mask to score
    assert report["bad_rows"]["by_reason"] == {"bad_conditioning_image": 2} and report["num_samples"] == ROWS - 2
