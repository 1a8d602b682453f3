"""LoRA fine-tuning with diffusers' train_text_to_image_lora.py command line, run by our trainer.

Its flags and defaults are accepted unchanged (--rank 4, one --validation_prompt drawn --num_validation_images
times, --validation_epochs 1, --output_dir sd-model-finetuned-lora); they are translated into
train_text_to_image.py's LoRA flags, so every other flag of ours (--lora_alpha, --use_ema, --cache_latents, ...)
works here too. Outputs: OUTPUT_DIR/pytorch_lora_weights.safetensors (diffusers), a kohya-format copy,
lora_run.json and the model card.
"""

import sys
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.cli import ArgumentParser, run_main  # noqa: E402

# The reference LoRA script's defaults where they differ from train_text_to_image.py's.
REFERENCE_DEFAULTS = {"--output_dir": "sd-model-finetuned-lora", "--validation_epochs": "1"}
DEFAULT_RANK = 4
DEFAULT_NUM_VALIDATION_IMAGES = 4


def reference_parser() -> ArgumentParser:
    """The flags whose meaning differs from ours; exact names only, so ours pass through untouched."""
    parser = ArgumentParser(prog="train_text_to_image_lora.py", add_help=False, allow_abbrev=False)
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK)
    parser.add_argument("--validation_prompt", type=str, default=None)
    parser.add_argument("--num_validation_images", type=int, default=DEFAULT_NUM_VALIDATION_IMAGES)
    return parser


def translate(argv: Sequence[str]) -> List[str]:
    """diffusers' LoRA command line → train_text_to_image.py's: --rank → --lora_rank, the prompt repeated."""
    parser = reference_parser()
    known, rest = parser.parse_known_args(list(argv))
    if known.rank < 1:
        parser.error(f"--rank must be at least 1, got {known.rank}.")
    if known.num_validation_images < 0:
        parser.error(f"--num_validation_images must not be negative, got {known.num_validation_images}.")
    given = {arg.split("=", 1)[0] for arg in rest if arg.startswith("--")}
    defaults = [item for flag, value in REFERENCE_DEFAULTS.items() if flag not in given for item in (flag, value)]
    # Validation draws one image per listed prompt from one seeded generator, so repeats give distinct images.
    prompts = [known.validation_prompt] * known.num_validation_images if known.validation_prompt else []
    return [*defaults, "--lora_rank", str(known.rank), *(["--validation_prompts", *prompts] if prompts else []),
            *rest]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Translate the command line and train with train_text_to_image.py's main."""
    import train_text_to_image

    arguments = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(arguments):
        print("train_text_to_image_lora.py: diffusers' LoRA flags (--rank, default 4; --validation_prompt with "
              "--num_validation_images, default 4) plus every flag below.\n")
    return train_text_to_image.main(translate(arguments))


if __name__ == "__main__":
    run_main(main)
