"""Load a trained model for sampling and generate seeded images with it.

A run's OUTPUT_DIR is a saved pipeline; a checkpoint-N folder is not: it holds the training state plus unet/ (and
unet_ema/ with EMA), whose UNet must go into a base pipeline. load_pipeline accepts either and turns every user
mistake into one UsageError line. generate() seeds each image with its own generator, so any subset of a run
can be regenerated alone.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from inference.schedulers import check_scheduler, make_scheduler
from trainer.checkpoints import checkpoint_step
from utils.cli import UsageError
from utils.constants import DEFAULT_BASE_MODEL, EMA_UNET_DIRNAME, UNET_DIRNAME

MODEL_INDEX = "model_index.json"
WEIGHTS_CHOICES = ("auto", "ema", "unet")
OFFLINE_VALUES = ("1", "on", "yes", "true")
LATENT_MULTIPLE = 8
# --dtype choices; auto is resolved by pick_dtype.
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_ADAPTER_NAME = "trained"


@dataclass(frozen=True)
class ModelSource:
    """Where the pieces of the pipeline to sample come from."""

    pipeline: str  # a pipeline folder or Hub id: VAE, text encoder, tokenizer, scheduler (and UNet unless below)
    unet: Optional[Path]  # a checkpoint's UNet folder that replaces the pipeline's own, or None
    weights: str  # what the UNet is: "pipeline", "ema" or "unet"; "lora" or "lora_ema" for a LoRA run
    lora: Optional[Path] = None  # a folder holding pytorch_lora_weights.safetensors, loaded onto the pipeline
    lora_scale: float = 1.0
    prediction_type: Optional[str] = None  # a LoRA run's --prediction_type, which its base scheduler lacks


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """--dtype on device: auto = fp16 on CUDA, fp32 elsewhere; fp16 off CUDA is refused (no usable CPU kernels)."""
    if requested not in DTYPES:
        raise UsageError(f"--dtype '{requested}' is not one of {', '.join(DTYPES)}.")
    if requested == "auto":
        # Half precision halves memory and time on GPUs; CPU kernels for fp16 are slow or missing.
        return torch.float16 if device.type == "cuda" else torch.float32
    if requested == "fp16" and device.type != "cuda":
        raise UsageError(f"--dtype fp16 needs a CUDA device and this run is on {device.type}: "
                         "use --dtype bf16 or fp32.")
    return DTYPES[requested]


def pick_device(requested: Optional[str] = None, dtype: str = "auto") -> Tuple[torch.device, torch.dtype]:
    """cuda (fp16) when available, else cpu (fp32); `requested` ('cpu'/'cuda') and `dtype` (--dtype) override."""
    if requested is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise UsageError(f"--device '{requested}' is not a torch device (use cpu or cuda).") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device '{requested}': CUDA is not available on this machine.")
    return device, pick_dtype(device, dtype)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in OFFLINE_VALUES


def check_size(flag: str, value: Optional[int]) -> None:
    """Image sides must be positive multiples of 8 (the VAE's downsampling), or None for the model's default."""
    if value is not None and (value <= 0 or value % LATENT_MULTIPLE):
        raise UsageError(f"{flag} {value} must be a positive multiple of {LATENT_MULTIPLE}.")


def is_checkpoint(folder: Path) -> bool:
    """A training checkpoint: named checkpoint-N, or UNet folders without a pipeline's model_index.json."""
    if (folder / MODEL_INDEX).is_file():
        return False
    return checkpoint_step(folder.name) is not None or any(
        (folder / name).is_dir() for name in (UNET_DIRNAME, EMA_UNET_DIRNAME))


def checkpoint_unet(checkpoint: Path, weights: str) -> Tuple[Path, str]:
    """The checkpoint's UNet folder for --weights: auto = unet_ema/ when present (what the final pipeline ships)."""
    ema, raw = checkpoint / EMA_UNET_DIRNAME, checkpoint / UNET_DIRNAME
    if weights in ("auto", "ema") and ema.is_dir():
        return ema, "ema"
    if weights == "ema":
        raise UsageError(f"--weights ema: checkpoint '{checkpoint}' has no {EMA_UNET_DIRNAME}/ "
                         "(trained without --use_ema); use --weights unet.")
    if not raw.is_dir():
        raise UsageError(f"--model '{checkpoint}' holds no {UNET_DIRNAME}/ folder: not a finished checkpoint.")
    return raw, "unet"


def check_hub_model(flag: str, value: str) -> None:
    """A Hub id must be well formed, and offline it must already be in the local cache."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        raise UsageError(f"{flag} '{value}' does not exist.")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(f"{flag} '{value}' is neither an existing folder nor a valid Hub id.") from None
    if hub_offline() and not isinstance(try_to_load_from_cache(value, MODEL_INDEX), str):
        raise UsageError(f"{flag} '{value}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                         f"pass a local pipeline folder as {flag}, or `hf download {value}` first.")


def check_pipeline(flag: str, value: str) -> str:
    """A local folder must be a saved pipeline (model_index.json); anything else must be a usable Hub id.

    Returns the value as from_pretrained needs it: the folder with ~ expanded, or the Hub id.
    """
    folder = Path(value).expanduser()
    if folder.is_dir():
        if not (folder / MODEL_INDEX).is_file():
            raise UsageError(f"{flag} '{value}' holds no {MODEL_INDEX}: it is not a diffusers pipeline folder.")
        return str(folder)
    if folder.exists():
        raise UsageError(f"{flag} '{value}' is a file; pass a pipeline folder.")
    check_hub_model(flag, value)
    return value


def base_for_checkpoint(checkpoint: Path, base_model: Optional[str]) -> str:
    """--base_model, else the finished run's own pipeline beside the checkpoint, else the default SD1.5 id."""
    if base_model is not None:
        return check_pipeline("--base_model", base_model)
    if (checkpoint.parent / MODEL_INDEX).is_file():
        return str(checkpoint.parent)
    try:
        check_pipeline("--base_model", DEFAULT_BASE_MODEL)
    except UsageError as err:
        raise UsageError(f"checkpoint '{checkpoint}' is not a pipeline and its run folder holds none yet; pass the "
                         f"pipeline it was trained from as --base_model (default {DEFAULT_BASE_MODEL}: {err})") from None
    return DEFAULT_BASE_MODEL


def is_lora_folder(folder: Path) -> bool:
    """A LoRA run's OUTPUT_DIR or one of its checkpoints: adapter weights, no pipeline."""
    from trainer.lora import LORA_WEIGHTS_FILENAME

    return (folder / LORA_WEIGHTS_FILENAME).is_file() and not (folder / MODEL_INDEX).is_file()


def lora_weights_folder(folder: Path, weights: str) -> Tuple[Path, str]:
    """The adapters for --weights: auto = the EMA ones (lora_ema/) when the checkpoint has them."""
    from trainer.lora import EMA_LORA_DIRNAME

    ema = folder / EMA_LORA_DIRNAME
    if weights in ("auto", "ema") and ema.is_dir():
        return ema, "lora_ema"
    if weights == "ema":
        raise UsageError(f"--weights ema: '{folder}' has no {EMA_LORA_DIRNAME}/ (trained without --use_ema); "
                         "use --weights unet.")
    return folder, "lora"


def lora_base(folder: Path, base_model: Optional[str]) -> Tuple[str, dict]:
    """(base pipeline, run record) of a LoRA folder: --base_model, else the base its lora_run.json records."""
    from trainer.lora import LORA_RUN_FILENAME, read_run_record

    record = read_run_record(folder) or read_run_record(folder.parent) or {}
    if base_model is not None:
        return check_pipeline("--base_model", base_model), record
    if not record.get("base_model"):
        raise UsageError(f"'{folder}' holds LoRA weights but no {LORA_RUN_FILENAME} naming their base model; "
                         "pass it as --base_model.")
    return check_pipeline(f"--base_model (from {LORA_RUN_FILENAME})", record["base_model"]), record


def resolve_model(model: str, base_model: Optional[str], weights: str = "auto",
                  lora_scale: float = 1.0) -> ModelSource:
    """Decide where the pipeline and its UNet come from, checking every path before anything loads."""
    if weights not in WEIGHTS_CHOICES:
        raise UsageError(f"--weights '{weights}' is not one of {', '.join(WEIGHTS_CHOICES)}.")
    folder = Path(model).expanduser()
    if folder.is_dir() and is_lora_folder(folder):
        adapters, kind = lora_weights_folder(folder, weights)
        base, record = lora_base(folder, base_model)
        return ModelSource(base, None, kind, adapters, lora_scale, record.get("prediction_type"))
    if lora_scale != 1.0:
        raise UsageError(f"--lora_scale {lora_scale} applies to LoRA runs; '{model}' holds no LoRA weights.")
    if folder.is_dir() and is_checkpoint(folder):
        unet, kind = checkpoint_unet(folder, weights)
        return ModelSource(base_for_checkpoint(folder, base_model), unet, kind)
    pipeline = check_pipeline("--model", model)
    if weights != "auto":
        raise UsageError(f"--weights {weights} applies to checkpoint-N folders; '{model}' is a pipeline "
                         "(a run's final pipeline already carries the EMA weights when EMA was on).")
    return ModelSource(pipeline, None, "pipeline")


def load_failure(what, err: Exception) -> UsageError:
    """One line for a folder or id that exists but does not load (missing or corrupt files)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UsageError(f"could not load '{what}': {first}")


def check_unet_fits(pipeline, source: ModelSource) -> None:
    """A checkpoint's UNet must read its base's text features: an SD 2.x UNet (width 1024) in an SD1.5 base (768),
    or the reverse, is one line naming both, not a shape error at the first denoising step."""
    wanted, given = pipeline.unet.config.cross_attention_dim, pipeline.text_encoder.config.hidden_size
    if source.unet is not None and wanted != given:
        raise UsageError(f"the UNet in '{source.unet}' reads text features of width {wanted}, but the base pipeline "
                         f"'{source.pipeline}' gives {given}: pass the pipeline it was trained from as --base_model.")


def load_source(source: ModelSource, device, dtype, scheduler: Optional[str] = None):
    """Load a resolved ModelSource onto device: the pipeline, the checkpoint's UNet in it, the chosen scheduler.
    The pipeline takes metadata={...} when its UNet was trained with them (inference/metadata_pipeline.py)."""
    from diffusers import UNet2DConditionModel

    from inference.metadata_pipeline import MetadataStableDiffusionPipeline

    if scheduler is not None:
        check_scheduler(scheduler)  # an unknown name fails before minutes of loading
    extra = {}
    if source.unet is not None:
        try:
            extra["unet"] = UNet2DConditionModel.from_pretrained(source.unet, dtype=dtype)
        except (OSError, ValueError) as err:
            raise load_failure(source.unet, err) from None
    try:
        pipeline = MetadataStableDiffusionPipeline.from_pretrained(
            source.pipeline, safety_checker=None, requires_safety_checker=False, dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        raise load_failure(source.pipeline, err) from None
    check_unet_fits(pipeline, source)
    if source.lora is not None:
        load_lora(pipeline, source)
    if scheduler is not None:
        pipeline.scheduler = make_scheduler(scheduler, pipeline.scheduler.config)
    pipeline.set_progress_bar_config(leave=False, desc="denoising")
    return pipeline.to(device)


def load_lora(pipeline, source: ModelSource) -> None:
    """diffusers' own load_lora_weights (the file's config sets alpha), at --lora_scale; the trained target; then the
    run's metadata embedding, when it trained one, at full strength (trainer.metadata_unet.install_embedding)."""
    from diffusers.utils import logging as diffusers_logging

    from trainer.metadata_unet import install_embedding

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # else a UNet-only file gets a notice that it has no text-encoder keys
    try:
        pipeline.load_lora_weights(str(source.lora), adapter_name=LORA_ADAPTER_NAME)
    except (OSError, ValueError, KeyError) as err:
        raise load_failure(source.lora, err) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if source.lora_scale != 1.0:
        pipeline.set_adapters([LORA_ADAPTER_NAME], adapter_weights=[source.lora_scale])
    if source.prediction_type is not None:
        pipeline.scheduler.register_to_config(prediction_type=source.prediction_type)
    # After the adapters, so a target list naming e.g. linear_1 cannot put one on the embedding.
    install_embedding(source.lora, pipeline.unet)


def load_pipeline(model: str, base_model: Optional[str], device, dtype, scheduler: Optional[str] = None,
                  weights: str = "auto", lora_scale: float = 1.0):
    """model = a trained output dir (a saved pipeline) or a checkpoint-N dir (its unet_ema/ when present and
    weights='auto'|'ema', or unet/ with weights='unet', put into the pipeline of base_model). Raises
    utils.cli.UsageError (one line naming the bad value) for every user mistake. Safety checker off, progress bar on."""
    return load_source(resolve_model(model, base_model, weights, lora_scale), device, dtype, scheduler)


def batches(count: int, batch_size: int) -> List[range]:
    """Consecutive index ranges of at most batch_size covering range(count)."""
    if batch_size < 1:
        raise UsageError(f"--batch_size {batch_size} must be at least 1.")
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def generate(pipeline, prompts: Sequence[str], seeds: Sequence[int], *, negative_prompt: Optional[str],
             num_inference_steps: int, guidance_scale: float, height: Optional[int], width: Optional[int],
             batch_size: int = 1, on_image: Optional[Callable[[int, object], None]] = None,
             conditioning: Optional[dict] = None, per_image: Optional[Callable[[range], dict]] = None) -> List:
    """One image per (prompt, seed) pair; image i comes from its own torch.Generator seeded with seeds[i], so
    any subset regenerates exactly the pixels an uninterrupted run would give (evaluate.py resumes on this).
    on_image(i, image) is called as each image is ready, so callers can save as they go. conditioning: more
    keyword arguments of every pipeline call (metadata=..., metadata_guidance_scale=... for a metadata model);
    per_image(chunk) gives those that differ by image (a ControlNet's control images for the chunk's indices)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    check_size("--height", height)
    check_size("--width", width)
    images = []
    for chunk in tqdm(batches(len(prompts), batch_size), desc="images", unit="batch"):
        # CPU generators draw the same starting noise on every device (GPU arithmetic still differs slightly).
        generators = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in chunk]
        negatives = [negative_prompt] * len(chunk) if negative_prompt else None
        result = pipeline(prompt=[prompts[i] for i in chunk], negative_prompt=negatives, generator=generators,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          height=height, width=width, **(conditioning or {}),
                          **(per_image(chunk) if per_image is not None else {}))
        for index, image in zip(chunk, result.images):
            if on_image is not None:
                on_image(index, image)
            images.append(image)
    return images
