"""Offline stand-ins for the Hub fixtures of diffusers' ControlNet example tests: a tiny ControlNet for the tiny
pipeline, a small fill10-like dataset (columns image, conditioning_image, text), and an HF_HOME that serves them,
and the tiny pipeline, under the hf-internal-testing ids with HF_HUB_OFFLINE=1.

Run: python -m stand_in.tiny_controlnet HF_HOME   (scripts/run_diffusers_controlnet_tests.sh does)
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from utils.cli import run_main

PIPELINE_ID = "hf-internal-testing/tiny-stable-diffusion-torch"
CONTROLNET_ID = "hf-internal-testing/tiny-controlnet"
DATASET_ID = "hf-internal-testing/fill10"
FILL_ROWS = 10
FILL_SIZE = 72  # not the training resolution (64): the trainer's resize and crop are exercised
SNAPSHOT = "0" * 40  # the stand-in's "commit"


def save_tiny_controlnet(pipeline_dir, output_dir, seed: int = 0) -> Path:
    """A random ControlNet shaped for the tiny pipeline's UNet and VAE (its conditioning embedding halves once, like
    the VAE), saved as ControlNetModel.from_pretrained reads it."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from trainer.controlnet import embedding_channels

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels(2))
    with torch.no_grad():  # from_unet zeroes the output convolutions: random ones make the stand-in steer the UNet
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.02)
    controlnet.save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


def fill_rows(rows: int = FILL_ROWS, size: int = FILL_SIZE, seed: int = 0) -> dict:
    """fill10-like columns: a circle outline as conditioning, the same circle filled in a colour as the target."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, conditions, texts = [], [], []
    for _ in range(rows):
        cy, cx, radius = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(6, size // 4))]
        distance = np.hypot(yy - cy, xx - cx)
        colour = rng.integers(0, 256, 3)
        target = np.full((size, size, 3), 255, np.uint8)
        target[distance <= radius] = colour
        outline = np.zeros((size, size, 3), np.uint8)
        outline[np.abs(distance - radius) < 1.0] = 255
        images.append(Image.fromarray(target))
        conditions.append(Image.fromarray(outline))
        texts.append(f"a circle filled with rgb {tuple(colour.tolist())}")
    return {"image": images, "conditioning_image": conditions, "text": texts}


def save_fill_dataset(output_dir, rows: int = FILL_ROWS) -> Path:
    """The fill10 stand-in as a saved dataset folder (Dataset.save_to_disk), usable as --dataset_name."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict(fill_rows(rows), features=features).save_to_disk(str(output_dir))
    return Path(output_dir)


def snapshot_dir(hub_cache: Path, repo_id: str, kind: str = "models") -> Path:
    """The snapshot folder of repo_id in a huggingface_hub cache, with refs/main pointing to it."""
    repo = hub_cache / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def cache_dataset(datasets_cache: Path, repo_id: str, rows: int = FILL_ROWS) -> None:
    """Put the fill10 stand-in in the datasets cache as `datasets` leaves a Hub dataset it has prepared, which is
    what load_dataset(repo_id) reads with HF_HUB_OFFLINE=1."""
    import datasets

    staging = datasets_cache / ".staging"
    parquet = staging / "train.parquet"
    parquet.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    datasets.Dataset.from_dict(fill_rows(rows), features=features).to_parquet(str(parquet))
    datasets.load_dataset("parquet", data_files={"train": str(parquet)}, cache_dir=str(staging / "cache"))
    prepared = next(p for p in (staging / "cache" / "parquet").glob("*/*/*") if p.is_dir())
    target = datasets_cache / "___".join(repo_id.split("/")) / "default" / prepared.parent.name / prepared.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(prepared), str(target))
    for arrow in target.glob("parquet-*.arrow"):  # the cache names its files after the dataset
        arrow.rename(arrow.with_name(arrow.name.replace("parquet", repo_id.split("/")[-1], 1)))
    shutil.rmtree(staging)


def build_offline_home(home) -> Path:
    """An HF_HOME holding the tiny pipeline, the tiny ControlNet and fill10 under the hf-internal-testing ids."""
    from stand_in.tiny_model import save_tiny_pipeline

    from utils.quiet import no_datasets_bars, quiet_loading_bars

    quiet_loading_bars()
    home = Path(home)
    hub = home / "hub"
    pipeline = save_tiny_pipeline(snapshot_dir(hub, PIPELINE_ID))
    save_tiny_controlnet(pipeline, snapshot_dir(hub, CONTROLNET_ID))
    with no_datasets_bars():
        cache_dataset(home / "datasets", DATASET_ID)
    return home


def main(argv=None) -> int:
    """CLI: write the offline HF_HOME."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_home", help="folder to use as HF_HOME (created)")
    args = parser.parse_args(argv)
    print(build_offline_home(args.hf_home))
    return 0


if __name__ == "__main__":
    run_main(main)
