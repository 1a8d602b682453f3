"""Training from a cache: rows read lazily from the chunk files, caption and view drawn like TrainingDataset."""

import json
import os
import random
from collections import OrderedDict
from pathlib import Path

import torch

from utils.image_errors import ImageRejected
from trainer.bad_rows import BadRows
from trainer.latent_cache.build import (MANIFEST_FILENAME, TEXT_STATES, Builder, cache_root, prepare_cache,
                                        text_kind, text_states_bytes)
from trainer.latent_cache.chunks import CAPTIONS_PREFIX, LATENTS_PREFIX, chunk_name
from trainer.latent_cache.index import caption_column, index_captions
from trainer.latent_cache.keys import (CacheSettings, cache_key, data_fingerprint, module_fingerprint,
                                      vae_fingerprint)
from utils.logger import get_logger

MAX_OPEN_CHUNKS = 32  # safe_open handles kept per process (each maps one chunk file); older ones are closed


def sample_posterior(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A draw from N(mean, std²) consuming the global RNG exactly as diffusers' latent_dist.sample() does."""
    return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)


class CachedDataset(torch.utils.data.Dataset):
    """Rows → cached posterior (mean, std) and caption states or token ids, with flip and caption drawn like
    TrainingDataset.

    The per-(seed, epoch, row) RNG is consumed in the same order as TrainingDataset (caption choice, then flip),
    so a cached run picks the same caption and view as an uncached one; a row whose image could not be read when
    the cache was built is replaced by the next readable row, as TrainingDataset replaces it. Chunk files are
    opened lazily with safe_open in each process (DataLoader workers too) and memory-mapped: only the rows read are
    paged in.
    """

    def __init__(self, folder: Path, seed: int, random_flip: bool, epoch=None, metadata=None, dropout=None,
                 empty_text=None, bad_rows=None):
        """folder: a complete cache; epoch: a shared SharedEpoch (a new one when None).

        metadata: trainer.metadata.RowMetadata of the table the cache was built from, row for row (the cache's
        row i is that table's row i), so the metadata need not be in the chunks and one cache serves any
        --metadata_fields; dropout: trainer.metadata.GuidanceDropout; empty_text: the empty prompt's cached
        states or token ids, given when captions can be dropped; bad_rows: the uncached dataset's
        trainer.bad_rows.BadRows, carried on (a new one when None), where every row the cache marks unreadable is
        recorded at once.
        """
        from trainer.data import SharedEpoch
        from trainer.metadata import GuidanceDropout

        self.folder, self.seed, self.random_flip = Path(folder), seed, random_flip
        self.metadata, self.dropout, self.empty_text = metadata, dropout or GuidanceDropout(), empty_text
        manifest = json.loads((self.folder / MANIFEST_FILENAME).read_text(encoding="utf-8"))
        self.num_rows, self.num_captions = manifest["num_rows"], manifest["num_captions"]
        self.chunk_rows, self.text = manifest["chunk_rows"], manifest["text"]
        self.unreadable = frozenset(manifest["unreadable_rows"])
        self.epoch = epoch if epoch is not None else SharedEpoch()
        self._handles, self._pid = OrderedDict(), None
        if metadata is not None and len(metadata.raw) != self.num_rows:
            raise ValueError(f"{len(metadata.raw)} metadata rows for a cache of {self.num_rows} rows")
        if self.dropout.caption and empty_text is None:
            raise ValueError("caption dropout needs the empty prompt's cached text")
        self.bad_rows = bad_rows or BadRows(self.num_rows, (ImageRejected,))
        for row in sorted(self.unreadable):
            self.bad_rows.record(row, self.unreadable_error(row))

    def unreadable_error(self, row: int) -> ImageRejected:
        """What reading a row the cache marks unreadable raises (bad_rows.json reads its image again for why)."""
        return ImageRejected("unreadable_in_cache", f"its image could not be read when the latent cache "
                                                    f"{self.folder.name} was built")

    @property
    def served_models(self) -> tuple:
        """The frozen models this cache replaces during training (the text encoder runs when only ids are cached)."""
        return ("vae", "text_encoder") if self.text == TEXT_STATES else ("vae",)

    def __len__(self) -> int:
        """Number of rows."""
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoader at each epoch; persistent workers see it through shared memory."""
        self.epoch.set(epoch)

    def __getstate__(self) -> dict:
        """Pickled without open file handles (workers started by spawn reopen them)."""
        return {**self.__dict__, "_handles": OrderedDict(), "_pid": None}

    def _handle(self, name: str):
        """The safe_open handle of a chunk file, opened on first use in this process; least recently used closed."""
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked worker must not share its parent's handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if name in self._handles:
            self._handles.move_to_end(name)
        else:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
            if len(self._handles) > MAX_OPEN_CHUNKS:
                self._handles.popitem(last=False)
        return self._handles[name]

    def _read(self, prefix: str, total: int, item: int, names) -> list:
        """Row item of the chunk holding it: one tensor per name."""
        start = item // self.chunk_rows * self.chunk_rows
        handle = self._handle(chunk_name(prefix, start, min(start + self.chunk_rows, total)))
        return [handle.get_slice(name)[item - start] for name in names]

    def __getitem__(self, index: int) -> dict:
        """The row's posterior of the view drawn for this epoch, and its drawn caption's states or token ids (the
        next readable row's when its image could not be read)."""
        return self.bad_rows.first_good(int(index), self.item)

    def item(self, index: int) -> dict:
        """The row's item, whatever it holds."""
        return self.row(index)[0]

    def row(self, index: int) -> tuple:
        """(__getitem__'s item, the view drawn: 1 for the flipped image), for data that must follow the flip."""
        from trainer.metadata import row_conditioning

        index = int(index)
        if index in self.unreadable:
            raise self.unreadable_error(index)
        rng = random.Random(f"{self.seed}:{self.epoch.get()}:{index}")
        mean, std, ids, is_list = self._read(LATENTS_PREFIX, self.num_rows, index,
                                             ("mean", "std", "caption_ids", "caption_is_list"))
        ids = [i for i in ids.tolist() if i >= 0]
        caption_id = rng.choice(ids) if bool(is_list) else ids[0]
        view = 1 if self.random_flip and rng.random() < 0.5 else 0
        empty_caption, vector = row_conditioning(self.metadata, self.dropout, self.seed, self.epoch.get(), index)
        text = self.empty_text if empty_caption else self._text(caption_id)
        item = {"latent_mean": mean[view], "latent_std": std[view], **text}
        return (item if vector is None else {**item, "metadata": vector}), view

    def _text(self, caption_id: int) -> dict:
        """A caption's cached states ({"encoder_hidden_states"}) or token ids ({"input_ids"})."""
        name = "states" if self.text == TEXT_STATES else "input_ids"
        (text,) = self._read(CAPTIONS_PREFIX, self.num_captions, caption_id, (name,))
        return {"encoder_hidden_states": text} if self.text == TEXT_STATES else {"input_ids": text.long()}


def collate_cached(examples) -> dict:
    """Stack cached rows into a batch."""
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def decide_text(args, components, num_captions: int, weight_dtype: torch.dtype) -> str:
    """--text_cache resolved for this data: cache states or token ids; one line saying which and why."""
    size = text_states_bytes(num_captions, components.tokenizer.model_max_length,
                             components.text_encoder.config.hidden_size, weight_dtype)
    kind = text_kind(args.text_cache, size, int(args.text_cache_budget_gb * 1e9))
    get_logger().info("--text_cache %s: %d distinct captions, %.3f GB of text-encoder states (budget %g GB): "
                      "caching %s", args.text_cache, num_captions, size / 1e9, args.text_cache_budget_gb,
                      "the states" if kind == TEXT_STATES else "token ids; the text encoder runs each step")
    return kind


def encode_batch_size(args) -> int:
    """Images per encoder batch in the cache build: --vae_batch_size, else the training batch size."""
    return args.vae_batch_size or args.train_batch_size


def cached_training_dataset(accelerator, args, components, dataset, weight_dtype: torch.dtype,
                            num_workers: int) -> CachedDataset:
    """Key the cache on settings, frozen models, data and text kind; reuse or build it (chunked); open it."""
    from trainer.data import make_image_transform

    settings = CacheSettings.from_args(args, weight_dtype)
    index = index_captions(caption_column(dataset.table, dataset.caption_column), dataset.caption_column)
    text = decide_text(args, components, len(index.captions), weight_dtype)
    key = cache_key(settings, vae_fingerprint(components.vae), module_fingerprint(components.text_encoder),
                    data_fingerprint(dataset.table, dataset.image_column, dataset.caption_column), text)
    builder = Builder(components.vae, components.text_encoder, components.tokenizer,
                      make_image_transform(args.resolution, True, False, args.image_interpolation_mode),
                      encode_batch_size(args), num_workers, accelerator.process_index, accelerator.num_processes,
                      accelerator.wait_for_everyone, args.cache_chunk_rows, text, bad_rows=dataset.bad_rows)
    folder, _ = prepare_cache(cache_root(args.latents_cache_dir, args.output_dir), key, settings,
                              dataset.table, builder, index)
    empty = empty_prompt_text(components, text) if dataset.dropout.caption else None
    return CachedDataset(folder, dataset.seed, args.random_flip, metadata=dataset.metadata, dropout=dataset.dropout,
                         empty_text=empty, bad_rows=dataset.bad_rows)


def empty_prompt_text(components, text: str) -> dict:
    """The empty prompt as the cache serves captions: text-encoder states (on the CPU) or token ids."""
    from trainer.data import tokenize

    ids = tokenize(components.tokenizer, [""])
    if text != TEXT_STATES:
        return {"input_ids": ids[0]}
    with torch.no_grad():
        states = components.text_encoder(ids.to(components.text_encoder.device), return_dict=False)[0]
    return {"encoder_hidden_states": states[0].cpu()}
