"""evaluate.py's command line: flags with defaults and help, checked up front with one-line errors."""

from typing import Optional, Sequence

from diffusion_model.sources import FORMATS, SPLITS, SourceOptions
from inference.pipeline import DTYPES, WEIGHTS_CHOICES
from inference.schedulers import check_scheduler
from utils.cli import ArgumentParser, UsageError, check_at_least, check_finite
from utils.constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_RESOLUTION

LATENT_MULTIPLE = 8


def build_parser() -> ArgumentParser:
    """All of evaluate.py's flags."""
    parser = ArgumentParser(description="Generate one image per held-out caption and measure FID and CLIP score.")
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help="a training OUTPUT_DIR (saved pipeline or LoRA run) or a checkpoint-N dir")
    model.add_argument("--base_model", help="pipeline a checkpoint's UNet goes into (default: the run's own "
                                            "pipeline beside the checkpoint, else SD1.5)")
    model.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                       help="checkpoint UNet to use: auto = unet_ema/ when present, else unet/")
    model.add_argument("--lora_scale", type=float, default=1.0,
                       help="strength of a LoRA run's adapters (1 = as trained)")
    model.add_argument("--scheduler", help="sampling scheduler by name (default: the model's own)")
    model.add_argument("--controlnet", help="a ControlNet (train_controlnet.py's OUTPUT_DIR) steering --model, the "
                                            "base: each --data_dir row is drawn from its conditioning_image, and "
                                            "control fidelity is reported (control_miou for masks, control_psnr "
                                            "and control_ssim otherwise, each with a shuffled-conditioning floor)")
    model.add_argument("--controlnet_conditioning_scale", type=float, default=1.0,
                       help="strength of the ControlNet's residuals")
    model.add_argument("--control_train_dir",
                       help="create.py + format.py folder of mask pairs the control segmenter is fitted on (default: "
                            "the folder the ControlNet was trained on, from its conditioning.json)"),
    model.add_argument("--device", help="cpu or cuda (default: cuda when available; fp16 on cuda, fp32 on cpu)")
    model.add_argument("--dtype", choices=list(DTYPES), default="auto",
                       help="weights and sampling precision: auto = fp16 on cuda, fp32 on cpu; bf16 runs on both; "
                            "fp16 needs cuda. Part of the settings a resumed run must repeat")
    data = parser.add_argument_group("held-out data (one of)")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="folder holding metadata.jsonl (format.py's output), or a sharded folder "
                                           "(create.py --output_format webdataset)")
    source.add_argument("--parquet_path", help="Parquet split: a file or a folder of shards (RSICD or image+text)")
    source.add_argument("--input", help="any create.py source: a Karpathy or NWPU .json (read at --split), a .csv or "
                                        ".jsonl index or a folder holding one, webdataset .tar shards, Parquet")
    data.add_argument("--format", choices=FORMATS, default="auto", help="--input's form (auto: from the name)")
    data.add_argument("--split", choices=SPLITS,
                      help="split of an --input JSON index or CSV/JSONL with a split column (default: test); for "
                           "Parquet or tar shards, the files whose names start with it (default: all files)")
    data.add_argument("--images_dir", help="folder an --input index's image names resolve in (default: its own)")
    data.add_argument("--caption_index", type=int, default=0,
                      help="which of a row's captions to use, counted after dropping junk and near-duplicates as "
                           "create.py does (0 = first, the standard protocol)")
    data.add_argument("--num_samples", type=int, help="evaluate the first N rows (default: all)")
    data.add_argument("--class_column", help="column (Parquet, CSV, JSONL) or metadata.jsonl key holding each row's "
                                             "scene class (default: the class prefix of the row's file name, "
                                             "airport_1.jpg or farmland_2009_00.jpg)")
    metrics = parser.add_argument_group("metric models (local paths; python -m evaluation.stand_ins makes random ones)")
    metrics.add_argument("--inception_weights", required=True,
                         help="FID InceptionV3 weights, e.g. pt_inception-2015-12-05-6726825d.pth")
    metrics.add_argument("--clip_model", required=True, help="CLIP model folder, e.g. openai/clip-vit-base-patch32")
    run = parser.add_argument_group("generation and output")
    run.add_argument("--output_dir", required=True, help="EVAL_DIR: generated/, eval_report.json, sheet.html")
    run.add_argument("--num_inference_steps", type=int, default=DEFAULT_NUM_INFERENCE_STEPS, help="denoising steps")
    run.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE, help="classifier-free guidance")
    run.add_argument("--seed", type=int, default=0, help="row n's image uses seed + n - 1")
    run.add_argument("--shared_seed", action="store_true",
                     help="every row's image from --seed itself: images then differ only by their captions, so a "
                          "model that ignores captions scores exactly chance on scene accuracy (demo.sh uses it); "
                          "FID then sees less diversity and compares only with other --shared_seed runs")
    run.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                     help="side of the generated images; real images are centre-cropped and resized to it")
    run.add_argument("--batch_size", type=int, default=1, help="images generated per pipeline call")
    run.add_argument("--metric_batch_size", type=int, default=16, help="images per Inception/CLIP forward pass")
    run.add_argument("--sheet_pairs", type=int, default=8, help="real/generated pairs shown in sheet.html")
    run.add_argument("--overwrite", action="store_true",
                     help="delete generated images made with other settings instead of refusing")
    add_gsd_flags(parser)
    return parser


def add_gsd_flags(parser: ArgumentParser) -> None:
    """GSD adherence (evaluation/gsd.py): the probe's training folder and the sweep's size."""
    gsd = parser.add_argument_group("GSD adherence (held-out --data_dir rows whose metadata carry a gsd)")
    gsd.add_argument("--gsd_probe_data", help="the run's training folder (create.py + format.py, metadata.jsonl "
                                              "with gsd): a GSD probe learns from its images at random zooms and "
                                              "judges the generated ones (default: no GSD figures)")
    gsd.add_argument("--gsd_probe_vae", action="store_true",
                     help="pass the probe's crops and the real held-out images through the model's VAE (encode, "
                          "decode) first, so a VAE that blurs fine texture is not read as a finer GSD; costs a VAE "
                          "round trip per crop")
    gsd.add_argument("--gsd_sweep_rows", type=int, default=4,
                     help="held-out rows (the first ones) each drawn at every sweep GSD, same caption and seed")
    gsd.add_argument("--gsd_sweep_points", type=int, default=8,
                     help="GSDs of the sweep, log-spaced over 0.3-10 m clipped to the probe data's GSD range")


def check_args(args) -> None:
    """Value checks argparse cannot express; every one names the flag and the value."""
    check_at_least("--num_samples", args.num_samples, 2)  # FID needs two samples per side for a covariance
    check_at_least("--caption_index", args.caption_index, 0)
    check_at_least("--num_inference_steps", args.num_inference_steps, 1)
    check_at_least("--batch_size", args.batch_size, 1)
    check_at_least("--metric_batch_size", args.metric_batch_size, 1)
    check_at_least("--sheet_pairs", args.sheet_pairs, 0)
    check_at_least("--gsd_sweep_rows", args.gsd_sweep_rows, 1)
    check_at_least("--gsd_sweep_points", args.gsd_sweep_points, 2)  # a rank correlation needs two points
    if args.resolution <= 0 or args.resolution % LATENT_MULTIPLE:
        raise UsageError(f"--resolution {args.resolution} must be a positive multiple of {LATENT_MULTIPLE}")
    check_finite("--guidance_scale", args.guidance_scale)
    check_finite("--lora_scale", args.lora_scale)
    if args.scheduler is not None:
        check_scheduler(args.scheduler)
    check_finite("--controlnet_conditioning_scale", args.controlnet_conditioning_scale)
    check_control_flags(args)


def check_control_flags(args) -> None:
    """The ControlNet's flags go with --controlnet, which needs --data_dir rows naming their conditioning."""
    given = [flag for flag, on in (("--controlnet_conditioning_scale", args.controlnet_conditioning_scale != 1.0),
                                   ("--control_train_dir", args.control_train_dir is not None)) if on]
    if given and args.controlnet is None:
        raise UsageError(f"{', '.join(given)} apply with --controlnet only")
    if args.controlnet is not None and args.data_dir is None:
        raise UsageError("--controlnet needs --data_dir: a create.py + format.py folder whose metadata.jsonl names "
                         "each row's conditioning_image")


def check_source_flags(args) -> None:
    """--format, --split and --images_dir describe --input; without it they would be silently ignored."""
    given = [flag for flag, on in (("--format", args.format != "auto"), ("--split", args.split is not None),
                                   ("--images_dir", args.images_dir is not None)) if on]
    if given and args.input is None:
        raise UsageError(f"{', '.join(given)} apply to --input only")


def source_options(args) -> SourceOptions:
    """How to read --input (held-out data defaults to the test split)."""
    return SourceOptions(args.format, args.split, args.images_dir, default_split="test")


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse and check the command line."""
    args = build_parser().parse_args(argv)
    check_args(args)
    check_source_flags(args)
    return args
