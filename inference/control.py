"""Sampling with a ControlNet: its folder and saved preprocessing, the control images and how they pair with
prompts, and a StableDiffusionControlNetPipeline made of the base pipeline's parts.

A ControlNet folder is a train_controlnet.py OUTPUT_DIR (config.json + weights + conditioning.json), one of its
checkpoint-N folders (controlnet_ema/ when present, else controlnet/; conditioning.json from the run), or any diffusers
ControlNet folder (without conditioning.json: RGB images). Control images are read by utils/control_input with that
description, so sampling repeats the training preprocessing: shorter side to the image size, centre crop (masks
nearest neighbour, one-hot; bands normalised with the training statistics).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from utils.cli import UsageError
from utils.constants import CONDITIONING_FILENAME
from utils.control_input import ControlInputError, ControlSpec, control_view, load_spec, prepare, read_raw

CONFIG_FILENAME = "config.json"
CONTROLNET_CLASS = "ControlNetModel"
CONTROL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy")
# A checkpoint-N folder of train_controlnet.py keeps the nets here (EMA first, as the final OUTPUT_DIR ships it).
CHECKPOINT_NETS = ("controlnet_ema", "controlnet")


@dataclass(frozen=True)
class ControlSource:
    """A ControlNet to sample with: its weights folder and its conditioning description."""

    folder: Path  # holds config.json + weights
    spec: ControlSpec
    described_by: Optional[Path]  # the conditioning.json read, None for a plain (RGB) diffusers ControlNet


def weights_folder(folder: Path) -> Path:
    """folder itself, or the ControlNet inside a checkpoint-N folder (EMA when present)."""
    if (folder / CONFIG_FILENAME).is_file():
        return folder
    for name in CHECKPOINT_NETS:
        if (folder / name / CONFIG_FILENAME).is_file():
            return folder / name
    raise UsageError(f"--controlnet '{folder}' holds no {CONFIG_FILENAME}: not a ControlNet folder (give "
                     "train_controlnet.py's OUTPUT_DIR or one of its checkpoint-N folders).")


def read_config(weights: Path) -> dict:
    """The ControlNet's config.json; a folder holding another kind of model is refused."""
    try:
        config = json.loads((weights / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"--controlnet: cannot read {weights / CONFIG_FILENAME}: {err}") from None
    if not isinstance(config, dict) or config.get("_class_name") != CONTROLNET_CLASS:
        kind = config.get("_class_name") if isinstance(config, dict) else None
        raise UsageError(f"--controlnet '{weights}' holds a {kind or 'non-diffusers'} model, not a {CONTROLNET_CLASS}.")
    return config


def description_file(folder: Path, weights: Path) -> Optional[Path]:
    """The conditioning.json describing the ControlNet: beside its weights, in the folder given, or in the run
    folder above a checkpoint; None when there is none."""
    for candidate in (weights, folder, folder.parent):
        if (candidate / CONDITIONING_FILENAME).is_file():
            return candidate / CONDITIONING_FILENAME
    return None


def resolve_controlnet(value: str) -> ControlSource:
    """--controlnet checked before anything loads: weights, description, and that they agree on channels."""
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--controlnet '{value}' is not a folder.")
    weights = weights_folder(folder)
    config = read_config(weights)
    described_by = description_file(folder, weights)
    try:
        spec = load_spec(described_by) if described_by is not None else ControlSpec()
    except ControlInputError as err:
        raise UsageError(f"--controlnet: {err}") from None
    channels = int(config.get("conditioning_channels", 3))
    if channels != spec.channels:
        where = described_by or "no conditioning.json, so RGB"
        raise UsageError(f"--controlnet '{value}' takes {channels} conditioning channel(s), but its description "
                         f"({where}) gives {spec.channels} ({spec.type}).")
    return ControlSource(weights, spec, described_by)


def control_files(value: str) -> List[Path]:
    """--control_image: one file, or a folder's files with a control suffix, sorted by name."""
    path = Path(value).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UsageError(f"--control_image '{value}' does not exist.")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CONTROL_SUFFIXES)
    if not files:
        raise UsageError(f"--control_image '{value}' holds no control image ({' '.join(CONTROL_SUFFIXES)}).")
    return files


def pair_prompts(prompts: Sequence[str], files: Sequence[Path]) -> List[Tuple[str, Path]]:
    """(prompt, control file) pairs as diffusers' ControlNet validation pairs them: one control image for every
    prompt, one prompt for every control image, or as many of each, paired in order."""
    if len(files) == 1:
        return [(prompt, files[0]) for prompt in prompts]
    if len(prompts) == 1:
        return [(prompts[0], path) for path in files]
    if len(prompts) == len(files):
        return list(zip(prompts, files))
    raise UsageError(f"{len(prompts)} prompts and {len(files)} control images: give one prompt, one control image, "
                     "or as many prompts as control images (paired in order, the folder's files sorted by name).")


def read_controls(files: Sequence[Path], spec: ControlSpec) -> Dict[Path, np.ndarray]:
    """Each distinct control file's raw values, checked against the description (band count, classes) at its own
    size, so a bad file is one line before any model loads."""
    raws = {}
    for path in dict.fromkeys(files):
        try:
            raws[path] = read_raw(path, spec)
            prepare(raws[path], spec, str(path))
        except ControlInputError as err:
            raise UsageError(f"--control_image: {err}.") from None
    return raws


def default_size(pipeline) -> int:
    """The side the base pipeline draws by default (UNet sample size x VAE downsampling)."""
    return int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)


def check_fits(controlnet, pipeline, source: ControlSource) -> None:
    """A ControlNet must match its base: the UNet's widths and text features, and a conditioning embedding that
    downsamples as much as the VAE (one line, not a shape error at the first step)."""
    config, unet = controlnet.config, pipeline.unet.config
    if tuple(config.block_out_channels) != tuple(unet.block_out_channels) or \
            config.cross_attention_dim != unet.cross_attention_dim:
        raise UsageError(f"the ControlNet in '{source.folder}' was made for another UNet (widths "
                         f"{tuple(config.block_out_channels)}, text width {config.cross_attention_dim}; the base has "
                         f"{tuple(unet.block_out_channels)}, {unet.cross_attention_dim}): pass its base as --model.")
    factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    if factor != pipeline.vae_scale_factor:
        raise UsageError(f"the ControlNet in '{source.folder}' downsamples its conditioning {factor}x, the base's "
                         f"VAE {pipeline.vae_scale_factor}x: pass its base as --model.")


def controlnet_pipeline(pipeline, source: ControlSource, device, dtype):
    """A StableDiffusionControlNetPipeline sharing the base pipeline's parts (UNet, VAE, text encoder, scheduler)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from inference.pipeline import load_failure

    try:
        controlnet = ControlNetModel.from_pretrained(source.folder, dtype=dtype)
    except (OSError, ValueError) as err:
        raise load_failure(source.folder, err) from None
    check_fits(controlnet, pipeline, source)
    parts = {name: part for name, part in pipeline.components.items()
             if name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    controlled = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    controlled.set_progress_bar_config(leave=False, desc="denoising")
    return controlled.to(device)


def stacked(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, C, H, W) float32 batch of prepared inputs."""
    return torch.from_numpy(np.stack([np.ascontiguousarray(a) for a in arrays]).astype(np.float32))


def control_batches(views: Sequence[np.ndarray], scale: float):
    """per_image callback for inference.pipeline.generate: a chunk's control images and the scale."""
    def extra(chunk) -> dict:
        """The pipeline's image= and controlnet_conditioning_scale= for the images of chunk."""
        return {"image": stacked([views[i] for i in chunk]), "controlnet_conditioning_scale": scale}
    return extra


@dataclass(frozen=True)
class ControlRequest:
    """What generate.py's ControlNet flags ask for, checked: the ControlNet, (prompt, control file) pairs, the files'
    raw values and the scale."""

    source: ControlSource
    pairs: Tuple[Tuple[str, Path], ...]
    raws: Dict[Path, np.ndarray]
    scale: float

    def settings(self) -> dict:
        """What every sidecar repeats about the ControlNet."""
        return {"controlnet": str(self.source.folder), "conditioning_type": self.source.spec.type,
                "controlnet_conditioning_scale": self.scale}


def control_request(controlnet: Optional[str], control_image: Optional[str], scale: float,
                    prompts: Sequence[str]) -> Optional[ControlRequest]:
    """The checked request, or None without --controlnet (generate.py's flags checked their pairing already)."""
    if controlnet is None:
        return None
    source = resolve_controlnet(controlnet)
    pairs = pair_prompts(prompts, control_files(control_image))
    return ControlRequest(source, tuple(pairs), read_controls([path for _, path in pairs], source.spec), scale)


@dataclass(frozen=True)
class ControlSampling:
    """A ready ControlNet run: its pipeline, the per-chunk call arguments, the size, each image's control file and
    each grid row's false-colour control picture."""

    pipeline: object
    per_image: object
    height: int
    width: int
    files: List[Path]
    pictures: list


def prepare_sampling(request: ControlRequest, pipeline, device, dtype, height: Optional[int], width: Optional[int],
                     per_prompt: int) -> ControlSampling:
    """The base pipeline turned into a ControlNet pipeline, and every control image prepared at the image size (the
    base's default size when --height/--width are not given)."""
    from utils.control_input import false_colour

    height, width = height or default_size(pipeline), width or default_size(pipeline)
    spec = request.source.spec
    views = {path: control_view(raw, spec, width, height) for path, raw in request.raws.items()}
    files = [path for _, path in request.pairs for _ in range(per_prompt)]
    return ControlSampling(controlnet_pipeline(pipeline, request.source, device, dtype),
                           control_batches([views[path] for path in files], request.scale), height, width, files,
                           [false_colour(views[path], spec) for _, path in request.pairs])
