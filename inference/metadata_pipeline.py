"""Sampling with metadata: a StableDiffusionPipeline that also takes metadata={...} for a UNet trained with
--metadata_fields (its unet/metadata_spec.json rebuilds the encoding), and metadata guidance on top of text CFG.

The stock pipeline calls the UNet without class_labels, so while it samples two hooks on the UNet supply them: every
call gets the requested vector (both text CFG halves); with metadata_guidance_scale S != 1 the batch is also run with
the all-absent (zero) vector and the prediction becomes eps_absent + S * (eps_metadata - eps_absent).
"""

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffusion_model.geo_metadata import check_value
from trainer.metadata import FIELDS, SPEC_FILENAME, MetadataEncoder, read_spec
from trainer.metadata_unet import PROJECTION, SPEC_ATTRIBUTE, has_embedding
from utils.cli import UsageError

STOCK_CLASS_NAME = StableDiffusionPipeline.__name__


def unet_spec(unet) -> Optional[MetadataEncoder]:
    """The encoder installed with a LoRA run's embedding, else that of the metadata_spec.json in the folder the UNet
    was loaded from, or None."""
    installed = getattr(unet, SPEC_ATTRIBUTE, None)
    if installed is not None:
        return installed
    folder = Path(unet.config.get("_name_or_path") or "")
    return read_spec(folder) if str(folder) and folder.is_dir() else None


def projection_dim(unet) -> Optional[int]:
    """Input size of the UNet's projection class embedding, None when it has none (the vector goes there)."""
    config = unet.config
    if config.class_embed_type != PROJECTION or unet.class_embedding is None:
        return None
    return int(config.projection_class_embeddings_input_dim)


def check_request(encoder: Optional[MetadataEncoder], metadata: Optional[dict]) -> dict:
    """The user's metadata checked against the model's encoding and normalised like create.py's --metadata values;
    ValueError naming the first bad field or value."""
    metadata = dict(metadata or {})
    if metadata and encoder is None:
        raise ValueError(f"metadata {sorted(metadata)} given, but the model's UNet has no {SPEC_FILENAME} "
                         "(it was trained without --metadata_fields)")
    values = {}
    for name, raw in metadata.items():
        if name not in FIELDS:
            raise ValueError(f"unknown metadata field '{name}' (known: {', '.join(FIELDS)})")
        if name not in encoder.fields:
            raise ValueError(f"metadata field '{name}' is not one the model was trained on "
                             f"({', '.join(encoder.fields)})")
        value, reason = check_value(name, raw)
        if reason:
            raise ValueError(f"metadata {name}={raw}: {reason}")
        values[name] = value
    if ("lat" in values) != ("lon" in values):
        raise ValueError("metadata lat and lon go together (the location is one point on the sphere): give both")
    return {name: values[name] for name in FIELDS if name in values}


def metadata_vector(unet, encoder: Optional[MetadataEncoder], metadata: Optional[dict]) -> Optional[torch.Tensor]:
    """The class_labels vector for metadata (all zeros = all absent), or None for a UNet that takes none."""
    values = check_request(encoder, metadata)
    dim = projection_dim(unet)
    if encoder is not None and not has_embedding(unet, encoder.dim):
        raise ValueError(f"the UNet's {SPEC_FILENAME} describes {encoder.dim} features but the UNet has no "
                         f"projection class embedding of that size (projection_class_embeddings_input_dim={dim})")
    if encoder is None:
        return None if dim is None else torch.zeros(dim)
    return encoder.encode_dict(values)


def doubled(value, batch: int):
    """A UNet input for two copies of the batch: tensors whose first axis is the batch repeated, the rest as is."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value])
    if isinstance(value, dict):
        return {key: doubled(item, batch) for key, item in value.items()}
    return value


@contextlib.contextmanager
def metadata_hooks(unet, vector: torch.Tensor, scale: float):
    """While inside: UNet calls get vector as class_labels; with scale != 1 also the zero vector, the predictions
    combined as eps_absent + scale * (eps_metadata - eps_absent)."""
    guided = scale != 1.0

    def before(module, args, kwargs):
        """Add the labels; for guidance run the batch twice, first with the metadata, then without."""
        sample = args[0] if args else kwargs["sample"]
        labels = vector.to(device=sample.device, dtype=sample.dtype).expand(sample.shape[0], -1)
        if guided:
            batch = sample.shape[0]
            args = tuple(doubled(a, batch) for a in args)
            kwargs = {key: doubled(value, batch) for key, value in kwargs.items()}
            labels = torch.cat([labels, torch.zeros_like(labels)])
        return args, {**kwargs, "class_labels": labels}

    def after(module, args, kwargs, output):
        """Fold the two halves back into one guided prediction."""
        prediction = output[0] if isinstance(output, tuple) else output.sample
        with_metadata, absent = prediction.chunk(2)
        combined = absent + scale * (with_metadata - absent)
        return (combined, *output[1:]) if isinstance(output, tuple) else UNet2DConditionOutput(sample=combined)

    handles = [unet.register_forward_pre_hook(before, with_kwargs=True)]
    if guided:
        handles.append(unet.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MetadataStableDiffusionPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline whose call also takes metadata={"gsd": 0.5, ...} and metadata_guidance_scale.

    The encoding comes from metadata_spec.json beside the UNet (the folder it was loaded from: a run's unet/, or a
    checkpoint's unet/ or unet_ema/). A UNet trained with metadata and called without any gets the all-absent vector;
    a UNet trained without them samples exactly as the stock pipeline. Saved, it is a stock StableDiffusionPipeline.
    """

    @property
    def metadata_encoder(self) -> Optional[MetadataEncoder]:
        """The UNet's encoding (read from its folder at each call, so a swapped UNet brings its own), or None."""
        return unet_spec(self.unet)

    def __call__(self, *args, metadata: Optional[dict] = None, metadata_guidance_scale: float = 1.0, **kwargs):
        """StableDiffusionPipeline.__call__ with the metadata; ValueError for metadata the model cannot take."""
        vector = metadata_vector(self.unet, self.metadata_encoder, metadata)
        if vector is None and metadata_guidance_scale != 1.0:
            raise ValueError(f"metadata_guidance_scale {metadata_guidance_scale} needs a UNet trained with metadata")
        hooks = contextlib.nullcontext() if vector is None else metadata_hooks(self.unet, vector,
                                                                                metadata_guidance_scale)
        with hooks:
            return super().__call__(*args, **kwargs)

    def to_json_string(self) -> str:
        """model_index.json names the stock class, so a saved pipeline loads in plain diffusers."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = STOCK_CLASS_NAME
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


def source_spec(source) -> Optional[MetadataEncoder]:
    """The encoding of a resolved ModelSource's UNet (a LoRA run's embedding beside its adapters, a checkpoint's
    UNet folder, else the pipeline's unet/) without loading it; a Hub id is looked up in the local cache."""
    lora = read_spec(source.lora) if source.lora is not None else None
    if lora is not None:
        return lora
    if source.unet is not None:
        return read_spec(source.unet)
    folder = Path(source.pipeline)
    if folder.is_dir():
        return read_spec(folder / "unet")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.pipeline, f"unet/{SPEC_FILENAME}")
    return read_spec(Path(cached).parent) if isinstance(cached, str) else None


def check_source_request(source, metadata: Optional[dict], guidance_scale: float) -> dict:
    """generate.py's --metadata and --metadata_guidance_scale checked against the model before anything loads:
    the normalised metadata, or a UsageError line."""
    encoder = source_spec(source)
    try:
        values = check_request(encoder, metadata)
    except ValueError as err:
        raise UsageError(f"--metadata: {err}.") from None
    if encoder is None and guidance_scale != 1.0:
        raise UsageError(f"--metadata_guidance_scale {guidance_scale} needs a model trained with --metadata_fields "
                         f"(its UNet has no {SPEC_FILENAME}).")
    return values
