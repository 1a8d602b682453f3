"""generate.py's command line."""

from typing import Optional, Sequence

from diffusion_model.geo_metadata import parse_literals
from inference.pipeline import DTYPES, WEIGHTS_CHOICES, check_size
from inference.schedulers import SCHEDULERS
from utils.cli import ArgumentParser, UsageError, check_at_least, check_finite
from utils.constants import DEFAULT_BASE_MODEL, DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS

DEFAULT_OUTPUT_DIR = "generated"


def build_parser() -> ArgumentParser:
    """Every flag of generate.py with its default and help."""
    parser = ArgumentParser(description="Sample images from a fine-tuned Stable Diffusion run or one of its "
                                        "checkpoints: PNGs, a JSON sidecar of settings per image, and a grid.")
    parser.add_argument("--model", required=True,
                        help="a training OUTPUT_DIR (the saved pipeline, or a LoRA run's adapters), a checkpoint-N folder "
                             "of it, or a Hub id")
    parser.add_argument("--base_model", default=None,
                        help="pipeline whose VAE/text encoder/tokenizer/scheduler a checkpoint's UNet goes into "
                             "(default: the run's own pipeline in the checkpoint's parent folder when training "
                             f"finished, else {DEFAULT_BASE_MODEL})")
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                        help="for a checkpoint: its unet_ema/ (ema), its unet/ (unet), or auto = EMA when present (for a "
                             "LoRA checkpoint: lora_ema/ or its own adapters)")
    parser.add_argument("--lora_scale", type=float, default=1.0,
                        help="strength of a LoRA run's adapters (1 = as trained, 0 = the base model alone)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt; repeat the flag for several")
    parser.add_argument("--prompts_file", default=None, help="UTF-8 text file, one prompt per line (blank lines skipped)")
    parser.add_argument("--negative_prompt", default=None, help="what to steer away from, for every image")
    parser.add_argument("--num_images_per_prompt", type=int, default=1, help="images drawn for each prompt")
    parser.add_argument("--seed", type=int, default=None,
                        help="image i uses seed+i, so a seed reproduces the pixels (default: drawn at random and "
                             "written to each image's sidecar)")
    parser.add_argument("--height", type=int, default=None, help="a multiple of 8 (default: the model's, 512 for SD1.5)")
    parser.add_argument("--width", type=int, default=None, help="a multiple of 8 (default: the model's, 512 for SD1.5)")
    parser.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="denoising steps")
    parser.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                        help="classifier-free guidance; 1 turns it off")
    parser.add_argument("--metadata", type=parse_literals, default=None,
                        help="for a model trained with --metadata_fields: FIELD=VALUE pairs the images should have, "
                             "e.g. gsd=0.5,lat=37.77,lon=-122.42,date=2021-07-01 (values as create.py's --metadata; "
                             "fields left out are absent)")
    parser.add_argument("--metadata_guidance_scale", type=float, default=1.0,
                        help="guidance towards the metadata on top of --guidance_scale: eps_absent + S * "
                             "(eps_metadata - eps_absent), the absent prediction made with all metadata absent; "
                             "1 = no extra guidance (one UNet pass), other values cost a second pass")
    parser.add_argument("--controlnet", default=None,
                        help="a ControlNet to steer the images with: train_controlnet.py's OUTPUT_DIR (its "
                             "conditioning.json says how control images are prepared), one of its checkpoint-N "
                             "folders, or a diffusers ControlNet folder (RGB control images); --model is its base")
    parser.add_argument("--control_image", default=None,
                        help="with --controlnet: a conditioning file (PNG/JPEG image or mask, GeoTIFF or .npy "
                             "bands) or a folder of them (sorted by name); one control image serves every prompt, "
                             "one prompt every control image, or N prompts pair with N files in order")
    parser.add_argument("--controlnet_conditioning_scale", type=float, default=1.0,
                        help="strength of the ControlNet's residuals (0 = the base model alone)")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default=None,
                        help="sampler, built from the model's scheduler config (default: the model's own)")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (memory vs speed)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda with fp16 when present, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto",
                        help="weights and sampling precision: auto = fp16 on cuda, fp32 on cpu; bf16 runs on both; "
                             "fp16 needs cuda")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="where the PNGs, sidecars and grid.png go")
    parser.add_argument("--overwrite", action="store_true", help="replace images a previous run left in --output_dir")
    return parser


def check_args(args) -> None:
    """Value checks argparse cannot express, so every flag is checked before --overwrite deletes anything."""
    check_size("--height", args.height)
    check_size("--width", args.width)
    check_at_least("--num_inference_steps", args.num_inference_steps, 1)
    check_at_least("--batch_size", args.batch_size, 1)
    check_finite("--guidance_scale", args.guidance_scale)
    check_finite("--lora_scale", args.lora_scale)
    check_finite("--metadata_guidance_scale", args.metadata_guidance_scale)
    check_finite("--controlnet_conditioning_scale", args.controlnet_conditioning_scale)
    check_control_flags(args)


def check_control_flags(args) -> None:
    """--controlnet and --control_image go together; the scale needs them; metadata cannot be combined."""
    if args.control_image is not None and args.controlnet is None:
        raise UsageError(f"--control_image '{args.control_image}' needs --controlnet DIR (the ControlNet it steers).")
    if args.controlnet is not None and args.control_image is None:
        raise UsageError(f"--controlnet '{args.controlnet}' needs --control_image FILE_OR_DIR.")
    if args.controlnet is None and args.controlnet_conditioning_scale != 1.0:
        raise UsageError(f"--controlnet_conditioning_scale {args.controlnet_conditioning_scale} applies with "
                         "--controlnet only.")
    if args.controlnet is not None and (args.metadata or args.metadata_guidance_scale != 1.0):
        raise UsageError("--metadata and --metadata_guidance_scale cannot be combined with --controlnet yet.")


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse and check the command line (bad flags: one line, exit 2)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return args
