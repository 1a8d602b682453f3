"""evaluate.py's command line: flags with defaults and help, checked up front with one-line errors."""

from typing import Optional, Sequence

from inference.pipeline import WEIGHTS_CHOICES
from inference.schedulers import check_scheduler
from utils.cli import ArgumentParser, UsageError, check_at_least, check_finite
from utils.constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_RESOLUTION

LATENT_MULTIPLE = 8


def build_parser() -> ArgumentParser:
    """All of evaluate.py's flags."""
    parser = ArgumentParser(description="Generate one image per held-out caption and measure FID and CLIP score.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="a training OUTPUT_DIR (saved pipeline) or a checkpoint-N dir")
    model.add_argument("--base_model", help="pipeline a checkpoint's UNet goes into (default: the run's own "
                                            "pipeline beside the checkpoint, else SD1.5)")
    model.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                       help="checkpoint UNet to use: auto = unet_ema/ when present, else unet/")
    model.add_argument("--scheduler", help="sampling scheduler by name (default: the model's own)")
    model.add_argument("--device", help="cpu or cuda (default: cuda when available; fp16 on cuda, fp32 on cpu)")
    data = parser.add_argument_group("held-out data (one of)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="folder holding metadata.jsonl (format.py's output)")
    source.add_argument("--parquet_path", help="Parquet split: a file or a folder of shards (RSICD or image+text)")
    data.add_argument("--caption_index", type=int, default=0,
                      help="which of a row's captions to use, counted after dropping junk and near-duplicates as "
                           "create.py does (0 = first, the standard protocol)")
    data.add_argument("--num_samples", type=int, help="evaluate the first N rows (default: all)")
    data.add_argument("--class_column", help="column (Parquet) or metadata.jsonl key holding each row's scene class "
                                             "(default: the class prefix of RSICD file names, airport_1.jpg)")
    metrics = parser.add_argument_group("metric models (local paths; python -m evaluation.stand_ins makes random ones)")
    metrics.add_argument("--inception_weights", required=True,
                         help="FID InceptionV3 weights, e.g. pt_inception-2015-12-05-6726825d.pth")
    metrics.add_argument("--clip_model", required=True, help="CLIP model folder, e.g. openai/clip-vit-base-patch32")
    run = parser.add_argument_group("generation and output")
    run.add_argument("--output_dir", required=True, help="EVAL_DIR: generated/, eval_report.json, sheet.html")
    run.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="denoising steps")
    run.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="classifier-free guidance")
    run.add_argument("--seed", type=int, default=0, help="row n's image uses seed + n - 1")
    run.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                     help="side of the generated images; real images are centre-cropped and resized to it")
    run.add_argument("--batch_size", type=int, default=1, help="images generated per pipeline call")
    run.add_argument("--metric_batch_size", type=int, default=16, help="images per Inception/CLIP forward pass")
    run.add_argument("--sheet_pairs", type=int, default=8, help="real/generated pairs shown in sheet.html")
    run.add_argument("--overwrite", action="store_true",
                     help="delete generated images made with other settings instead of refusing")
    return parser


def check_args(args) -> None:
    """Value checks argparse cannot express; every one names the flag and the value."""
    check_at_least("--num_samples", args.num_samples, 2)  # FID needs two samples per side for a covariance
    check_at_least("--caption_index", args.caption_index, 0)
    check_at_least("--num_inference_steps", args.num_inference_steps, 1)
    check_at_least("--batch_size", args.batch_size, 1)
    check_at_least("--metric_batch_size", args.metric_batch_size, 1)
    check_at_least("--sheet_pairs", args.sheet_pairs, 0)
    if args.resolution <= 0 or args.resolution % LATENT_MULTIPLE:
        raise UsageError(f"--resolution {args.resolution} must be a positive multiple of {LATENT_MULTIPLE}")
    check_finite("--guidance_scale", args.guidance_scale)
    if args.scheduler is not None:
        check_scheduler(args.scheduler)


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse and check the command line."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return args
