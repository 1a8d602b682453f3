"""Cache of what is frozen: VAE posteriors of every training image and text-encoder states of every caption.

Layout of one cache (a folder named by its key, under --latents_cache_dir or OUTPUT_DIR/.cache/latents):
  latents-<start>-<end>.safetensors   rows [start, end): `mean` and `std`, shape (rows, views, 4, h, w), views =
                                      (image, flipped image) with --random_flip, else (image,)
  captions-<start>-<end>.safetensors  distinct captions [start, end): `states`, shape (captions, 77, hidden)
  manifest.json                       written last: its presence means the cache is complete
Tensors are kept in the dtype the VAE and text encoder compute in, so a step samples exactly what the uncached
path would. Every file is written to a temporary name and renamed.
"""

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from utils.atomic import write_json_atomic
from utils.cli import UsageError
from utils.logger import get_logger

CACHE_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
DEFAULT_CACHE_SUBDIR = Path(".cache") / "latents"  # under OUTPUT_DIR; the Hub push skips .cache/
KEY_CHARS = 24


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


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a model's class, config and every weight's name, dtype, shape and bytes."""
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    """sha256 over the rows in order: each image's encoded bytes and its caption(s)."""
    import datasets

    raw = table.select_columns([image_column, caption_column])
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))
    digest = hashlib.sha256()
    for row in raw:
        digest.update(hashlib.sha256(image_bytes(row[image_column])).digest())
        digest.update(json.dumps(row[caption_column], default=str).encode())
    return digest.hexdigest()


def cache_key(settings: CacheSettings, vae_id: str, text_encoder_id: str, data_id: str) -> str:
    """The cache's name: a hash of the settings, the frozen models' fingerprints and the data's."""
    payload = {"version": CACHE_VERSION, "settings": asdict(settings), "vae": vae_id,
               "text_encoder": text_encoder_id, "data": data_id}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def index_captions(cells: Sequence, column: str) -> Tuple[List[str], list]:
    """(distinct captions in first-seen order, per row: a caption id, or a list of ids in the row's order)."""
    ids, rows = {}, []
    for cell in cells:
        if isinstance(cell, str):
            rows.append(ids.setdefault(cell, len(ids)))
        elif isinstance(cell, (list, tuple)) and len(cell) > 0:
            rows.append([ids.setdefault(str(c), len(ids)) for c in cell])
        else:
            raise UsageError(f"Caption column `{column}` should contain either strings or lists of strings.")
    distinct = [None] * len(ids)
    for caption, i in ids.items():
        distinct[i] = caption
    return distinct, rows


def shard_range(total: int, rank: int, world: int) -> Tuple[int, int]:
    """The contiguous slice [start, end) of total items that process rank of world builds."""
    return total * rank // world, total * (rank + 1) // world


def shard_name(prefix: str, start: int, end: int) -> str:
    """File name of a shard; the range is in the name so shards of different world sizes never mix."""
    return f"{prefix}-{start:07d}-{end:07d}.safetensors"


def save_atomic(tensors: dict, path: Path) -> None:
    """safetensors save to a temporary name in the same folder, then rename."""
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)


def posterior(vae, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for a batch of [-1, 1] images."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_posterior(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A draw from N(mean, std²) consuming the global RNG exactly as diffusers' latent_dist.sample() does."""
    return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)


def encode_captions(text_encoder, tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states of captions, padded to the context length like training does."""
    from trainer.data import tokenize

    with torch.no_grad():
        ids = tokenize(tokenizer, captions).to(text_encoder.device)
        return text_encoder(ids, return_dict=False)[0]


class ImageViews(torch.utils.data.Dataset):
    """Rows [start, end) of the table as centre-cropped [-1, 1] tensors (the flip is added by the builder)."""

    def __init__(self, table, image_column: str, transform: Callable, start: int, end: int):
        """transform: the training transform without flip (its RNG argument is unused under centre crop)."""
        self.table, self.image_column, self.transform, self.start, self.end = table, image_column, transform, start, end

    def __len__(self) -> int:
        """Rows in this shard."""
        return self.end - self.start

    def __getitem__(self, index: int) -> torch.Tensor:
        """The row's pixel tensor."""
        return self.transform(self.table[self.start + index][self.image_column], random.Random(0))


def build_latent_shard(vae, views: ImageViews, flip: bool, batch_size: int, num_workers: int,
                       show_progress: bool) -> dict:
    """Encode one shard's images (and their mirror images with flip) in batches; {"mean", "std"} on the CPU."""
    from tqdm.auto import tqdm

    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, and a cached run must
    # leave that RNG exactly as an uncached run finds it.
    loader = torch.utils.data.DataLoader(views, batch_size=batch_size, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    means, stds = [], []
    for pixels in tqdm(loader, desc="Caching latents", unit="batch", disable=not show_progress):
        batch = torch.stack([pixels, pixels.flip(-1)], dim=1) if flip else pixels.unsqueeze(1)
        mean, std = posterior(vae, batch.flatten(0, 1))
        means.append(mean.unflatten(0, batch.shape[:2]).cpu())
        stds.append(std.unflatten(0, batch.shape[:2]).cpu())
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


def build_caption_shard(text_encoder, tokenizer, captions: Sequence[str], batch_size: int,
                        show_progress: bool) -> dict:
    """Encode one shard of the distinct captions in batches; {"states"} on the CPU."""
    from tqdm.auto import tqdm

    states = []
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc="Caching text embeddings", unit="batch", disable=not show_progress):
        states.append(encode_captions(text_encoder, tokenizer, captions[start:start + batch_size]).cpu())
    return {"states": torch.cat(states)}


@dataclass
class Builder:
    """The pieces a cache build needs; rank/world shard the work when several processes train."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    transform: Callable
    batch_size: int
    num_workers: int
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


def build_shards(builder: Builder, folder: Path, table, image_column: str, captions: List[str], flip: bool) -> None:
    """This process's latent and caption shards; shards already on disk (an interrupted build) are kept."""
    show = builder.rank == 0
    start, end = shard_range(len(table), builder.rank, builder.world)
    path = folder / shard_name("latents", start, end)
    if end > start and not path.exists():
        views = ImageViews(table, image_column, builder.transform, start, end)
        save_atomic(build_latent_shard(builder.vae, views, flip, builder.batch_size, builder.num_workers, show), path)
    start, end = shard_range(len(captions), builder.rank, builder.world)
    path = folder / shard_name("captions", start, end)
    if end > start and not path.exists():
        save_atomic(build_caption_shard(builder.text_encoder, builder.tokenizer, captions[start:end],
                                        builder.batch_size, show), path)


def nonempty_shards(total: int, world: int) -> List[Tuple[int, int]]:
    """The [start, end) ranges of all processes' shards that hold at least one item."""
    return [(start, end) for start, end in (shard_range(total, r, world) for r in range(world)) if end > start]


def manifest_for(key: str, settings: CacheSettings, num_rows: int, captions: List[str], row_captions: list,
                 world: int) -> dict:
    """The manifest: key, settings, shard files and the caption index."""
    return {"version": CACHE_VERSION, "key": key, "settings": asdict(settings), "num_rows": num_rows,
            "latent_shards": nonempty_shards(num_rows, world),
            "caption_shards": nonempty_shards(len(captions), world),
            "captions": captions, "row_captions": row_captions}


def read_manifest(folder: Path, key: str) -> Optional[dict]:
    """The manifest of a complete cache with this key, or None."""
    path = folder / MANIFEST_FILENAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return manifest if manifest.get("key") == key and manifest.get("version") == CACHE_VERSION else None


def prepare_cache(root: Path, key: str, settings: CacheSettings, table, builder: Builder) -> Tuple[Path, bool]:
    """Reuse the cache with this key under root, or build it (sharded); return (its folder, whether it was built)."""
    folder = Path(root) / key
    if read_manifest(folder, key) is not None:
        get_logger().info("Reusing the latent cache %s", folder)
        return folder, False
    get_logger().info("Building the latent cache %s (%d images, flip=%s)", folder, len(table), settings.random_flip)
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    captions, row_captions = index_captions(table[settings.caption_column], settings.caption_column)
    build_shards(builder, folder, table, settings.image_column, captions, settings.random_flip)
    builder.barrier()
    if builder.rank == 0:
        write_json_atomic(folder / MANIFEST_FILENAME,
                          manifest_for(key, settings, len(table), captions, row_captions, builder.world))
    builder.barrier()
    get_logger().info("Latent cache built in %.2f s: %d images, %d distinct captions", time.perf_counter() - started,
                      len(table), len(captions))
    return folder, True


class CachedDataset(torch.utils.data.Dataset):
    """Rows → cached posterior (mean, std) and caption states, with flip and caption drawn like TrainingDataset.

    The per-(seed, epoch, row) RNG is consumed in the same order as TrainingDataset (caption choice, then flip),
    so a cached run picks the same caption and view as an uncached one. Shards are opened lazily with safe_open
    in each process (memory-mapped: only the rows read are paged in).
    """

    def __init__(self, folder: Path, seed: int, random_flip: bool, epoch=None):
        """folder: a complete cache; epoch: a shared SharedEpoch (a new one when None)."""
        from trainer.data import SharedEpoch

        self.folder, self.seed, self.random_flip = Path(folder), seed, random_flip
        manifest = json.loads((self.folder / MANIFEST_FILENAME).read_text(encoding="utf-8"))
        self.num_rows, self.row_captions = manifest["num_rows"], manifest["row_captions"]
        self.latent_shards = [tuple(s) for s in manifest["latent_shards"]]
        self.caption_shards = [tuple(s) for s in manifest["caption_shards"]]
        self.epoch = epoch if epoch is not None else SharedEpoch()
        self._handles, self._pid = {}, None

    def __len__(self) -> int:
        """Number of rows."""
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoader at each epoch; persistent workers see it through shared memory."""
        self.epoch.set(epoch)

    def __getstate__(self) -> dict:
        """Pickled without open file handles (workers started by spawn reopen them)."""
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def _read(self, prefix: str, shards: Sequence[Tuple[int, int]], index: int, names: Sequence[str]) -> list:
        """Row index of the shard holding it: one tensor per name."""
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        start, end = next(s for s in shards if s[0] <= index < s[1])
        name = shard_name(prefix, start, end)
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        handle = self._handles[name]
        return [handle.get_slice(n)[index - start] for n in names]

    def __getitem__(self, index: int) -> dict:
        """The row's posterior of the view drawn for this epoch, and its drawn caption's states."""
        rng = random.Random(f"{self.seed}:{self.epoch.get()}:{int(index)}")
        caption = self.row_captions[int(index)]
        caption_id = rng.choice(caption) if isinstance(caption, list) else caption
        view = 1 if self.random_flip and rng.random() < 0.5 else 0
        mean, std = self._read("latents", self.latent_shards, int(index), ("mean", "std"))
        (states,) = self._read("captions", self.caption_shards, caption_id, ("states",))
        return {"latent_mean": mean[view], "latent_std": std[view], "encoder_hidden_states": states}


def collate_cached(examples: Sequence[dict]) -> dict:
    """Stack cached rows into a batch."""
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def cache_root(latents_cache_dir: Optional[str], output_dir: str) -> Path:
    """--latents_cache_dir, or OUTPUT_DIR/.cache/latents."""
    return Path(latents_cache_dir) if latents_cache_dir else Path(output_dir) / DEFAULT_CACHE_SUBDIR


def cached_training_dataset(accelerator, args, components, dataset, weight_dtype: torch.dtype,
                            num_workers: int) -> CachedDataset:
    """Key the cache on settings, frozen models and data; reuse or build it (sharded over processes); open it."""
    from trainer.data import make_image_transform

    settings = CacheSettings.from_args(args, weight_dtype)
    key = cache_key(settings, module_fingerprint(components.vae), module_fingerprint(components.text_encoder),
                    data_fingerprint(dataset.table, dataset.image_column, dataset.caption_column))
    builder = Builder(components.vae, components.text_encoder, components.tokenizer,
                      make_image_transform(args.resolution, True, False, args.image_interpolation_mode),
                      args.vae_batch_size, num_workers, accelerator.process_index, accelerator.num_processes,
                      accelerator.wait_for_everyone)
    folder, _ = prepare_cache(cache_root(args.latents_cache_dir, args.output_dir), key, settings,
                              dataset.table, builder)
    return CachedDataset(folder, dataset.seed, args.random_flip)
