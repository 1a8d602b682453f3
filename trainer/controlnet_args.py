"""Command line of train_controlnet.py: diffusers' train_controlnet.py flags (names, defaults, meaning) plus the
remote-sensing ones, built from trainer/args.py's groups where they are the same.

Kept free of torch/diffusers imports so that `--help` and every usage error answer instantly.
"""

import argparse
from functools import partial
from typing import Optional, Sequence

from trainer import args as shared
from utils.cli import ArgumentParser
from utils.constants import DEFAULT_GUIDANCE_SCALE

DESCRIPTION = ("Train a ControlNet beside a frozen Stable Diffusion on image/conditioning/caption triples "
               "(drop-in for diffusers' controlnet example; masks, maps and multi-band sensors too).")
CONDITIONING_TYPES = ("image", "mask", "bands")
# As in diffusers' script, 0 steps trains nothing and writes the ControlNet as it starts: from the UNet, its outputs
# zero, so it draws what the base draws; evaluate.py scores that as the untrained ControlNet.
ZERO_STEPS = " 0 trains nothing and writes the ControlNet as initialised (its zero outputs leave the base unchanged)."

# The reference ControlNet trainer's defaults where they differ from the text-to-image trainer's.
CONTROLNET_DEFAULTS = {
    "output_dir": "controlnet-model", "learning_rate": 5e-6, "train_batch_size": 4, "num_train_epochs": 1,
    "dataloader_num_workers": 0, "image_interpolation_mode": "bilinear",
}
# What the shared trainer code reads of modes a ControlNet run does not have (no flag sets them): no LoRA, no
# metadata embedding, no per-epoch validation (ControlNet validation runs every --validation_steps), the reference's
# fixed centre crop.
FIXED_SETTINGS = {
    "center_crop": True, "non_ema_revision": None, "lora_rank": None, "lora_alpha": None, "lora_dropout": 0.0,
    "lora_target_modules": "attention", "use_dora": False, "train_text_encoder_lora": False,
    "metadata_fields": None, "metadata_column": "metadata", "metadata_frequencies": 4, "metadata_dropout": 0.0,
    "metadata_drop_all": 0.0, "validation_prompts": None, "validation_epochs": 1,
    "validation_guidance_scale": DEFAULT_GUIDANCE_SCALE,
}


def _add_controlnet_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the ControlNet itself and of its conditioning input."""
    group = parser.add_argument_group("ControlNet")
    group.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                       help="ControlNet to start from (Hub id or local folder). Unset: initialised from the base "
                            "UNet's encoder (ControlNetModel.from_unet). An RGB ControlNet given another "
                            "--conditioning_channels gets a wider first convolution: RGB kernels copied, the "
                            "extra ones zero.")
    group.add_argument("--tokenizer_name", type=str, default=None,
                       help="Tokenizer to use instead of the base pipeline's (a Hub id or folder).")
    group.add_argument("--conditioning_image_column", type=str, default="conditioning_image",
                       help="Dataset column holding the conditioning image (an image, or a path relative to the "
                            "data folder as format.py writes it).")
    group.add_argument("--conditioning_type", type=str, default=None, choices=CONDITIONING_TYPES,
                       help="image: RGB in 0..1; mask: class indices made one-hot; bands: multi-band values "
                            "normalised as the data folder's conditioning.json says. Unset: that file's type, "
                            "else image.")
    group.add_argument("--num_classes", type=int, default=None,
                       help="Classes of a mask conditioning: a mask becomes this many one-hot channels. Unset: "
                            "the data folder's conditioning.json 'classes'.")
    group.add_argument("--conditioning_channels", type=int, default=None,
                       help="Input channels of the ControlNet (passed to ControlNetModel.from_unet). Unset: what "
                            "the conditioning gives (3 for image, K for a mask, one per band).")
    group.add_argument("--lr_num_cycles", type=int, default=1,
                       help="Hard resets of the cosine_with_restarts learning-rate schedule.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power factor of the polynomial schedule.")
    group.add_argument("--set_grads_to_none", action="store_true",
                       help="Accepted for compatibility: gradients are always set to None after each update, "
                            "which is what the flag asks for.")
    shared.add_empty_prompts_arg(group)


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ControlNet validation (every --validation_steps) and of the trackers."""
    group = parser.add_argument_group("validation and tracking")
    group.add_argument("--validation_prompt", type=str, nargs="+", default=None,
                       help="Prompts for validation: one per --validation_image, one for all of them, or several "
                            "for one image.")
    group.add_argument("--validation_image", type=str, nargs="+", default=None,
                       help="Conditioning files for validation (PNG/JPEG; GeoTIFF or .npy for bands), paired with "
                            "--validation_prompt as diffusers pairs them.")
    group.add_argument("--num_validation_images", type=int, default=4,
                       help="Images generated for each prompt/conditioning pair.")
    group.add_argument("--validation_steps", type=int, default=100,
                       help="Validate every N optimizer steps (with --validation_prompt) and at the end.")
    shared.add_tracker_args(group, "train_controlnet")


def build_parser() -> ArgumentParser:
    """The ControlNet trainer's argument parser."""
    parser = ArgumentParser(prog="train_controlnet.py", description=DESCRIPTION)
    shared._add_model_args(parser, unet_revisions=False)
    _add_controlnet_args(parser)
    shared._add_data_args(parser, crop_flag=False)
    for add in (shared._add_cache_args, partial(shared._add_optimisation_args, zero_steps=ZERO_STEPS),
                shared._add_optimizer_args,
                shared._add_ema_args, shared._add_checkpoint_args, _add_validation_args, shared._add_hub_args):
        add(parser)
    parser.set_defaults(**CONTROLNET_DEFAULTS, **FIXED_SETTINGS)
    return parser


def validation_pairs(prompts: Optional[Sequence[str]], images: Optional[Sequence[str]]) -> list:
    """(prompt, conditioning file) pairs: N:N zipped, one image for all prompts, one prompt for all images."""
    if not prompts or not images:
        return []
    if len(images) == 1:
        return [(prompt, images[0]) for prompt in prompts]
    if len(prompts) == 1:
        return [(prompts[0], image) for image in images]
    return list(zip(prompts, images))


def check_validation_args(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """The reference's pairing rules for --validation_prompt / --validation_image, as one-line errors."""
    prompts, images = args.validation_prompt, args.validation_image
    if (prompts is None) != (images is None):
        given, needed = ("--validation_prompt", "--validation_image") if images is None else \
            ("--validation_image", "--validation_prompt")
        parser.error(f"{given} needs {needed} too.")
    if prompts and images and len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
        parser.error(f"{len(prompts)} --validation_prompt values and {len(images)} --validation_image values: give "
                     "one of either, or as many of each.")


def check_controlnet_args(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """ControlNet-specific refusals: counts at least 1, and modes whose UNet call cannot carry the conditioning."""
    for flag, value in (("--num_classes", args.num_classes), ("--conditioning_channels", args.conditioning_channels),
                        ("--num_validation_images", args.num_validation_images),
                        ("--validation_steps", args.validation_steps)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}.")
    if args.num_classes is not None and args.conditioning_type not in (None, "mask"):
        parser.error(f"--num_classes applies to --conditioning_type mask, not {args.conditioning_type}.")
    if args.dream_training:
        parser.error("--dream_training does not work with a ControlNet (diffusers' DREaM step calls the UNet "
                     "without the conditioning).")
    check_validation_args(parser, args)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the ControlNet trainer's command line (sys.argv when argv is None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shared.check_args(parser, args, fewest_steps=0)
    check_controlnet_args(parser, args)
    return args
