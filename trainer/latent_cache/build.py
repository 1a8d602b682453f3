"""Build (or reuse) a cache: this process's missing chunks, then the index and the manifest, written last."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from trainer.latent_cache.chunks import (CAPTIONS_PREFIX, LATENTS_PREFIX, UNREADABLE, ChunkBatches, ChunkRows,
                                         ImageViews, assigned, chunk_is_complete, chunk_name, chunk_ranges,
                                         encode_views, save_chunk, stale_files, unreadable_rows)
from trainer.latent_cache.index import CaptionIndex, caption_column, index_captions, write_index
from trainer.latent_cache.keys import CACHE_VERSION, CacheSettings
from utils.atomic import write_json_atomic
from utils.constants import DEFAULT_CACHE_CHUNK_ROWS
from utils.logger import get_logger

MANIFEST_FILENAME = "manifest.json"
DEFAULT_CACHE_SUBDIR = Path(".cache") / "latents"  # under OUTPUT_DIR; the Hub push skips .cache/
TEXT_STATES, TEXT_TOKENS = "states", "tokens"  # what the caption chunks hold
TEXT_CACHE_MODES = ("auto", "on", "off")


def text_states_bytes(num_captions: int, context_length: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes that the text-encoder states of num_captions distinct captions take."""
    return num_captions * context_length * hidden_size * torch.empty((), dtype=dtype).element_size()


def text_kind(mode: str, states_bytes: int, budget_bytes: int) -> str:
    """What caption chunks hold: states for --text_cache on, or auto within the budget; token ids otherwise."""
    if mode not in TEXT_CACHE_MODES:
        raise ValueError(f"text cache mode {mode!r} is not one of {TEXT_CACHE_MODES}")
    caches = mode == "on" or (mode == "auto" and states_bytes <= budget_bytes)
    return TEXT_STATES if caches else TEXT_TOKENS


@dataclass
class BuildStats:
    """What this process's last build did: chunk files written, and the most rows it held at once."""

    chunks_built: List[str] = field(default_factory=list)
    peak_rows: int = 0


@dataclass
class Builder:
    """The pieces a cache build needs; rank/world split the chunks when several processes train."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    transform: Callable
    batch_size: int
    num_workers: int
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    chunk_rows: int = DEFAULT_CACHE_CHUNK_ROWS
    text: str = TEXT_STATES
    stats: BuildStats = field(default_factory=BuildStats)
    bad_rows: object = None  # the training rows' trainer.bad_rows.BadRows: each unreadable image met is recorded


def missing(folder: Path, prefix: str, ranges: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The ranges whose chunk file is absent or incomplete."""
    return [(s, e) for s, e in ranges if not chunk_is_complete(folder / chunk_name(prefix, s, e), s, e)]


def build_latent_chunks(builder: Builder, folder: Path, views: ImageViews, ranges, index: CaptionIndex,
                        flip: bool) -> None:
    """Encode and save the given latent chunks one at a time; each also holds its rows' caption ids."""
    from tqdm.auto import tqdm

    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, and a cached run must
    # leave that RNG exactly as an uncached run finds it.
    loader = torch.utils.data.DataLoader(views, batch_sampler=ChunkBatches(ranges, builder.batch_size),
                                         num_workers=builder.num_workers, generator=torch.Generator().manual_seed(0))
    batches = iter(tqdm(loader, desc="Caching latents", unit="batch", disable=builder.rank != 0))
    held = ChunkRows()
    for start, end in ranges:
        while held.rows < end - start:
            pixels, unreadable = next(batches)
            held.add({**encode_views(builder.vae, pixels, flip), UNREADABLE: unreadable})
        name = chunk_name(LATENTS_PREFIX, start, end)
        save_chunk({**held.take(), **index.row_tensors(start, end)}, folder / name, start, end)
        builder.stats.chunks_built.append(name)
    builder.stats.peak_rows = max(builder.stats.peak_rows, held.peak)


def encode_caption_chunk(builder: Builder, captions: List[str]) -> dict:
    """{"input_ids"} (int32) of captions, or {"states"} computed from them batch by batch."""
    from trainer.data import tokenize

    ids = tokenize(builder.tokenizer, captions)
    if builder.text == TEXT_TOKENS:
        return {"input_ids": ids.to(torch.int32)}
    states = []
    with torch.no_grad():
        for first in range(0, len(ids), builder.batch_size):
            batch = ids[first:first + builder.batch_size].to(builder.text_encoder.device)
            states.append(builder.text_encoder(batch, return_dict=False)[0].cpu())
    return {"states": torch.cat(states)}


def build_caption_chunks(builder: Builder, folder: Path, index: CaptionIndex, ranges) -> None:
    """Encode and save the given caption chunks one at a time."""
    from tqdm.auto import tqdm

    desc = "Caching text embeddings" if builder.text == TEXT_STATES else "Caching token ids"
    for start, end in tqdm(ranges, desc=desc, unit="chunk", disable=builder.rank != 0):
        name = chunk_name(CAPTIONS_PREFIX, start, end)
        save_chunk(encode_caption_chunk(builder, index.captions[start:end].to_pylist()), folder / name, start, end)
        builder.stats.chunks_built.append(name)


def expected_names(num_rows: int, num_captions: int, chunk_rows: int) -> set:
    """Every chunk file a complete cache of this size has."""
    return {chunk_name(prefix, s, e) for prefix, total in ((LATENTS_PREFIX, num_rows), (CAPTIONS_PREFIX, num_captions))
            for s, e in chunk_ranges(total, chunk_rows)}


def build_chunks(builder: Builder, folder: Path, table, image_column: str, index: CaptionIndex, flip: bool) -> None:
    """This process's missing latent and caption chunks (chunk i of each kind belongs to process i % world)."""
    builder.stats = BuildStats()
    rows = assigned(chunk_ranges(len(table), builder.chunk_rows), builder.rank, builder.world)
    captions = assigned(chunk_ranges(len(index.captions), builder.chunk_rows), builder.rank, builder.world)
    todo_rows, todo_captions = missing(folder, LATENTS_PREFIX, rows), missing(folder, CAPTIONS_PREFIX, captions)
    kept = len(rows) + len(captions) - len(todo_rows) - len(todo_captions)
    if kept:
        get_logger().info("Process %d keeps %d finished chunk(s) and builds %d", builder.rank, kept,
                          len(todo_rows) + len(todo_captions))
    if todo_rows:
        build_latent_chunks(builder, folder, ImageViews(table, image_column, builder.transform, builder.bad_rows),
                            todo_rows, index, flip)
    if todo_captions:
        build_caption_chunks(builder, folder, index, todo_captions)


def manifest_for(key: str, settings: CacheSettings, num_rows: int, num_captions: int, chunk_rows: int,
                 text: str, unreadable: Sequence[int] = ()) -> dict:
    """The manifest: key, settings, counts and the rows whose image could not be read; the index lives in the
    Parquet files."""
    return {"version": CACHE_VERSION, "key": key, "settings": asdict(settings), "num_rows": num_rows,
            "num_captions": num_captions, "chunk_rows": chunk_rows, "text": text,
            "latent_chunks": len(chunk_ranges(num_rows, chunk_rows)),
            "caption_chunks": len(chunk_ranges(num_captions, chunk_rows)), "unreadable_rows": list(unreadable)}


def read_manifest(folder: Path, key: str) -> Optional[dict]:
    """The manifest of a complete cache with this key, or None."""
    path = folder / MANIFEST_FILENAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return manifest if manifest.get("key") == key and manifest.get("version") == CACHE_VERSION else None


def finish(folder: Path, key: str, settings: CacheSettings, num_rows: int, index: CaptionIndex,
           builder: Builder) -> None:
    """Check every chunk is there, then write the Parquet index and, last, the manifest (process 0 only)."""
    absent = sorted(expected_names(num_rows, len(index.captions), builder.chunk_rows)
                    - {p.name for p in folder.iterdir()})
    if absent:
        raise RuntimeError(f"the latent cache {folder} lacks {len(absent)} chunk(s) after its build, e.g. {absent[0]}")
    write_index(folder, index, builder.chunk_rows)
    # From the chunks, not from this process's record: other processes built some of them.
    unreadable = unreadable_rows(folder, num_rows, builder.chunk_rows)
    write_json_atomic(folder / MANIFEST_FILENAME, manifest_for(key, settings, num_rows, len(index.captions),
                                                               builder.chunk_rows, builder.text, unreadable))


def remove_stale(folder: Path, num_rows: int, num_captions: int, chunk_rows: int) -> None:
    """Delete temporary files of a killed build and chunks of another chunk size."""
    for path in stale_files(folder, expected_names(num_rows, num_captions, chunk_rows)):
        path.unlink(missing_ok=True)


def prepare_cache(root: Path, key: str, settings: CacheSettings, table, builder: Builder,
                  index: Optional[CaptionIndex] = None) -> Tuple[Path, bool]:
    """Reuse the cache with this key under root, or build its missing chunks; return (its folder, whether built)."""
    folder = Path(root) / key
    if read_manifest(folder, key) is not None:
        get_logger().info("Reusing the latent cache %s", folder)
        return folder, False
    get_logger().info("Building the latent cache %s (%d images, flip=%s, text %s, encoder batch %d)", folder,
                      len(table), settings.random_flip, builder.text, builder.batch_size)
    started = time.perf_counter()
    if index is None:
        index = index_captions(caption_column(table, settings.caption_column), settings.caption_column)
    if builder.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(folder, len(table), len(index.captions), builder.chunk_rows)
    builder.barrier()
    build_chunks(builder, folder, table, settings.image_column, index, settings.random_flip)
    builder.barrier()
    if builder.rank == 0:
        finish(folder, key, settings, len(table), index, builder)
    builder.barrier()
    get_logger().info("Latent cache built in %.2f s: %d images, %d distinct captions", time.perf_counter() - started,
                      len(table), len(index.captions))
    return folder, True


def cache_root(latents_cache_dir: Optional[str], output_dir: str) -> Path:
    """--latents_cache_dir, or OUTPUT_DIR/.cache/latents."""
    return Path(latents_cache_dir) if latents_cache_dir else Path(output_dir) / DEFAULT_CACHE_SUBDIR
