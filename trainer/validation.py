"""Validation: sample the prompts with the current (EMA) weights, save PNGs, send them to the trackers."""

import contextlib
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from utils.atomic import write_png_atomic
from utils.constants import DEFAULT_GUIDANCE_SCALE, VALIDATION_DIRNAME
from utils.grids import labelled_grid
from utils.logger import get_logger

VALIDATION_INFERENCE_STEPS = 20
# Without --seed, validation still uses a fixed seed so images of successive steps are comparable.
DEFAULT_VALIDATION_SEED = 0
GRID_FILENAME = "validation_grid.png"
PROGRESS_FILENAME = "validation_progress.png"
# Validation before the first optimizer step: the base model's images, the progress picture's first column.
BASE_STEP = 0


def load_inference_scheduler(model_path: str, revision: Optional[str], prediction_type: Optional[str]):
    """The base pipeline's own inference scheduler, carrying the prediction type that was trained."""
    import diffusers

    model_index = diffusers.DiffusionPipeline.load_config(model_path, revision=revision)
    scheduler_cls = getattr(diffusers, model_index["scheduler"][1])
    scheduler = scheduler_cls.from_pretrained(model_path, subfolder="scheduler", revision=revision)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    return scheduler


def should_validate(epoch: int, validation_epochs: int, prompts: Optional[Sequence[str]]) -> bool:
    """The reference's rule: validate after epochs where epoch % validation_epochs == 0 (epoch 0 included)."""
    return bool(prompts) and epoch % validation_epochs == 0


def autocast_for(device: torch.device, weight_dtype: torch.dtype):
    """Autocast so the fp32 UNet and the half-precision VAE/text encoder can run together."""
    if weight_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=weight_dtype)


def generate(pipeline, prompts: Sequence[str], seed: Optional[int], device: torch.device,
             weight_dtype: torch.dtype, resolution: Optional[int] = None,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE) -> List:
    """One image per prompt, with a seeded generator and the reference's 20 steps, at resolution (default: the
    pipeline's own size, which for a small base differs from the size it is being trained at)."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(DEFAULT_VALIDATION_SEED if seed is None else seed)
    images = []
    with torch.no_grad(), autocast_for(device, weight_dtype):
        for prompt in prompts:
            images.append(pipeline(prompt, num_inference_steps=VALIDATION_INFERENCE_STEPS, generator=generator,
                                   height=resolution, width=resolution, guidance_scale=guidance_scale).images[0])
    return images


def save_images(images: Sequence, output_dir: Path, step: int) -> List[Path]:
    """Write images as OUTPUT_DIR/validation/step-<step>/<i>.png."""
    folder = Path(output_dir) / VALIDATION_DIRNAME / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"{index}.png")
        image.save(paths[-1])
    return paths


def log_images(trackers, images: Sequence, prompts: Sequence[str], step: int) -> None:
    """Send the images to tensorboard (add_images) and wandb (captioned "i: prompt")."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", batch, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=f"{i}: {prompt}")
                                        for i, (image, prompt) in enumerate(zip(images, prompts))]}, step=step)


def validate(accelerator, pipeline, args, step: int, weight_dtype: torch.dtype) -> List:
    """Generate, save and log the validation images of one step (main process only)."""
    get_logger().info("Validation at step %d: %d prompt(s)", step, len(args.validation_prompts))
    images = generate(pipeline, args.validation_prompts, args.seed, accelerator.device, weight_dtype,
                      args.resolution, args.validation_guidance_scale)
    save_images(images, Path(args.output_dir), step)
    log_images(accelerator.trackers, images, args.validation_prompts, step)
    return images


def validate_during_training(accelerator, components, unet, ema, scheduler, args, step: int,
                             weight_dtype: torch.dtype) -> List:
    """Validate with the EMA weights swapped in, then put the training weights back untouched."""
    from diffusers import StableDiffusionPipeline

    from trainer.models import bare_model, ema_weights, eval_mode, trainable_parameters

    model = bare_model(unet)
    text_encoder = bare_model(components.text_encoder)
    params = trainable_parameters(model, text_encoder)  # what the EMA averages: all UNet weights, or the LoRA ones
    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer, unet=model,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with eval_mode(model, text_encoder), ema_weights(ema, params):
        return validate(accelerator, pipeline, args, step, weight_dtype)


def step_label(step: int) -> str:
    """A validation's column label: "base" for the untrained model, else "step N"."""
    return "base" if step == BASE_STEP else f"step {step}"


def save_grid(images: Sequence, prompts: Sequence[str], step: int, output_dir: Path) -> Path:
    """OUTPUT_DIR/validation_grid.png (the model card shows it): one labelled row per prompt, the column this step,
    small images enlarged so they can be seen."""
    path = Path(output_dir) / GRID_FILENAME
    write_png_atomic(path, labelled_grid([[image] for image in images], prompts, [step_label(step)]))
    return path


def validation_steps(output_dir: Path, last_step: int, num_prompts: int) -> List[int]:
    """Steps up to last_step with a complete validation/step-N folder (one image per prompt), in order."""
    steps = []
    for folder in (Path(output_dir) / VALIDATION_DIRNAME).glob("step-*"):
        suffix = folder.name[len("step-"):]
        if suffix.isdigit() and int(suffix) <= last_step and \
                all((folder / f"{i}.png").is_file() for i in range(num_prompts)):
            steps.append(int(suffix))
    return sorted(steps)


def read_validation_images(output_dir: Path, steps: Sequence[int], num_prompts: int) -> List[List]:
    """validation/step-N/<row>.png as RGB, one list per prompt with one image per step, all at the first's size."""
    from PIL import Image

    folder = Path(output_dir) / VALIDATION_DIRNAME
    rows = [[] for _ in range(num_prompts)]
    for step in steps:
        for row in range(num_prompts):
            with Image.open(folder / f"step-{step}" / f"{row}.png") as image:
                rows[row].append(image.convert("RGB"))
    size = rows[0][0].size
    return [[image if image.size == size else image.resize(size) for image in row] for row in rows]


def save_progress(output_dir: Path, last_step: int, prompts: Sequence[str]) -> Optional[Path]:
    """OUTPUT_DIR/validation_progress.png: one row per prompt, one column per validation step, the base (step 0)
    first, labelled and enlarged, read back from validation/step-N/ so a resumed run's earlier steps are in it too;
    None without images."""
    steps = validation_steps(output_dir, last_step, len(prompts))
    if not steps or not prompts:
        return None
    rows = read_validation_images(output_dir, steps, len(prompts))
    path = Path(output_dir) / PROGRESS_FILENAME
    write_png_atomic(path, labelled_grid(rows, prompts, [step_label(step) for step in steps]))
    get_logger().info("Validation progress (rows: prompts; columns: %s): %s",
                      ", ".join(step_label(step) for step in steps), path)
    return path
