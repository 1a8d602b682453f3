"""stand_in/vae_fit.py: fitting the tiny random VAE to images lowers its reconstruction error, sets the latent
scaling factor, and replaces the pipeline's VAE whole; bad command lines are one-line errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from stand_in import vae_fit
from utils.cli import UsageError

SIDE = 8


def write_images(root):
    """root/data: four flat-coloured images (two pairs) in a nested folder, one non-image file beside them."""
    folder = root / "data" / "rsicd_images"
    folder.mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (SIDE * 2, SIDE * 2), colour).save(folder / f"scene_{i}.jpg")
    (folder / "captions.txt").write_text("not an image")
    return root / "data"


@pytest.fixture()
def images_dir(tmp_path):
    """write_images' folder."""
    return write_images(tmp_path)


def test_load_images_finds_images_recursively_resized_to_minus_one_one(images_dir):
    images = vae_fit.load_images(images_dir, SIDE)
    assert images.shape == (4, 3, SIDE, SIDE)
    assert images.min() >= -1 and images.max() <= 1
    assert images[0, 0].mean() > 0.4 and images[1, 2].mean() > 0.4  # red first, then blue, in name order


def test_a_controlnet_folders_conditioning_images_are_not_fitted_on(images_dir):
    """create.py's conditioning_images/ (class masks, sorted before rsicd_images/) are left out of the fit."""
    masks = images_dir / "conditioning_images"
    masks.mkdir()
    for i in range(4):
        Image.new("L", (SIDE * 2, SIDE * 2), i).save(masks / f"scene_{i}.png")
    images = vae_fit.load_images(images_dir, SIDE)
    assert len(images) == 4 and images[0, 0].mean() > 0.4  # the four scenes, red first; no near-black mask


def test_an_empty_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="holds no images"):
        vae_fit.load_images(tmp_path, SIDE)


def test_crops_and_flips_keep_pixels_and_shape():
    batch = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = vae_fit.augment(batch, torch.Generator().manual_seed(0), 2)
    assert out.shape == (2, 3, 2, 2)
    assert set(out[0].flatten().tolist()) <= set(batch[0].flatten().tolist())


def test_fitting_lowers_the_reconstruction_error_and_sets_the_scaling_factor(tiny_model_dir, images_dir, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    images = vae_fit.load_images(images_dir, SIDE)
    before = vae_fit.reconstruction_error(AutoencoderKL.from_pretrained(model, subfolder="vae"), images)
    torch.manual_seed(0)
    assert vae_fit.main([str(model), str(images_dir), "--resolution", str(SIDE), "--crop", str(SIDE), "--steps", "60",
                         "--batch_size", "4"]) == 0
    fitted = AutoencoderKL.from_pretrained(model, subfolder="vae")
    after = vae_fit.reconstruction_error(fitted, images)
    assert after < before / 3, (before, after)
    assert fitted.config.scaling_factor == pytest.approx(vae_fit.latent_scaling_factor(fitted, images), rel=1e-4)
    original = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    assert fitted.config.scaling_factor != original.config.scaling_factor
    assert sorted(p.name for p in model.iterdir() if p.name.startswith("vae")) == ["vae"]


BAD_FLAGS = [
    (["--steps", "0"], "--steps"),
    (["--crop", "64"], "--crop 64 is larger than --resolution 32"),
]


@pytest.fixture(scope="module")
def refusals(run_script, tiny_model_dir, tmp_path_factory) -> dict:
    """The script on each refused command line, two at a time (each costs seconds of imports):
    name -> CompletedProcess."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("vae_fit_refusals")
    data = write_images(root)
    commands = {**{f"bad-{i}": [tiny_model_dir, data, "--resolution", 32, *argv] for i, (argv, _) in
                   enumerate(BAD_FLAGS)},
                "no_vae": [root / "no_model", data]}
    (root / "no_model").mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_script, "stand_in/vae_fit.py", args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("index", range(len(BAD_FLAGS)), ids=[message for _, message in BAD_FLAGS])
def test_bad_flags_are_one_line_errors(refusals, index):
    message = BAD_FLAGS[index][1]
    done = refusals[f"bad-{index}"]
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_folder_without_a_vae_is_refused(refusals):
    done = refusals["no_vae"]
    assert done.returncode == 2 and "no vae/config.json" in done.stderr and "Traceback" not in done.stderr
