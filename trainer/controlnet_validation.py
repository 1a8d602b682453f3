"""ControlNet validation: --validation_prompt x --validation_image pairs sampled every --validation_steps and at the
end; images saved under validation/step-N/ and in a grid with a false-colour view of each conditioning beside them."""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from utils.atomic import write_png_atomic
from utils.constants import VALIDATION_DIRNAME
from utils.logger import get_logger

GRID_FILENAME = "validation_grid.png"
VALIDATION_INFERENCE_STEPS = 20  # the reference's
DEFAULT_VALIDATION_SEED = 0


def load_conditioning(paths, spec, resolution: int) -> list:
    """Each validation file as the ControlNet's (1, C, H, W) input at the training resolution (GeoTIFF for bands)."""
    from trainer.controlnet_data import validation_arrays

    return [torch.from_numpy(array)[None] for array in validation_arrays(paths, spec, resolution)]


def conditioning_picture(tensor: torch.Tensor, spec):
    """The false-colour RGB picture of a (1, C, H, W) conditioning input."""
    from utils.control_input import false_colour

    return false_colour(tensor[0].numpy(), spec)


def generate(pipeline, prompt: str, control: torch.Tensor, count: int, seed: Optional[int], device,
             weight_dtype: torch.dtype, resolution: int) -> list:
    """count images for one prompt/conditioning pair, seeded like trainer.validation's."""
    from trainer.validation import autocast_for

    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=device).manual_seed(DEFAULT_VALIDATION_SEED if seed is None else seed)
    images = []
    with torch.no_grad(), autocast_for(device, weight_dtype):
        for _ in range(count):
            images.append(pipeline(prompt, control.to(device), num_inference_steps=VALIDATION_INFERENCE_STEPS,
                                   generator=generator, height=resolution, width=resolution).images[0])
    return images


def save_step_images(rows: List[list], output_dir: Path, step: int) -> None:
    """validation/step-N/<pair>_<i>.png for every generated image."""
    folder = Path(output_dir) / VALIDATION_DIRNAME / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for pair, images in enumerate(rows):
        for index, image in enumerate(images):
            image.save(folder / f"{pair}_{index}.png")


def log_images(trackers, rows: List[list], pictures: list, labels: List[str], step: int) -> None:
    """Each pair's conditioning picture and images to tensorboard and wandb, under "validation"."""
    import numpy as np

    for tracker in trackers:
        if tracker.name == "tensorboard":
            for pair, (picture, images) in enumerate(zip(pictures, rows)):
                batch = np.stack([np.asarray(image.resize(images[0].size)) for image in [picture, *images]])
                tracker.writer.add_images(f"validation/{pair}", batch, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(image, caption=label) for label, picture, images
                                        in zip(labels, pictures, rows) for image in [picture, *images]]}, step=step)


@dataclass
class ControlValidation:
    """The validation pairs of a run, prepared once, and the frozen parts to build a pipeline around a ControlNet."""

    accelerator: object
    args: object
    components: object
    spec: object
    weight_dtype: torch.dtype
    ema: object
    prompts: list
    controls: list

    @classmethod
    def from_args(cls, accelerator, args, components, spec, weight_dtype, ema) -> Optional["ControlValidation"]:
        """The run's validation, or None without --validation_prompt/--validation_image."""
        from trainer.controlnet_args import validation_pairs

        pairs = validation_pairs(args.validation_prompt, args.validation_image)
        if not pairs:
            return None
        controls = load_conditioning([image for _, image in pairs], spec, args.resolution)
        return cls(accelerator, args, components, spec, weight_dtype, ema, [p for p, _ in pairs], controls)

    def pipeline(self, controlnet, scheduler):
        """A StableDiffusionControlNetPipeline over the frozen parts and controlnet."""
        from diffusers import StableDiffusionControlNetPipeline

        c = self.components
        return StableDiffusionControlNetPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, controlnet=controlnet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def run(self, controlnet, scheduler, step: int, dtype: torch.dtype) -> List[list]:
        """Generate, save and log every pair's images at step (main process)."""
        args, device = self.args, self.accelerator.device
        get_logger().info("Validation at step %d: %d prompt/conditioning pair(s) x %d image(s)", step,
                          len(self.prompts), args.num_validation_images)
        pipeline = self.pipeline(controlnet, scheduler)
        rows = [generate(pipeline, prompt, control, args.num_validation_images, args.seed, device, dtype,
                         args.resolution) for prompt, control in zip(self.prompts, self.controls)]
        save_step_images(rows, Path(args.output_dir), step)
        pictures = [conditioning_picture(control, self.spec) for control in self.controls]
        log_images(self.accelerator.trackers, rows, pictures, self.prompts, step)
        return rows

    def during_training(self, run, step: int) -> None:
        """Every --validation_steps optimizer steps, with the EMA weights swapped in (loop's after_step hook)."""
        if step % self.args.validation_steps or not self.accelerator.is_main_process:
            return
        from trainer.models import bare_model, ema_weights, eval_mode, frozen_models_on

        model = bare_model(run.unet)
        with frozen_models_on(self.components, self.accelerator.device, self.args.cache_latents), \
                eval_mode(model.controlnet), ema_weights(self.ema, run.trainable):
            self.run(model.controlnet, run.inference_scheduler, step, self.weight_dtype)

    def final(self, controlnet, step: int) -> Path:
        """The final images and OUTPUT_DIR/validation_grid.png: per pair, the conditioning then its images."""
        from trainer.models import frozen_models_on
        from trainer.validation import load_inference_scheduler
        from utils.grids import labelled_grid

        args = self.args
        scheduler = load_inference_scheduler(args.pretrained_model_name_or_path, args.revision, args.prediction_type)
        with frozen_models_on(self.components, self.accelerator.device, args.cache_latents):
            rows = self.run(controlnet.eval(), scheduler, step, self.weight_dtype)
        pictures = [conditioning_picture(control, self.spec) for control in self.controls]
        columns = ["conditioning"] + [f"image {i + 1}" for i in range(args.num_validation_images)]
        grid = labelled_grid([[picture, *images] for picture, images in zip(pictures, rows)], self.prompts, columns)
        path = Path(args.output_dir) / GRID_FILENAME
        write_png_atomic(path, grid)
        return path
