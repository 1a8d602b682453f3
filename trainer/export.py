"""End of training: the final pipeline in OUTPUT_DIR, its validation images and grid, the model card, the push."""

from pathlib import Path
from typing import Optional

import torch

from utils.logger import get_logger


def final_unet(accelerator, unet, ema, params=None):
    """The UNet to ship: the unwrapped training UNet, carrying the EMA weights when EMA is on.

    params: what the EMA averages (the LoRA weights in LoRA mode); all of the UNet's weights when None.
    """
    from trainer.models import bare_model

    model = bare_model(unet)
    if ema is not None:
        ema.copy_to(params if params is not None else model.parameters())
    return model


def save_pipeline(model_path: str, revision: Optional[str], variant: Optional[str], unet, scheduler,
                  output_dir: Path):
    """Base VAE/text encoder/tokenizer + trained UNet + the trained scheduler config, saved as safetensors."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        model_path, unet=unet, scheduler=scheduler, safety_checker=None, requires_safety_checker=False,
        revision=revision, variant=variant, dtype=torch.float32)
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    get_logger().info("Saved the trained pipeline to %s", output_dir)
    return pipeline


def finish(run, global_step: int, hub_repo_id: Optional[str]) -> None:
    """Main process: write the pipeline, validate it, write the grid, model card and loss curve, push when asked."""
    from trainer.hub import push_final, write_model_card
    from trainer.loss_log import write_loss_curve
    from trainer.validation import save_grid, save_progress, validate

    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    unet = final_unet(accelerator, run.unet, run.ema, run.trainable)
    if run.lora is not None:
        from trainer.lora import save_final

        # Base weights stay in the weight dtype under LoRA, so validation keeps the training autocast.
        pipeline, dtype = save_final(run, output_dir), run.weight_dtype
    else:
        pipeline, dtype = save_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, unet,
                                        run.inference_scheduler, output_dir), torch.float32
        if run.metadata is not None:
            from trainer.metadata import write_spec
            from utils.constants import UNET_DIRNAME

            write_spec(run.metadata, output_dir / UNET_DIRNAME)
    grid_path = None
    if args.validation_prompts:
        images = validate(accelerator, pipeline.to(accelerator.device), args, global_step, dtype)
        grid_path = save_grid(images, args.validation_prompts, global_step, output_dir)
        save_progress(output_dir, global_step, args.validation_prompts)
    write_model_card(output_dir, args, hub_repo_id, grid_path)
    curve = write_loss_curve(output_dir)
    if curve is not None:
        get_logger().info("Loss curve: %s", curve)
    if args.push_to_hub:
        push_final(output_dir, hub_repo_id, args)
