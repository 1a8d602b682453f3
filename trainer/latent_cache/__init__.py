"""Cache of what is frozen: VAE posteriors of every training image and, within a budget, text-encoder states of
every distinct caption (else their token ids, and the text encoder runs each step).

Layout of one cache (a folder named by its key, under --latents_cache_dir or OUTPUT_DIR/.cache/latents); chunks
hold --cache_chunk_rows rows each (the last one fewer), rows along the first dimension of every tensor:
  latents-<start>-<end>.safetensors   rows [start, end): `mean`, `std` (rows, views, 4, h, w), views = (image,
                                      flipped image) with --random_flip, else (image,); `caption_ids` (rows, k)
                                      int32 padded with -1; `caption_is_list` (rows,) bool
  captions-<start>-<end>.safetensors  distinct captions [start, end): `states` (captions, 77, hidden), or
                                      `input_ids` (captions, 77) int32 when text states are not cached
  index.parquet                       row, chunk, offset, caption_ids, caption_is_list
  captions.parquet                    caption_id, caption, chunk, offset
  manifest.json                       settings, key and counts; written last: its presence means the cache is complete
Chunk i of each kind is built by process i % world; each is saved under a temporary name and renamed, so a killed
build keeps its finished chunks and a rerun builds only the missing ones. Tensors are kept in the dtype the VAE and
text encoder compute in, so a step samples exactly what the uncached path would.
"""

from trainer.latent_cache.build import (DEFAULT_CACHE_SUBDIR, MANIFEST_FILENAME, TEXT_CACHE_MODES, TEXT_STATES,
                                        TEXT_TOKENS, Builder, BuildStats, build_chunks, cache_root, manifest_for,
                                        prepare_cache, read_manifest, text_kind, text_states_bytes)
from trainer.latent_cache.chunks import (CAPTIONS_PREFIX, LATENTS_PREFIX, ImageViews, assigned, chunk_is_complete,
                                         chunk_name, chunk_ranges, posterior)
from trainer.latent_cache.dataset import CachedDataset, cached_training_dataset, collate_cached, sample_posterior
from trainer.latent_cache.index import CAPTIONS_FILENAME, INDEX_FILENAME, CaptionIndex, index_captions
from trainer.latent_cache.keys import (CACHE_VERSION, KEY_CHARS, CacheSettings, cache_key, data_fingerprint,
                                       image_bytes, module_fingerprint, vae_fingerprint)
from utils.atomic import write_json_atomic

__all__ = [
    "CACHE_VERSION", "CAPTIONS_FILENAME", "CAPTIONS_PREFIX", "DEFAULT_CACHE_SUBDIR", "INDEX_FILENAME", "KEY_CHARS",
    "LATENTS_PREFIX", "MANIFEST_FILENAME", "TEXT_CACHE_MODES", "TEXT_STATES", "TEXT_TOKENS", "BuildStats", "Builder",
    "CacheSettings", "CachedDataset", "CaptionIndex", "ImageViews", "assigned", "build_chunks", "cache_key",
    "cache_root", "cached_training_dataset", "chunk_is_complete", "chunk_name", "chunk_ranges", "collate_cached",
    "data_fingerprint", "image_bytes", "index_captions", "manifest_for", "module_fingerprint", "posterior",
    "prepare_cache", "read_manifest", "sample_posterior", "text_kind", "text_states_bytes", "vae_fingerprint",
    "write_json_atomic",
]
