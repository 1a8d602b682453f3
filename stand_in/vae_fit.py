"""Fit a tiny pipeline's random VAE to a folder of images, so that what its UNet learns decodes to pictures.

A random VAE decodes every latent to colour noise, so a random tiny pipeline cannot show learning however well
its UNet trains. This fits the VAE (reconstruction MSE plus a small KL term) on the training images, sets the
latent scaling factor from the fitted latents (as Stable Diffusion's 0.18215 was set: unit variance for the
UNet), and writes the VAE back into the pipeline folder. Real bases never need this: their VAE is trained.
Run: python -m stand_in.vae_fit MODEL_DIR DATA_DIR [--resolution 64] [--steps 150] [--seed 0]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file rather than with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time
from typing import Optional

import numpy as np
import torch
from PIL import Image

from stand_in.fitting import fit_steps, replace_component
from utils.cli import ArgumentParser, UsageError, check_at_least, run_main
from utils.constants import CONDITIONING_DIRNAME
from utils.logger import get_logger, setup_logging

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VAE_SUBFOLDER = "vae"
# Reconstruction dominates; the KL term only keeps the latents from drifting to huge values.
DEFAULT_KL_WEIGHT = 1e-4
MAX_IMAGES = 512


def load_images(data_dir: Path, resolution: int, limit: int = MAX_IMAGES) -> torch.Tensor:
    """Images under data_dir (recursively, sorted), resized to resolution x resolution, as N x 3 x H x W in [-1, 1].
    A ControlNet folder's conditioning_images/ are left out: masks are not pictures the VAE will ever decode, and
    they sort first, so they would fill the limit."""
    paths = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and CONDITIONING_DIRNAME not in p.relative_to(data_dir).parts)[:limit]
    if not paths:
        raise UsageError(f"DATA_DIR {data_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def augment(batch: torch.Tensor, generator: torch.Generator, crop: int) -> torch.Tensor:
    """A random crop x crop window (the VAE is convolutional: what it learns on crops holds on whole images) and
    random horizontal and vertical flips (aerial scenes have no up), per image."""
    size = batch.shape[-1]
    corners = torch.randint(0, size - crop + 1, (len(batch), 2), generator=generator).tolist()
    out = torch.stack([image[:, y:y + crop, x:x + crop] for image, (y, x) in zip(batch, corners)])
    flips = torch.rand(len(batch), 2, generator=generator) < 0.5
    out[flips[:, 0]] = out[flips[:, 0]].flip(-1)
    out[flips[:, 1]] = out[flips[:, 1]].flip(-2)
    return out


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction MSE of a posterior sample plus kl_weight times the mean KL to the unit Gaussian."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    return torch.nn.functional.mse_loss(reconstruction, pixels) + kl_weight * posterior.kl().mean() / pixels[0].numel()


def fit_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 16, learning_rate: float = 2e-3,
            kl_weight: float = DEFAULT_KL_WEIGHT, seed: int = 0, crop: Optional[int] = None) -> list:
    """Train vae in place on images (crop x crop windows; whole images by default) for steps AdamW steps with
    cosine decay; return the loss of each step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    def step_loss() -> torch.Tensor:
        picks = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
        return vae_loss(vae, augment(images[picks], generator, crop or images.shape[-1]), kl_weight, generator)

    return fit_steps(vae, optimizer, step_loss, steps, schedule)


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, batch_size: int = 32) -> float:
    """1 / std of the images' posterior samples: the factor that gives the UNet unit-variance latents."""
    generator = torch.Generator().manual_seed(0)
    samples = [vae.encode(images[i:i + batch_size]).latent_dist.sample(generator=generator)
               for i in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(samples).std())


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean squared error (pixels in [-1, 1]) of decoding the posterior means."""
    errors = [torch.nn.functional.mse_loss(vae.decode(vae.encode(chunk).latent_dist.mode()).sample, chunk,
                                           reduction="sum").item()
              for chunk in images.split(batch_size)]
    return sum(errors) / images.numel()


def parse_args(argv=None):
    """Command line: pipeline folder, image folder, size and schedule."""
    parser = ArgumentParser(prog="python -m stand_in.vae_fit", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a saved pipeline folder (python -m stand_in.tiny_model writes one)")
    parser.add_argument("data_dir", help="folder of training images (searched recursively), e.g. create.py's output")
    parser.add_argument("--resolution", type=int, default=64, help="side the images are resized to (default 64)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument("--crop", type=int, help="side of the random windows fitted on (default: half the "
                                                 "resolution, 4x cheaper than whole images)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--learning_rate", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of batches, flips and posterior samples")
    args = parser.parse_args(argv)
    for flag, value in (("--resolution", args.resolution), ("--steps", args.steps),
                        ("--batch_size", args.batch_size), ("--crop", args.crop)):
        check_at_least(flag, value, 1)
    if args.crop is not None and args.crop > args.resolution:
        raise UsageError(f"--crop {args.crop} is larger than --resolution {args.resolution}")
    return args


def main(argv=None) -> int:
    """Fit MODEL_DIR's VAE on DATA_DIR's images, set its scaling factor, save it back."""
    from diffusers import AutoencoderKL

    args = parse_args(argv)
    setup_logging()
    log = get_logger()
    model_dir, data_dir = Path(args.model_dir), Path(args.data_dir)
    if not (model_dir / VAE_SUBFOLDER / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {model_dir} has no {VAE_SUBFOLDER}/config.json (not a saved pipeline)")
    if not data_dir.is_dir():
        raise UsageError(f"DATA_DIR {data_dir} is not a folder")
    torch.manual_seed(args.seed)
    images = load_images(data_dir, args.resolution)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder=VAE_SUBFOLDER)
    started, before = time.monotonic(), reconstruction_error(vae, images)
    fit_vae(vae, images, args.steps, args.batch_size, args.learning_rate, seed=args.seed,
            crop=args.crop or max(1, args.resolution // 2))
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, images))
    after = reconstruction_error(vae, images)
    replace_component(vae, model_dir, VAE_SUBFOLDER)
    log.info("VAE fitted on %d images at %d px in %.0f s: reconstruction MSE %.4f -> %.4f, scaling factor %.4f",
             len(images), args.resolution, time.monotonic() - started, before, after, vae.config.scaling_factor)
    return 0


if __name__ == "__main__":
    run_main(main)
