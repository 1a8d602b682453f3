"""Sample a fine-tuned Stable Diffusion model: a run's OUTPUT_DIR, or one of its checkpoint-N folders.

Flow: prompts and seeds (paired with --control_image files under --controlnet) → device → model (a checkpoint's UNet
goes into its base pipeline) → --metadata checked against its metadata_spec.json → output folder → sampler (with the
ControlNet, a StableDiffusionControlNetPipeline of the base's parts) → images, each saved with a JSON sidecar of its
settings as it is drawn → grid.png.
Run: python generate.py --model sd-rsicd-model --prompt "A satellite image of a crop field" --seed 0
     python generate.py --model BASE --controlnet CONTROL_RUN --control_image mask.png --prompt "..." --seed 0
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference.args import parse_args  # noqa: E402
from inference.control import control_request, prepare_sampling  # noqa: E402
from inference.outputs import prepare_output_dir, save_grid, save_image  # noqa: E402
from inference.pipeline import pick_device, resolve_model  # noqa: E402
from inference.prompts import base_seed, collect_prompts, plan_images  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.logger import get_logger, setup_logging  # noqa: E402
from utils.quiet import quiet_libraries  # noqa: E402


def settings_record(args, source, pipeline, device, dtype, metadata: dict) -> dict:
    """What every image's sidecar repeats: the model, weights and sampling settings, and the metadata asked for."""
    return {"negative_prompt": args.negative_prompt, "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale, "scheduler": type(pipeline.scheduler).__name__,
            "model": args.model, "pipeline": source.pipeline,
            "unet": str(source.unet) if source.unet is not None else None, "weights": source.weights,
            "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "lora": str(source.lora) if source.lora is not None else None, "lora_scale": source.lora_scale,
            "metadata": metadata, "metadata_guidance_scale": args.metadata_guidance_scale}


def main(argv=None) -> int:
    """Generate the requested images into --output_dir; usage errors are one line with exit code 2."""
    args = parse_args(argv)
    setup_logging()
    logger = get_logger()

    # What to draw: every prompt, each image with its own seed.
    prompts = collect_prompts(args.prompt, args.prompts_file)
    control = control_request(args.controlnet, args.control_image, args.controlnet_conditioning_scale, prompts)
    first_seed = base_seed(args.seed)
    rows = prompts if control is None else [prompt for prompt, _ in control.pairs]  # a grid row per pair
    plan = plan_images(rows, args.num_images_per_prompt, first_seed)

    # What draws it and where it goes; every flag is checked before --overwrite deletes a previous run's images.
    device, dtype = pick_device(args.device, args.dtype)
    source = resolve_model(args.model, args.base_model, args.weights, args.lora_scale)
    quiet_libraries()
    from inference.metadata_pipeline import check_source_request
    from inference.pipeline import generate, load_source

    metadata = check_source_request(source, args.metadata, args.metadata_guidance_scale)
    output_dir = prepare_output_dir(args.output_dir, args.overwrite)

    pipeline = load_source(source, device, dtype, args.scheduler)
    logger.info("Model %s (UNet: %s weights) on %s/%s; %d image(s) of %d prompt(s), seeds %d..%d",
                source.pipeline, source.weights, device.type, str(dtype).replace("torch.", ""), len(plan),
                len(prompts), first_seed, plan[-1][1])
    shared = settings_record(args, source, pipeline, device, dtype, metadata)
    call = {"conditioning": {"metadata": metadata, "metadata_guidance_scale": args.metadata_guidance_scale},
            "height": args.height, "width": args.width}
    per_image, pictures = lambda index: {}, None
    if control is not None:
        # The base's parts in a ControlNet pipeline; each image's control prepared as in training.
        sampling = prepare_sampling(control, pipeline, device, dtype, args.height, args.width,
                                    args.num_images_per_prompt)
        pipeline, pictures, shared = sampling.pipeline, sampling.pictures, {**shared, **control.settings()}
        call = {"conditioning": None, "per_image": sampling.per_image, "height": sampling.height,
                "width": sampling.width}
        per_image = lambda index: {"control_image": str(sampling.files[index])}  # noqa: E731
        logger.info("ControlNet %s (%s conditioning, scale %g); %d control image(s)", control.source.folder,
                    control.source.spec.type, control.scale, len(control.raws))

    # Draw, saving each image and its sidecar as soon as it exists.
    def save(index, image):
        """Write image index with its own prompt and seed (and control image)."""
        prompt, seed = plan[index]
        save_image(output_dir, index, image, {"prompt": prompt, "seed": seed, **per_image(index), **shared})

    images = generate(pipeline, [p for p, _ in plan], [s for _, s in plan], negative_prompt=args.negative_prompt,
                      num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                      batch_size=args.batch_size, on_image=save, **call)
    grid = save_grid(output_dir, images, plan, args.num_images_per_prompt, pictures)
    logger.info("Wrote %d image(s) with JSON sidecars to %s; grid: %s", len(images), output_dir, grid)
    print(grid)
    return 0


if __name__ == "__main__":
    run_main(main)
