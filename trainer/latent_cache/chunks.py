"""Chunk files: fixed row ranges, assigned to processes statically, each built, saved atomically and checked alone."""

import json
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
from PIL import Image

from utils.image_errors import ImageRejected
from trainer.data import decoded_row
from utils.constants import TMP_SUFFIX

LATENTS_PREFIX = "latents"
UNREADABLE = "unreadable"  # a latent chunk's (rows,) bool tensor: the row's image could not be read
CAPTIONS_PREFIX = "captions"
CHUNK_SUFFIX = ".safetensors"


def chunk_ranges(total: int, chunk_rows: int) -> List[Tuple[int, int]]:
    """The [start, end) row ranges of all chunks: chunk_rows each, the last one shorter."""
    return [(start, min(start + chunk_rows, total)) for start in range(0, total, chunk_rows)]


def assigned(ranges: Sequence[Tuple[int, int]], rank: int, world: int) -> List[Tuple[int, int]]:
    """The chunks process rank of world builds: chunk i goes to process i % world."""
    return list(ranges[rank::world])


def chunk_name(prefix: str, start: int, end: int) -> str:
    """File name of a chunk; the range is in the name so chunks of another size never mix."""
    return f"{prefix}-{start:07d}-{end:07d}{CHUNK_SUFFIX}"


def save_chunk(tensors: dict, path: Path, start: int, end: int) -> None:
    """safetensors save to a temporary name in the same folder, then rename; the range goes in its metadata."""
    from safetensors.torch import save_file

    partial = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    # One metadata entry: safetensors writes several in no fixed order, and chunks must be byte-reproducible.
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"rows": f"{start}-{end}"})
    os.replace(partial, path)


def chunk_is_complete(path: Path, start: int, end: int) -> bool:
    """True when path is a whole chunk of rows [start, end): its size, range metadata and every tensor's rows agree."""
    try:
        with open(path, "rb") as handle:
            header_size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError, struct.error):  # missing, truncated or not safetensors: rebuild it
        return False
    metadata = header.pop("__metadata__", None) or {}
    tensors = [v for v in header.values() if isinstance(v, dict) and "shape" in v and "data_offsets" in v]
    data_end = max((t["data_offsets"][1] for t in tensors), default=0)
    return (path.stat().st_size == 8 + header_size + data_end and metadata.get("rows") == f"{start}-{end}"
            and bool(tensors)
            and all(t["shape"][:1] == [end - start] for t in tensors))


def stale_files(folder: Path, expected: set) -> List[Path]:
    """Temporary files of an interrupted save, and chunk files of another chunk size."""
    return [p for p in folder.iterdir()
            if p.name.endswith(TMP_SUFFIX) or (p.name.endswith(CHUNK_SUFFIX) and p.name not in expected)]


def posterior(vae, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for a batch of [-1, 1] images."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean, dist.std


def encode_views(vae, pixels: torch.Tensor, flip: bool) -> dict:
    """{"mean", "std"} of a batch, shape (rows, views, 4, h, w) on the CPU; views = (image, mirror) with flip."""
    batch = torch.stack([pixels, pixels.flip(-1)], dim=1) if flip else pixels.unsqueeze(1)
    mean, std = posterior(vae, batch.flatten(0, 1))
    return {"mean": mean.unflatten(0, batch.shape[:2]).cpu(), "std": std.unflatten(0, batch.shape[:2]).cpu()}


class ImageViews(torch.utils.data.Dataset):
    """Rows of the table (by global row id) as centre-cropped [-1, 1] tensors, each with whether its image could not
    be read; the flip is added by the builder.

    An unreadable row is encoded as a black image and marked, never served: training reads the mark and takes the
    next readable row, as without the cache. A stand-in's latents stored in its place would carry its own caption's
    image under this row's captions, and which rows stand in would depend on what else the run had met.
    """

    def __init__(self, table, image_column: str, transform: Callable, bad_rows=None):
        """transform: the training transform without flip (its RNG argument is unused under centre crop);
        bad_rows: the training rows' trainer.bad_rows.BadRows, where each unreadable image is recorded (or None)."""
        self.table, self.image_column, self.transform, self.bad_rows = table, image_column, transform, bad_rows

    def __len__(self) -> int:
        """Rows in the table."""
        return len(self.table)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, bool]:
        """(the row's pixel tensor, False), or (a black image's, True) when its image cannot be read."""
        try:
            image = decoded_row(self.table, index, self.image_column)[self.image_column]
        except ImageRejected as err:
            if self.bad_rows is not None:
                self.bad_rows.record(int(index), err)
            return self.transform(Image.new("RGB", (1, 1)), random.Random(0)), True
        return self.transform(image, random.Random(0)), False


def unreadable_rows(folder: Path, num_rows: int, chunk_rows: int) -> List[int]:
    """The rows the latent chunks of a finished build mark unreadable, in order."""
    from safetensors import safe_open

    rows = []
    for start, end in chunk_ranges(num_rows, chunk_rows):
        with safe_open(str(folder / chunk_name(LATENTS_PREFIX, start, end)), framework="pt") as chunk:
            rows += (chunk.get_tensor(UNREADABLE).nonzero().flatten() + start).tolist()
    return rows


class ChunkBatches(torch.utils.data.Sampler):
    """Batches of row ids in chunk order that never cross a chunk's end, so a chunk is complete after its batches."""

    def __init__(self, ranges: Sequence[Tuple[int, int]], batch_size: int):
        """ranges: the chunks to build, in order."""
        self.ranges, self.batch_size = list(ranges), batch_size

    def __iter__(self) -> Iterator[List[int]]:
        """Each chunk's rows, batch_size at a time."""
        for start, end in self.ranges:
            for first in range(start, end, self.batch_size):
                yield list(range(first, min(first + self.batch_size, end)))

    def __len__(self) -> int:
        """Number of batches."""
        return sum(-(-(end - start) // self.batch_size) for start, end in self.ranges)


@dataclass
class ChunkRows:
    """The rows of the chunk being built (the only tensors a build holds); peak: most rows ever held at once."""

    parts: dict = None
    rows: int = 0
    peak: int = 0

    def add(self, tensors: dict) -> None:
        """Append one batch's tensors (rows along the first dimension)."""
        self.parts = self.parts or {name: [] for name in tensors}
        for name, tensor in tensors.items():
            self.parts[name].append(tensor)
        self.rows += next(iter(tensors.values())).shape[0]
        self.peak = max(self.peak, self.rows)

    def take(self) -> dict:
        """The chunk's tensors, concatenated; the buffer is emptied."""
        tensors = {name: torch.cat(pieces) for name, pieces in self.parts.items()}
        self.parts, self.rows = None, 0
        return tensors
