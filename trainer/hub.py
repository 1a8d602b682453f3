"""Model card and final Hub upload: the pipeline, README.md and the validation grid, never checkpoints or logs.

Unlike the reference, the card needs neither wandb nor validation prompts, and the upload skips
`checkpoint-*` (about 14 GB each for SD1.5 with EMA and AdamW). The token is never logged.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from trainer.args import tracker_config
from trainer.preflight import scrub_token, resolve_token
from utils.constants import (CHECKPOINT_PREFIX, DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS,
                             MODEL_CARD_FILENAME, TMP_SUFFIX, VALIDATION_DIRNAME)
from utils.logger import get_logger

LICENSE = "creativeml-openrail-m"
TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "diffusers-training",
        "remote-sensing", "satellite-imagery"]
GRID_FILENAME = "validation_grid.png"
PROGRESS_FILENAME = "validation_progress.png"  # trainer.validation writes it into OUTPUT_DIR before the card
EXAMPLE_PROMPT = "A satellite image of a crop field"
LORA_TAGS = ["lora", "template:sd-lora"]
# lora_run.json holds the base model's local path: useful on this machine, meaningless (and private) on the Hub.
LORA_LOCAL_FILES = ("lora_run.json",)
# Settings that only describe this machine (paths, ranks) or are shown elsewhere in the card.
LOCAL_ONLY_SETTINGS = ("cache_dir", "output_dir", "logging_dir", "local_rank", "hub_model_id", "push_to_hub")
# Matched by huggingface_hub with fnmatch against paths relative to the output dir ('*' also matches '/').
BASE_IGNORE_PATTERNS = (
    f"{CHECKPOINT_PREFIX}*", f".{CHECKPOINT_PREFIX}*", f"{VALIDATION_DIRNAME}/*", "logs/*", "wandb/*", "*/wandb/*",
    "*events.out.tfevents*", ".cache/*", "*/.cache/*", "__pycache__/*", "*/__pycache__/*", "*.pyc",
    f"*{TMP_SUFFIX}", f"*{TMP_SUFFIX}/*", "*.partial", "*.partial/*", "*.lock", "*.incomplete",
)


def _is_hub_id(value: str) -> bool:
    """True when value names a Hub repo rather than a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(value).expanduser().exists():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def card_metadata(args) -> dict:
    """The card's YAML front matter; base_model and datasets only when they are Hub ids the Hub can link."""
    base = args.pretrained_model_name_or_path
    metadata = {}
    if _is_hub_id(base):
        metadata["base_model"] = base
    metadata["license"] = LICENSE
    metadata["tags"] = list(TAGS) + (LORA_TAGS if args.lora_rank else [])
    metadata["datasets"] = [args.dataset_name] if args.dataset_name and _is_hub_id(args.dataset_name) else []
    metadata.update({"pipeline_tag": "text-to-image", "library_name": "diffusers", "inference": True})
    return metadata


def _data_description(args) -> str:
    """One sentence on the training data, without exposing local paths."""
    if args.dataset_name and _is_hub_id(args.dataset_name):
        return f"the [{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name}) dataset"
    local = args.dataset_name or args.train_data_dir
    return f"a local image/caption dataset (`{Path(local).name}`, imagefolder with metadata.jsonl)"


def _public_settings(args) -> dict:
    """Training settings worth publishing: the tracker config minus local-only values, paths shortened."""
    settings = {k: v for k, v in tracker_config(args).items() if k not in LOCAL_ONLY_SETTINGS}
    for key in ("train_data_dir", "dataset_name", "pretrained_model_name_or_path"):
        value = getattr(args, key)
        if value and not _is_hub_id(value):
            settings[key] = Path(value).name
    return settings


def _settings_table(settings: dict) -> str:
    """Markdown table of the settings."""
    rows = ["| setting | value |", "|---|---|"]
    rows += [f"| `{key}` | `{value}` |" for key, value in sorted(settings.items())]
    return "\n".join(rows)


def _usage_snippet(model_ref: str, prompt: str) -> str:
    """Python showing how to load and run the fine-tuned pipeline."""
    return "\n".join([
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        f"pipe = StableDiffusionPipeline.from_pretrained({json.dumps(model_ref)}, torch_dtype=torch.float16)",
        'pipe = pipe.to("cuda")',
        f"image = pipe(prompt={json.dumps(prompt)}, num_inference_steps={DEFAULT_NUM_INFERENCE_STEPS}, "
        f"guidance_scale={DEFAULT_GUIDANCE_SCALE}).images[0]",
        'image.save("generated.png")',
        "```",
    ])


def _lora_usage_snippet(base: str, model_ref: str, prompt: str) -> str:
    """Python loading the LoRA onto its base with diffusers, plus where the kohya-format file goes."""
    from trainer.lora import KOHYA_WEIGHTS_FILENAME

    return "\n".join([
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        f"pipe = StableDiffusionPipeline.from_pretrained({json.dumps(base)}, torch_dtype=torch.float16)",
        f"pipe.load_lora_weights({json.dumps(model_ref)})  # pytorch_lora_weights.safetensors, alpha included",
        'pipe = pipe.to("cuda")',
        f"image = pipe(prompt={json.dumps(prompt)}, num_inference_steps={DEFAULT_NUM_INFERENCE_STEPS}, "
        f"guidance_scale={DEFAULT_GUIDANCE_SCALE}).images[0]",
        "```",
        "",
        f"A1111 / ComfyUI: put `{KOHYA_WEIGHTS_FILENAME}` (kohya format) in the LoRA models folder.",
    ])


def _validation_section(args, grid_name: Optional[str], progress_name: Optional[str] = None) -> str:
    """Validation prompts, grid image and progress picture, or an empty string when there are none."""
    parts = []
    if args.validation_prompts:
        parts.append("## Validation prompts\n\n" + "\n".join(f"{i}. {p}" for i, p in
                                                              enumerate(args.validation_prompts, start=1)))
    if grid_name:
        parts.append(f"![validation images]({grid_name})")
    if progress_name:
        parts.append("## Training progress\n\nEach validation prompt (rows) drawn with the same seed by the base model "
                     "(first column), then at each validation step, left to right.\n\n"
                     f"![validation progress]({progress_name})")
    return "\n\n".join(parts)


def _place_grid(output_dir: Path, grid_path) -> Optional[str]:
    """The grid's path relative to output_dir (copied in when it lies elsewhere), or None if there is none."""
    if grid_path is None or not Path(grid_path).is_file():
        return None
    grid = Path(grid_path).absolute()
    try:
        return grid.relative_to(output_dir.absolute()).as_posix()
    except ValueError:
        shutil.copyfile(grid, output_dir / GRID_FILENAME)
        return GRID_FILENAME


def card_text(args, repo_id: Optional[str], grid_name: Optional[str], run_url: Optional[str] = None,
              progress_name: Optional[str] = None) -> str:
    """The whole README.md: front matter, description, validation, usage, settings."""
    model_ref = repo_id or Path(args.output_dir).name
    prompt = (args.validation_prompts or [EXAMPLE_PROMPT])[0]
    header = yaml.safe_dump(card_metadata(args), sort_keys=False, allow_unicode=True)
    base = args.pretrained_model_name_or_path
    base_ref = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{Path(base).name}`"
    intro = (f"LoRA adapters (rank {args.lora_rank}) for {base_ref}, trained on" if args.lora_rank
             else f"Stable Diffusion fine-tuned from {base_ref} on")
    base_id = base if _is_hub_id(base) else "BASE_MODEL"
    usage = _lora_usage_snippet(base_id, model_ref, prompt) if args.lora_rank else _usage_snippet(model_ref, prompt)
    sections = [
        f"---\n{header}---",
        f"# {model_ref}",
        f"{intro} {_data_description(args)}, "
        "for remote-sensing (satellite and aerial) text-to-image generation.",
        _validation_section(args, grid_name, progress_name),
        "## Usage\n\n" + usage,
        "## Training settings\n\n" + _settings_table(_public_settings(args)),
        f"Training run: {run_url}" if run_url else "",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_model_card(output_dir, args, repo_id: Optional[str], grid_path=None,
                     run_url: Optional[str] = None) -> Path:
    """Write OUTPUT_DIR/README.md atomically (temp file, then rename) and return its path."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    progress = PROGRESS_FILENAME if (folder / PROGRESS_FILENAME).is_file() else None
    text = card_text(args, repo_id, _place_grid(folder, grid_path), run_url, progress)
    target = folder / MODEL_CARD_FILENAME
    partial = folder / f"{MODEL_CARD_FILENAME}{TMP_SUFFIX}"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)
    return target


def ignore_patterns(args) -> list:
    """Upload exclusions: checkpoints, logs, validation step folders, caches, partial files, wandb."""
    patterns = list(BASE_IGNORE_PATTERNS) + list(LORA_LOCAL_FILES)
    logging_dir = Path(args.logging_dir)
    own = f"{logging_dir.as_posix().rstrip('/')}/*"
    if not logging_dir.is_absolute() and own not in patterns:
        patterns.append(own)
    return patterns


class PushError(RuntimeError):
    """The final upload failed; the trained pipeline is still on disk."""


def push_final(output_dir, repo_id: str, args) -> None:
    """Upload the final pipeline, model card and grid to repo_id, skipping checkpoints, logs and caches."""
    from huggingface_hub import HfApi

    logger = get_logger()
    token = resolve_token(args)
    logger.info("Uploading %s to https://huggingface.co/%s", output_dir, repo_id)
    try:
        HfApi().upload_folder(repo_id=repo_id, folder_path=str(output_dir), repo_type="model", token=token,
                              commit_message="End of training", ignore_patterns=ignore_patterns(args))
    except Exception as err:  # noqa: BLE001 - any Hub failure: keep the message short and token-free
        message = (f"upload to '{repo_id}' failed ({scrub_token(err, token)}); the trained pipeline is in "
                   f"'{output_dir}': retry with `hf upload {repo_id} {output_dir} --exclude '{CHECKPOINT_PREFIX}*'`")
        logger.error(message)
        raise PushError(message) from None
    logger.info("Uploaded to https://huggingface.co/%s", repo_id)


CONTROLNET_TAGS = ["controlnet", "diffusers-training", "stable-diffusion", "remote-sensing", "satellite-imagery"]


def _controlnet_usage(base: str, model_ref: str, prompt: str) -> str:
    """Python loading the ControlNet onto its base with diffusers."""
    return "\n".join([
        "```python",
        "from diffusers import ControlNetModel, StableDiffusionControlNetPipeline",
        "",
        f"controlnet = ControlNetModel.from_pretrained({json.dumps(model_ref)})",
        f"pipe = StableDiffusionControlNetPipeline.from_pretrained({json.dumps(base)}, controlnet=controlnet)",
        f"image = pipe({json.dumps(prompt)}, image=control).images[0]  # control: prepared as conditioning.json says",
        "```",
    ])


def _conditioning_sentence(document: dict) -> str:
    """What the ControlNet is conditioned on, from its conditioning.json."""
    kind, channels = document.get("type", "image"), document.get("channels")
    if kind == "mask":
        return f"a land-cover class mask ({document.get('classes')} classes, one-hot: {channels} channels)"
    if kind == "bands":
        norm = (document.get("normalisation") or {}).get("mode", "none")
        return f"a {channels}-band raster (bands {document.get('bands') or 'all'}, {norm} normalisation)"
    return "an RGB conditioning image (3 channels)"


def controlnet_card_text(args, repo_id: Optional[str], document: dict, grid_name: Optional[str]) -> str:
    """README.md of a trained ControlNet: front matter, base and conditioning, validation grid, usage, settings."""
    model_ref = repo_id or Path(args.output_dir).name
    metadata = {**card_metadata(args), "tags": list(CONTROLNET_TAGS)}
    header = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    base = args.pretrained_model_name_or_path
    base_ref = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{Path(base).name}`"
    prompt = (args.validation_prompt or [EXAMPLE_PROMPT])[0]
    sections = [
        f"---\n{header}---", f"# {model_ref}",
        f"A ControlNet for {base_ref}, conditioned on {_conditioning_sentence(document)}, trained on "
        f"{_data_description(args)}. `conditioning.json` beside the weights says how to prepare the conditioning.",
        f"![validation images]({grid_name})" if grid_name else "",
        "## Usage\n\n" + _controlnet_usage(base if _is_hub_id(base) else "BASE_MODEL", model_ref, prompt),
        "## Training settings\n\n" + _settings_table(_public_settings(args)),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_controlnet_card(output_dir, args, repo_id: Optional[str], document: dict, grid_path=None) -> Path:
    """Write the ControlNet's OUTPUT_DIR/README.md atomically and return its path."""
    folder = Path(output_dir)
    target = folder / MODEL_CARD_FILENAME
    partial = folder / f"{MODEL_CARD_FILENAME}{TMP_SUFFIX}"
    partial.write_text(controlnet_card_text(args, repo_id, document, _place_grid(folder, grid_path)),
                       encoding="utf-8")
    os.replace(partial, target)
    return target
