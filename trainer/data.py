"""Training data: load image/caption pairs with `datasets`, transform them with Pillow + torch, batch them."""

import contextlib
import functools
import os
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from utils.shard_index import is_shards_dir
from trainer.shards import ShardTable, group_sampler
from utils.cli import UsageError
from trainer.bad_rows import BadRows
from trainer.imagefolder import load_imagefolder
from utils.image_errors import PILLOW_ERRORS, ImageRejected, pillow_failure
from utils.logger import get_logger
from utils.quiet import no_datasets_bars

# Pillow has no separate "nearest_exact": its NEAREST already samples pixel centres, which is what
# torchvision's nearest_exact fixes about its own nearest.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


# Shuffling and augmentation need a fixed seed even without --seed: every process must shuffle alike,
# and a resumed run must replay the same epoch order.
DEFAULT_DATA_SEED = 0


def data_seed(seed: Optional[int]) -> int:
    """Seed of the data order and augmentations: --seed, or a fixed default."""
    return DEFAULT_DATA_SEED if seed is None else seed


def is_saved_dataset(path: Path) -> bool:
    """True when path is a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def load_raw_dataset(dataset_name: Optional[str], dataset_config_name: Optional[str],
                     train_data_dir: Optional[str], cache_dir: Optional[str]):
    """The training split: a saved dataset folder, a hub/local dataset, a sharded folder (trainer/shards.py) or an
    imagefolder with metadata.jsonl.

    datasets' bars show only for a Hub dataset, whose download can take minutes; a local source loads quietly.
    """
    import datasets

    local = dataset_name is None or Path(dataset_name).exists()
    with no_datasets_bars() if local else contextlib.nullcontext():
        if dataset_name is not None and is_saved_dataset(Path(dataset_name)):
            loaded = datasets.load_from_disk(dataset_name)
        elif dataset_name is not None:
            loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        elif is_shards_dir(train_data_dir):
            loaded = ShardTable(train_data_dir)
        else:
            loaded = load_imagefolder(Path(train_data_dir), cache_dir)
    return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded


def check_column(flag: str, value: str, column_names: Sequence[str]) -> str:
    """Return value if it names a column; otherwise the reference's message as a UsageError."""
    if value not in column_names:
        raise UsageError(f"{flag}' value '{value}' needs to be one of: {', '.join(column_names)}")
    return value


def subsample(dataset, max_train_samples: Optional[int], seed: int):
    """Shuffle with the seed and keep the first max_train_samples rows (the whole set when None)."""
    if max_train_samples is None:
        return dataset
    return dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))


def pick_caption(caption, column: str, rng: random.Random = random) -> str:
    """A caption string; from a list of captions, a random one (a fresh draw every time the row is seen)."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0:
        return str(rng.choice(list(caption)))
    raise UsageError(f"Caption column `{column}` should contain either strings or lists of strings.")


def resize_shorter_side(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Scale so that the shorter side equals size, keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image if new_size == image.size else image.resize(new_size, resample=resample)


def crop_square(image: Image.Image, size: int, center: bool, rng: random.Random = random) -> Image.Image:
    """A size×size crop: centred, or at a uniformly random offset."""
    width, height = image.size
    if center:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → float CHW tensor in [-1, 1], the range the VAE was trained on."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def make_image_transform(resolution: int, center_crop: bool, random_flip: bool,
                         interpolation: str) -> Callable[[Image.Image, random.Random], torch.Tensor]:
    """The training transform: shorter side to resolution, square crop, optional flip, to [-1, 1]."""
    resample = INTERPOLATIONS[interpolation]

    def transform(image: Image.Image, rng: random.Random) -> torch.Tensor:
        """One training view of image, its random choices drawn from rng."""
        image = crop_square(resize_shorter_side(image.convert("RGB"), resolution, resample), resolution, center_crop,
                            rng)
        if random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)

    return transform


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the text encoder's context length."""
    return tokenizer(list(captions), max_length=tokenizer.model_max_length, padding="max_length",
                     truncation=True, return_tensors="pt").input_ids


class SharedEpoch:
    """The current epoch in shared memory, so persistent DataLoader workers see what set_epoch wrote.

    A plain attribute would be copied into each worker when it starts and never change there again.
    """

    def __init__(self, epoch: int = 0):
        """A one-element shared tensor holding epoch."""
        self.value = torch.full((1,), epoch, dtype=torch.int64).share_memory_()

    def get(self) -> int:
        """The epoch as last set (in any process)."""
        return int(self.value[0])

    def set(self, epoch: int) -> None:
        """Publish epoch to every process sharing this object."""
        self.value[0] = epoch


def decoded_row(table, index: int, image_column: str) -> dict:
    """Row index of table with its image decoded in full; an image Pillow cannot read raises ImageRejected."""
    try:
        row = table[int(index)]
        row[image_column].load()  # a lazily opened image (a sharded table's) decodes here, not in the transform
    except PILLOW_ERRORS as err:
        raise pillow_failure(err) from None
    return row


def undecoded(table, column: str):
    """table with an Image column left as {bytes, path} (its files named and read without decoding them)."""
    import datasets

    if isinstance(table.features.get(column), datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    return table


def cell_name(cell) -> Optional[str]:
    """The file an image cell (a path, or {bytes, path}) names; None for bytes without a path."""
    if isinstance(cell, dict):
        cell = cell.get("path")
    return cell if isinstance(cell, str) else None


def relative_name(path: Optional[str], folder: Optional[Path]) -> Optional[str]:
    """path relative to folder (as metadata.jsonl names it) when it lies inside it, else path as given."""
    if path is None or folder is None:
        return path
    for base in (folder.absolute(), folder.resolve()):  # datasets may have stored it with symlinks resolved
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            continue
    return path


class CellNames:
    """The image files of a datasets table's rows (an image folder's, a saved or Hub dataset's), as bad_rows.json
    names them: for such a table what ShardTable.image_name is for a sharded one."""

    def __init__(self, table, image_column: str, folder: Optional[Path]):
        """table's image_column names the files; those inside folder are named relative to it."""
        self.table, self.image_column, self.folder = table, image_column, folder

    @functools.cached_property
    def cells(self):
        """The image column undecoded ({bytes, path} cells), to name a row's file without decoding it."""
        return undecoded(self.table.select_columns([self.image_column]), self.image_column)

    def image_name(self, index: int) -> Optional[str]:
        """Where row index's image lies, for reports: its file as metadata.jsonl names it; None for bytes only."""
        return relative_name(cell_name(self.cells[int(index)][self.image_column]), self.folder)


class TrainingDataset(torch.utils.data.Dataset):
    """Rows → pixel_values and input_ids, with crop/flip/caption drawn from a per-(seed, epoch, row) RNG.

    Global RNG state would make a resumed run see other augmentations than an uninterrupted one: accelerate
    prefetches a batch before a checkpoint is saved, and workers each hold their own RNG. A row whose image cannot
    be read is recorded in bad_rows and the next readable row stands in for it.
    """

    row_errors = (ImageRejected,)  # what makes a row bad (trainer.controlnet_data adds its conditioning's)

    def __init__(self, table, tokenizer, image_transform, image_column: str, caption_column: str, seed: int,
                 metadata=None, dropout=None, folder: Optional[Path] = None):
        """Wrap a datasets table; seed fixes the augmentation of each (epoch, row).

        metadata: trainer.metadata.RowMetadata of the rows (each item then has a "metadata" vector), or None;
        dropout: trainer.metadata.GuidanceDropout (none when None); folder: the data folder, whose image files
        bad_rows.json names relative to it (None: as the table holds them).
        """
        from trainer.metadata import GuidanceDropout

        self.table, self.tokenizer, self.image_transform = table, tokenizer, image_transform
        self.image_column, self.caption_column, self.seed = image_column, caption_column, seed
        self.metadata, self.dropout = metadata, dropout or GuidanceDropout()
        self.epoch = SharedEpoch()
        self.bad_rows, self.folder = BadRows(len(table), self.row_errors), folder
        self.image_names = table if isinstance(table, ShardTable) else CellNames(table, image_column, folder)

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.table)

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoader at each epoch (before its workers get indices): fresh augmentations."""
        self.epoch.set(epoch)

    def __getitem__(self, index: int) -> dict:
        """The row's item, or the next readable row's when it cannot be read."""
        return self.bad_rows.first_good(int(index), self.load)

    def load(self, index: int) -> dict:
        """The transformed row; the same (seed, epoch, index) always gives the same sample."""
        from trainer.metadata import row_conditioning

        rng = random.Random(f"{self.seed}:{self.epoch.get()}:{index}")
        row = decoded_row(self.table, index, self.image_column)
        caption = pick_caption(row[self.caption_column], self.caption_column, rng)
        item = self.pixels(row, rng)
        empty_caption, vector = row_conditioning(self.metadata, self.dropout, self.seed, self.epoch.get(), int(index))
        item["input_ids"] = tokenize(self.tokenizer, ["" if empty_caption else caption])[0]
        return item if vector is None else {**item, "metadata": vector}

    def pixels(self, row: dict, rng: random.Random) -> dict:
        """The row's training view ({"pixel_values"}); ControlNet data adds its conditioning, aligned."""
        return {"pixel_values": self.image_transform(row[self.image_column], rng)}

    def check_readable(self) -> None:
        """Read the first readable row here: with none, the run stops with one line in this process rather than
        with a traceback from a DataLoader worker."""
        if len(self):
            self[0]

    def image_file(self, row: int) -> Optional[str]:
        """The file the row's image comes from (a sharded table names its tar member); None for bytes only."""
        return self.image_names.image_name(row)

    def row_files(self, row: int) -> tuple:
        """The files the row reads (for trainer.bad_rows: a report entry names one of them)."""
        return (self.image_file(row),)

    def row_problem(self, row: int) -> Optional[dict]:
        """Why the row cannot be read now ({"reason", "file", "detail"} for bad_rows.json), or None if it can."""
        try:
            decoded_row(self.table, row, self.image_column)
        except ImageRejected as err:
            return {"reason": err.reason, "file": self.image_file(row), "detail": err.detail}
        return None


def set_epoch(dataloader, epoch: int) -> None:
    """Start epoch in the prepared DataLoader's sampler and in its dataset (fresh crops, flips and captions).

    accelerate's DataLoaderShard.set_epoch reaches the dataset only when no sampler took the epoch, which under
    2+ processes never happens: without the second call every epoch would repeat epoch 0's augmentations there.
    """
    dataloader.set_epoch(epoch)
    dataset = getattr(dataloader, "dataset", None)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def collate(examples: Sequence[dict]) -> dict:
    """Stack transformed rows (and their metadata vectors, when they have them) into a batch."""
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(memory_format=torch.contiguous_format),
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
    }
    if "metadata" in examples[0]:
        batch["metadata"] = torch.stack([e["metadata"] for e in examples])
    return batch


def read_metadata(args, table):
    """The rows' parsed metadata for --metadata_fields (one line saying what they hold), or None without it."""
    from trainer.metadata import describe, parse_fields, read_column

    fields = parse_fields(args.metadata_fields)
    if not fields:
        return None
    column = check_column("--metadata_column", args.metadata_column, table.column_names)
    rows = read_column(table, column, fields, args.metadata_frequencies)
    get_logger().info("%s", describe(rows))
    return rows


def build_train_dataset(args, tokenizer, seed: int) -> TrainingDataset:
    """make_train_dataset's dataset, with a readable row found before any DataLoader worker starts."""
    dataset = make_train_dataset(args, tokenizer, seed)
    dataset.check_readable()
    return dataset


def make_train_dataset(args, tokenizer, seed: int) -> TrainingDataset:
    """Load, check and subsample the table; wrap it with the training transform."""
    raw = load_raw_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir)
    image_column = check_column("--image_column", args.image_column, raw.column_names)
    caption_column = check_column("--caption_column", args.caption_column, raw.column_names)
    transform = make_image_transform(args.resolution, args.center_crop, args.random_flip,
                                     args.image_interpolation_mode)
    # The data seed, not --seed: every process must keep the same rows even when --seed is not given.
    subset = subsample(raw, args.max_train_samples, seed)
    from trainer.metadata import GuidanceDropout

    dropout = GuidanceDropout(args.metadata_dropout, args.metadata_drop_all, args.proportion_empty_prompts)
    folder = Path(args.train_data_dir).expanduser() if args.dataset_name is None else None
    return TrainingDataset(subset, tokenizer, transform, image_column, caption_column, seed,
                           read_metadata(args, subset), dropout, folder)


# Enough to keep one GPU fed from JPEGs at 512 px; more workers mostly cost memory (each holds a dataset copy).
MAX_DEFAULT_WORKERS = 8


def default_num_workers(cpu_count: int, num_processes: int) -> int:
    """Workers per training process: its share of the cores minus one for the process itself, capped."""
    return max(0, min(MAX_DEFAULT_WORKERS, cpu_count // max(1, num_processes) - 1))


def resolve_num_workers(requested: Optional[int], num_processes: int) -> int:
    """--dataloader_num_workers when given, else the default for this machine's usable cores."""
    if requested is not None:
        return requested
    return default_num_workers(len(os.sched_getaffinity(0)), num_processes)


def cpu_threads(cpu_count: int, num_processes: int, num_workers: int) -> int:
    """Intra-op threads of a training process on the CPU: its share of the cores less its DataLoader workers, >= 1."""
    return max(1, cpu_count // max(1, num_processes) - num_workers)


def limit_cpu_threads(device_type: str, num_processes: int, num_workers: int, environ) -> Optional[int]:
    """On the CPU, unless OMP_NUM_THREADS is set, size torch's intra-op pool to the cores the DataLoader workers
    leave; return the count set (None when left alone).

    torch starts one thread per core; with the workers (or other programs) on those cores its OpenMP barriers wait
    for descheduled threads, and a tiny model on 2 busy cores ran 7x slower (its cache build 50x)."""
    if device_type != "cpu" or environ.get("OMP_NUM_THREADS"):
        return None
    threads = cpu_threads(len(os.sched_getaffinity(0)), num_processes, num_workers)
    torch.set_num_threads(threads)
    get_logger().info("CPU: %d intra-op thread(s) beside %d DataLoader worker(s) (OMP_NUM_THREADS overrides)",
                      threads, num_workers)
    return threads


def build_dataloader(dataset, batch_size: int, num_workers: int, seed: int,
                     collate_fn: Callable = collate) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader; persistent, prefetching workers, pinned memory on CUDA.

    Its own generator keeps worker seeding off the global RNG that training uses. Workers persist across
    epochs: the datasets read the epoch from shared memory (SharedEpoch), so augmentations still change.
    """
    extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
    sampler = group_sampler(dataset, seed)  # rows of a sharded folder: a few shards at a time
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                       collate_fn=collate_fn, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(seed), **extra)
