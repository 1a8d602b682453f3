"""Command line of train_text_to_image.py: the reference trainer's flags, names, defaults and meaning.

Kept free of torch/diffusers imports so that `--help` and every usage error answer instantly.
The parsed Namespace is never mutated afterwards: values derived from it get their own names.
"""

import argparse
import math
from typing import Optional, Sequence

from utils.cli import ArgumentParser
from utils.constants import DEFAULT_CACHE_CHUNK_ROWS, DEFAULT_GUIDANCE_SCALE, DEFAULT_TEXT_CACHE_BUDGET_GB

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
INTERPOLATION_MODES = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# accelerate's tracker names; "all" asks for every installed one.
REPORT_TO_CHOICES = (
    "tensorboard", "wandb", "comet_ml", "mlflow", "clearml", "dvclive", "aim", "swanlab", "trackio", "all",
)
WANDB_REPORTS = ("wandb", "all")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")
# --lora_target_modules presets; anything else is a comma-separated list of module names (trainer/lora.py).
LORA_TARGET_PRESETS = ("attention", "all_linear")

DESCRIPTION = "Fine-tune Stable Diffusion's UNet on image/caption pairs (drop-in for diffusers' text_to_image example)."


def _add_model_args(parser: argparse.ArgumentParser, unet_revisions: bool = True) -> None:
    """Flags choosing the base pipeline and its weights; unet_revisions: also --non_ema_revision (a trained UNet)."""
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="Base pipeline: a Hugging Face Hub id or a local diffusers pipeline folder.")
    group.add_argument("--revision", type=str, default=None,
                       help="Hub revision (branch, tag or commit) of the base pipeline.")
    group.add_argument("--variant", type=str, default=None,
                       help="Weight file variant to load, e.g. 'fp16' (text encoder, VAE and EMA UNet).")
    if unet_revisions:
        group.add_argument("--non_ema_revision", type=str, default=None,
                           help="Revision of the non-EMA UNet to train from; defaults to --revision.")
    group.add_argument("--prediction_type", type=str, default=None, choices=PREDICTION_TYPES,
                       help="Training target: 'epsilon' or 'v_prediction'. Unset: the scheduler's own.")


def _add_data_args(parser: argparse.ArgumentParser, crop_flag: bool = True) -> None:
    """Flags choosing the dataset and how images are prepared; crop_flag: also --center_crop (else the caller
    fixes the crop)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="Dataset to train on: a Hub dataset id or a local dataset path.")
    group.add_argument("--dataset_config_name", type=str, default=None,
                       help="Config of the dataset; leave unset if it has only one.")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="Local imagefolder: the folder holding metadata.jsonl (not the images subfolder), or a "
                            "sharded folder (create.py --output_format webdataset), read by offset from its tars.")
    group.add_argument("--image_column", type=str, default="image",
                       help="Dataset column holding the images.")
    group.add_argument("--caption_column", type=str, default="text",
                       help="Dataset column holding a caption or a list of captions (one picked at random per step).")
    group.add_argument("--max_train_samples", type=int, default=None,
                       help="Train on the first N examples after a seeded shuffle (for debugging or quick runs).")
    group.add_argument("--cache_dir", type=str, default=None,
                       help="Where downloaded models and datasets are cached.")
    group.add_argument("--resolution", type=int, default=512,
                       help="Images are resized so the shorter side is this, then cropped square. Multiple of 8.")
    if crop_flag:
        group.add_argument("--center_crop", action="store_true",
                           help="Crop the centre of each image; otherwise a random crop.")
    group.add_argument("--random_flip", action="store_true",
                       help="Flip images horizontally at random.")
    group.add_argument("--image_interpolation_mode", type=str, default="lanczos", choices=INTERPOLATION_MODES,
                       help="Interpolation used when resizing images.")
    group.add_argument("--dataloader_num_workers", type=int, default=None,
                       help="Data loading worker processes per training process (persistent, prefetching); 0 loads "
                            "in the main process. Unset: the process's share of the CPU cores minus one, at most 8.")


def _add_cache_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the cache of frozen-model outputs (VAE latents, text-encoder states)."""
    group = parser.add_argument_group("latent cache")
    group.add_argument("--cache_latents", action="store_true",
                       help="Before training, encode every image with the VAE (and its mirror image with "
                            "--random_flip) and every distinct caption with the text encoder, once; train from that "
                            "cache, sampling each step's latents from the stored mean and std. Needs --center_crop. "
                            "The VAE (and the text encoder when its states are cached, see --text_cache) then stay off "
                            "the accelerator except for validation.")
    group.add_argument("--latents_cache_dir", type=str, default=None,
                       help="Folder of the latent cache (not --cache_dir, which is the datasets/models download "
                            "cache). Unset: OUTPUT_DIR/.cache/latents. A rerun with the same model, data and image "
                            "settings reuses it; any change builds a new one.")
    group.add_argument("--vae_batch_size", type=int, default=None,
                       help="Images (and captions) per encoder batch while building the latent cache. Default: "
                            "--train_batch_size, so the build never encodes more images at once than an uncached "
                            "step does; raise it for a faster build where memory allows.")
    group.add_argument("--cache_chunk_rows", type=int, default=DEFAULT_CACHE_CHUNK_ROWS,
                       help="Rows per chunk file of the latent cache. A build holds one chunk in memory at a time, "
                            "and an interrupted build redoes at most one chunk per process.")
    group.add_argument("--text_cache", type=str, default="auto", choices=("auto", "on", "off"),
                       help="Cache the text encoder's states of every distinct caption (on), or only their token ids "
                            "and run the frozen text encoder each step (off; it then stays on the accelerator). "
                            "auto: on when the states fit --text_cache_budget_gb.")
    group.add_argument("--text_cache_budget_gb", type=float, default=DEFAULT_TEXT_CACHE_BUDGET_GB,
                       help="With --text_cache auto: the most disk, in GB (1e9 bytes), the text states may take "
                            "(distinct captions x context length x hidden size x dtype bytes).")


def _add_metadata_args(parser: argparse.ArgumentParser) -> None:
    """Flags of metadata conditioning (GSD, place, date, cloud, off-nadir, sensor) and guidance dropout."""
    group = parser.add_argument_group("metadata conditioning")
    group.add_argument("--metadata_fields", type=str, default=None,
                       help="Condition the UNet on these fields of each row's metadata (any of gsd,lat,lon,date,"
                            "cloud,off_nadir,sensor; lat and lon together), through a zero-initialised projection "
                            "class embedding; the encoding is written to unet/metadata_spec.json. Unset: no "
                            "metadata conditioning.")
    group.add_argument("--metadata_column", type=str, default="metadata",
                       help="Dataset column holding each row's metadata dict (format.py's metadata.jsonl key).")
    group.add_argument("--metadata_frequencies", type=int, default=4,
                       help="Fourier frequencies (pi * 2^k, k < N) per encoded metadata scalar.")
    group.add_argument("--metadata_dropout", type=float, default=0.1,
                       help="Probability of dropping each metadata field of a row (features and present bit "
                            "cleared), for metadata guidance.")
    group.add_argument("--metadata_drop_all", type=float, default=0.05,
                       help="Probability of dropping a row's whole metadata vector.")
    add_empty_prompts_arg(group)


def add_empty_prompts_arg(group) -> None:
    """--proportion_empty_prompts (the SDXL and ControlNet scripts' caption dropout) in group."""
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                       help="Probability of replacing a row's caption by the empty prompt (text guidance), in [0, 1].")


def _add_optimisation_args(parser: argparse.ArgumentParser, zero_steps: str = "") -> None:
    """Flags for the run length, batch and learning-rate schedule; zero_steps: what --max_train_steps 0 does, where
    a trainer accepts it."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--output_dir", type=str, default="sd-model-finetuned",
                       help="Where checkpoints, logs and the final pipeline are written.")
    group.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    group.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=int, default=100,
                       help="Epochs to train; ignored when --max_train_steps is given.")
    group.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs." + zero_steps)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Batches accumulated before each optimizer step.")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass to save memory.")
    group.add_argument("--learning_rate", type=float, default=1e-4, help="Initial learning rate (after warmup).")
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by accumulation steps, batch size and process count.")
    group.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                       help="Learning-rate schedule.")
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the LR schedule.")
    group.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR weighting gamma (arXiv:2303.09556); 5.0 is recommended. Unset: plain MSE.")
    group.add_argument("--dream_training", action="store_true",
                       help="Use DREaM (Diffusion Rectification and Estimation-Adaptive Models, arXiv:2312.00210).")
    group.add_argument("--dream_detail_preservation", type=float, default=1.0,
                       help="DREaM detail preservation factor p (> 0).")
    group.add_argument("--input_perturbation", type=float, default=0,
                       help="Scale of input perturbation noise; 0.1 is recommended.")
    group.add_argument("--noise_offset", type=float, default=0, help="Scale of the noise offset.")


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """Flags for the optimizer, precision and hardware features."""
    group = parser.add_argument_group("optimizer and precision")
    group.add_argument("--use_8bit_adam", action="store_true",
                       help="Use bitsandbytes' 8-bit AdamW (optimizer states in 1 byte per value instead of 4 each).")
    group.add_argument("--optimizer_impl", type=str, default="auto", choices=OPTIMIZER_IMPLS,
                       help="torch AdamW kernel: 'fused' (one kernel for all tensors), 'foreach' (batched ops), "
                            "'loop' (one tensor at a time, least temporary memory), or 'auto' (fused on CUDA, "
                            "torch's default elsewhere). Not used with --use_8bit_adam.")
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere or newer GPUs.")
    group.add_argument("--channels_last", action="store_true",
                       help="Keep the UNet's convolution weights in channels-last (NHWC) memory order, which tensor "
                            "cores prefer; saved weights are written in the usual order.")
    group.add_argument("--torch_compile", action="store_true",
                       help="Compile the UNet with torch.compile (inductor, through accelerate): the first steps "
                            "take minutes to compile, the rest run faster. Overrides the accelerate config's "
                            "dynamo backend.")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    group.add_argument("--adam_epsilon", type=float, default=1e-08, help="Adam epsilon.")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    group.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISIONS,
                       help="Mixed precision; overrides the accelerate config. bf16 needs an Ampere+ GPU.")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="Use xformers attention (if installed).")
    group.add_argument("--local_rank", type=int, default=-1,
                       help="Accepted for launchers; the LOCAL_RANK environment variable takes precedence.")


def _add_ema_args(parser: argparse.ArgumentParser) -> None:
    """Flags for the exponential moving average of the UNet."""
    group = parser.add_argument_group("EMA")
    group.add_argument("--use_ema", action="store_true",
                       help="Keep an EMA of the UNet; validation and the final pipeline use it.")
    group.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights in pinned CPU memory.")
    group.add_argument("--foreach_ema", action="store_true", help="Faster foreach EMA update (more memory).")


def _add_lora_args(parser: argparse.ArgumentParser) -> None:
    """Flags that switch the run to LoRA (low-rank adapters through peft) instead of a full UNet fine-tune."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_rank", type=int, default=None,
                       help="Train LoRA adapters of this rank instead of the whole UNet (e.g. 16); the output is "
                            "pytorch_lora_weights.safetensors (diffusers) plus a kohya-format file. Unset: full "
                            "fine-tune.")
    group.add_argument("--lora_alpha", type=float, default=None,
                       help="LoRA scale numerator: the update is (alpha / rank) * B @ A. Unset: the rank (scale 1).")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch's input.")
    group.add_argument("--lora_target_modules", type=str, default="attention",
                       help="Layers that get adapters: 'attention' (to_q, to_k, to_v, to_out.0), 'all_linear' "
                            "(also the feed-forward layers of the transformer blocks), or a comma-separated list "
                            "of module names.")
    group.add_argument("--use_dora", action="store_true",
                       help="Weight-decomposed LoRA (DoRA, arXiv:2402.09353): slower steps, often better at low rank.")
    group.add_argument("--train_text_encoder_lora", action="store_true",
                       help="Also put LoRA adapters on the text encoder's attention (q/k/v/out_proj); "
                            "not with --cache_latents, which caches the text encoder's outputs.")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """Flags for checkpoint saving, pruning and resuming."""
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=500,
                       help="Save a resumable checkpoint-<step> every N optimizer steps (not a pipeline).")
    group.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="Keep at most this many checkpoints; the oldest are removed first.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="Resume from 'latest', a checkpoint-N folder name in --output_dir, or a path.")


def _add_tracking_args(parser: argparse.ArgumentParser) -> None:
    """Flags for validation images and experiment trackers."""
    group = parser.add_argument_group("validation and tracking")
    group.add_argument("--validation_prompts", "--validation_prompt", dest="validation_prompts", type=str,
                       nargs="+", default=None,
                       help="Prompts sampled every --validation_epochs epochs (both spellings accepted).")
    group.add_argument("--validation_epochs", type=int, default=5,
                       help="Validate when epoch %% N == 0 (epoch 0 included) and at the end.")
    group.add_argument("--validation_guidance_scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                       help="Classifier-free guidance of the validation images (generate.py's --guidance_scale).")
    add_tracker_args(group, "text2image-fine-tune")


def add_tracker_args(group, project_name: str) -> None:
    """--report_to, --logging_dir and --tracker_project_name (default project_name) in group."""
    group.add_argument("--report_to", type=str, default="tensorboard", choices=REPORT_TO_CHOICES,
                       help="Tracker to log to; 'all' uses every installed one.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker log folder, under --output_dir.")
    group.add_argument("--tracker_project_name", type=str, default=project_name,
                       help="Project name passed to the trackers.")


def _add_hub_args(parser: argparse.ArgumentParser) -> None:
    """Flags for publishing the result on the Hugging Face Hub."""
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true",
                       help="Create the Hub repo at start; upload the final pipeline and model card at the end.")
    group.add_argument("--hub_token", type=str, default=None,
                       help="Hub token. Prefer `hf auth login` or HF_TOKEN: a flag is visible to other users.")
    group.add_argument("--hub_model_id", type=str, default=None,
                       help="Hub repo id; defaults to the output folder's name under your namespace.")


def build_parser() -> ArgumentParser:
    """The trainer's argument parser, with every flag of the reference trainer."""
    parser = ArgumentParser(prog="train_text_to_image.py", description=DESCRIPTION)
    for add in (_add_model_args, _add_data_args, _add_cache_args, _add_metadata_args, _add_optimisation_args,
                _add_optimizer_args,
                _add_ema_args, _add_lora_args, _add_checkpoint_args, _add_tracking_args, _add_hub_args):
        add(parser)
    return parser


def _positive_flags(args: argparse.Namespace) -> list:
    """(flag, value) pairs that must be at least 1 when set."""
    return [
        ("--train_batch_size", args.train_batch_size),
        ("--gradient_accumulation_steps", args.gradient_accumulation_steps),
        ("--checkpointing_steps", args.checkpointing_steps),
        ("--validation_epochs", args.validation_epochs),
        ("--num_train_epochs", args.num_train_epochs),
        ("--max_train_samples", args.max_train_samples),
        ("--checkpoints_total_limit", args.checkpoints_total_limit),
        ("--vae_batch_size", args.vae_batch_size),
        ("--cache_chunk_rows", args.cache_chunk_rows),
        ("--lora_rank", args.lora_rank),
        ("--metadata_frequencies", args.metadata_frequencies),
    ]


def check_args(parser: ArgumentParser, args: argparse.Namespace, fewest_steps: int = 1) -> None:
    """Reject flag combinations the run could never use; each through parser.error (one line, exit 2).
    fewest_steps: the smallest --max_train_steps the trainer accepts."""
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Need either a dataset name or a training folder.")
    if args.hub_token is not None and args.report_to in WANDB_REPORTS:
        parser.error("--hub_token with --report_to=wandb is a security risk (the token could reach the wandb run); "
                     "run `hf auth login` or set HF_TOKEN instead.")
    for flag, value in _positive_flags(args):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}.")
    if args.max_train_steps is not None and args.max_train_steps < fewest_steps:
        parser.error(f"--max_train_steps must be at least {fewest_steps}, got {args.max_train_steps}.")
    for flag, value in (("--lr_warmup_steps", args.lr_warmup_steps),
                        ("--dataloader_num_workers", args.dataloader_num_workers),
                        ("--text_cache_budget_gb", args.text_cache_budget_gb)):
        if value is not None and value < 0:
            parser.error(f"{flag} must not be negative, got {value}.")
    if args.cache_latents and not args.center_crop:
        parser.error("--cache_latents needs --center_crop: a random crop differs every step, so cached latents would "
                     "be wrong (for square images at --resolution, e.g. create.py's output, both crops are the same).")
    if not math.isfinite(args.validation_guidance_scale):
        parser.error(f"--validation_guidance_scale must be a finite number, got {args.validation_guidance_scale}.")
    check_lora_args(parser, args)
    check_metadata_args(parser, args)
    if args.use_8bit_adam and args.optimizer_impl != "auto":
        parser.error(f"--optimizer_impl={args.optimizer_impl} applies to torch's AdamW, not to --use_8bit_adam.")


def check_lora_args(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """LoRA flags need --lora_rank, take sane values, and text-encoder LoRA cannot use cached text states."""
    lora_only = [flag for flag, used in (("--lora_alpha", args.lora_alpha is not None),
                                         ("--lora_dropout", args.lora_dropout != 0.0),
                                         ("--use_dora", args.use_dora),
                                         ("--train_text_encoder_lora", args.train_text_encoder_lora)) if used]
    if args.lora_rank is None:
        if lora_only:
            parser.error(f"{lora_only[0]} needs --lora_rank (e.g. --lora_rank 16), which switches the run to LoRA.")
        return
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        parser.error(f"--lora_alpha must be positive, got {args.lora_alpha}.")
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    if not [name for name in args.lora_target_modules.split(",") if name.strip()]:
        parser.error(f"--lora_target_modules '{args.lora_target_modules}' names no module.")
    if args.train_text_encoder_lora and args.cache_latents:
        parser.error("--train_text_encoder_lora cannot use --cache_latents: the cache holds fixed text-encoder "
                     "outputs, but a trained text encoder changes them every step.")


def check_metadata_args(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """Known metadata fields, probabilities in [0, 1], and no mode the metadata embedding cannot train in."""
    from trainer.metadata import parse_fields

    try:
        fields = parse_fields(args.metadata_fields)
    except ValueError as err:
        parser.error(f"--metadata_fields '{args.metadata_fields}': {err}.")
    for flag, value in (("--metadata_dropout", args.metadata_dropout), ("--metadata_drop_all", args.metadata_drop_all),
                        ("--proportion_empty_prompts", args.proportion_empty_prompts)):
        if not 0.0 <= value <= 1.0:
            parser.error(f"{flag} must be in [0, 1], got {value}.")
    if fields and args.dream_training:
        parser.error("--metadata_fields does not work with --dream_training (diffusers' DREaM step calls the UNet "
                     "without the metadata).")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the trainer's command line (sys.argv when argv is None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def non_ema_revision(args: argparse.Namespace) -> Optional[str]:
    """Revision of the UNet that is trained: --non_ema_revision, falling back to --revision like the reference."""
    return args.non_ema_revision if args.non_ema_revision is not None else args.revision


def _tracker_value(value):
    """A value tensorboard's hparams accept (int, float, str, bool), or None to drop it."""
    if isinstance(value, (list, tuple, dict, set)):
        return None
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def tracker_config(args: argparse.Namespace) -> dict:
    """Flat run config for accelerator.init_trackers: no token, no lists, None spelled as a string."""
    config = {}
    for key, value in sorted(vars(args).items()):
        if key == "hub_token":
            continue
        converted = _tracker_value(value)
        if converted is not None:
            config[key] = converted
    return config
