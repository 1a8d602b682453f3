"""The cache's key: settings, frozen models' fingerprints and the data's fingerprint."""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from utils.cli import UsageError

# 2: chunked safetensors files, Parquet index, token ids when text states are not cached. 3: latent chunks mark the
# rows whose image could not be read, and the manifest lists them.
CACHE_VERSION = 3
KEY_CHARS = 24
# The cache holds the VAE encoder's output, so the decoder's weights do not key it. Hashing them would also read a
# memory-mapped decoder (SD1.5's: 198 MiB) into the process, which the cached loop never uses otherwise.
VAE_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides model weights and data content that changes what the cache holds."""

    model: str
    revision: Optional[str]
    variant: Optional[str]
    resolution: int
    center_crop: bool
    random_flip: bool
    interpolation: str
    image_column: str
    caption_column: str
    dtype: str

    @classmethod
    def from_args(cls, args, dtype: torch.dtype) -> "CacheSettings":
        """The cache-relevant flags of a parsed command line, and the frozen models' dtype."""
        model = args.pretrained_model_name_or_path
        model = str(Path(model).resolve()) if Path(model).is_dir() else model
        return cls(model, args.revision, args.variant, args.resolution, args.center_crop, args.random_flip,
                   args.image_interpolation_mode, args.image_column, args.caption_column, str(dtype))


def module_fingerprint(module: torch.nn.Module, skip: Tuple[str, ...] = ()) -> str:
    """sha256 of a model's class, config and every weight's name, dtype, shape and bytes, less the weights whose
    names start with a prefix in skip."""
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        if name.startswith(skip):
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # Hashed in place: a copy of the largest weight (CLIP-L's token embedding, 145 MiB) would raise the peak.
        digest.update(memoryview(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """The VAE's fingerprint over what the cached latents depend on: its config and encoder, not its decoder."""
    return module_fingerprint(vae, skip=VAE_DECODER_PREFIXES)


def image_bytes(cell) -> bytes:
    """The encoded bytes of an undecoded image cell ({"bytes", "path"}), reading the file when only a path is set."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return cell["bytes"]
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str):
        return Path(cell).read_bytes()
    raise UsageError(f"--cache_latents cannot read image cell of type {type(cell).__name__}.")


def data_fingerprint(table, image_column: str, caption_column: str) -> str:
    """sha256 over the rows in order: each image's encoded bytes and its caption(s) (a sharded table's own, from its
    shards' recorded hashes)."""
    import datasets

    if hasattr(table, "fingerprint"):
        return table.fingerprint(image_column, caption_column)

    raw = table.select_columns([image_column, caption_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    digest = hashlib.sha256()
    for row in raw:
        digest.update(hashlib.sha256(image_bytes(row[image_column])).digest())
        digest.update(json.dumps(row[caption_column], default=str).encode())
    return digest.hexdigest()


def cache_key(settings: CacheSettings, vae_id: str, text_encoder_id: str, data_id: str,
              text_kind: str = "states") -> str:
    """The cache's name: a hash of the settings, the frozen models' and data's fingerprints, and what text it holds."""
    payload = {"version": CACHE_VERSION, "settings": asdict(settings), "vae": vae_id,
               "text_encoder": text_encoder_id, "data": data_id, "text": text_kind}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]
