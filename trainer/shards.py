"""Training from a sharded folder (create.py --output_format webdataset) given as --train_data_dir.

Nothing is listed, unpacked or decoded at start: the table reads three numeric columns of the Parquet index (each
row's shard and its image's byte offset and size, 20 bytes a row) and opens the tars lazily in each process and
DataLoader worker. A row is read by seeking to its image and then reading the two members create.py writes after
it (KEY.txt, KEY.json), so captions and metadata are not held in memory either. The table answers what the
trainer asks of a 🤗 datasets table (length, columns, rows, shuffle/select, Arrow columns for the latent cache and
the metadata), so the equal batches per process, exact resume and --cache_latents are the same as for an image
folder. Its sampler (ShardGroupSampler) shuffles a few shards' rows at a time, so reads stay within few tars.
"""

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from utils.shard_index import read_json, read_member, shard_stem
from utils.cli import UsageError
from utils.constants import SHARDS_DIRNAME, SHARDS_INDEX_FILENAME, SHARDS_STATS_FILENAME

IMAGE_COLUMN = "image"
# Index columns a row does not show: where its bytes are.
PLACEMENT_COLUMNS = ("shard", "image_offset", "image_size")
MAX_OPEN_SHARDS = 16  # tar handles kept per process; the least recently used is closed
TAR_BLOCK = 512


def index_columns(folder: Path) -> list:
    """The index's column names, from its Parquet schema alone."""
    import pyarrow.parquet as pq

    return pq.read_schema(str(Path(folder) / SHARDS_INDEX_FILENAME)).names


def next_member(handle, data_at: int, previous_size: int) -> bytes:
    """The data of the member that follows the one whose previous_size bytes of data start at data_at."""
    header_at = data_at + -(-previous_size // TAR_BLOCK) * TAR_BLOCK
    info = tarfile.TarInfo.frombuf(read_member(handle, header_at, TAR_BLOCK), "utf-8", "surrogateescape")
    return read_member(handle, header_at + TAR_BLOCK, info.size)


class ArrowColumns:
    """table.with_format("arrow"): whole columns of the index for the selected rows, in their order."""

    def __init__(self, table: "ShardTable"):
        """Columns of table's rows."""
        self.table = table

    def __getitem__(self, column: str):
        """The column as Arrow (metadata as parsed dicts, as the trainer's metadata reader takes them)."""
        import pyarrow.parquet as pq

        values = pq.read_table(str(self.table.folder / SHARDS_INDEX_FILENAME), columns=[column])[column]
        values = values.take(self.table.rows)
        return [json.loads(v) if v else None for v in values.to_pylist()] if column == "metadata" else values


class ShardTable:
    """The rows of a sharded folder, read by byte offset from its tars."""

    def __init__(self, folder, rows: Optional[np.ndarray] = None, placement: Optional[tuple] = None):
        """folder: a finished sharded folder; rows: the index rows this table shows, in order (default all)."""
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        if placement is None:
            index = pq.read_table(str(self.folder / SHARDS_INDEX_FILENAME), columns=list(PLACEMENT_COLUMNS))
            placement = tuple(index[c].to_numpy() for c in PLACEMENT_COLUMNS)
        self.placement = placement
        self.rows = np.arange(len(placement[0]), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self.column_names = [IMAGE_COLUMN] + [c for c in index_columns(self.folder) if c not in PLACEMENT_COLUMNS]
        self._handles, self._pid = OrderedDict(), None

    def __len__(self) -> int:
        """Rows shown."""
        return len(self.rows)

    def __getstate__(self) -> dict:
        """Pickled without open files (spawned workers reopen them)."""
        return {**self.__dict__, "_handles": OrderedDict(), "_pid": None}

    def _handle(self, shard: int):
        """An open handle on a shard's tar, opened on first use in this process."""
        if self._pid != os.getpid():  # a forked worker must not share its parent's file offsets
            self._handles, self._pid = OrderedDict(), os.getpid()
        if shard not in self._handles:
            self._handles[shard] = open(self.folder / SHARDS_DIRNAME / f"{shard_stem(shard)}.tar", "rb")
            if len(self._handles) > MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        self._handles.move_to_end(shard)
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict:
        """Row index: its image (PIL, undecoded until used), captions (a list), and its record's fields."""
        from PIL import Image

        row = int(self.rows[int(index)])
        shard, offset, size = (int(column[row]) for column in self.placement)
        handle = self._handle(shard)
        image = read_member(handle, offset, size)
        text = next_member(handle, offset, size)
        record = json.loads(next_member(handle, handle.tell() - len(text), len(text)))
        return {IMAGE_COLUMN: Image.open(io.BytesIO(image)), "text": text.decode("utf-8").splitlines(),
                "key": record["key"], "row": record["row"], "source_file": record.get("source_file"),
                "metadata": record.get("metadata")}

    def image_name(self, index: int) -> str:
        """Where row index's image lies, for reports: its tar and member name (read from the member's header)."""
        row = int(self.rows[int(index)])
        shard, offset = int(self.placement[0][row]), int(self.placement[1][row])
        header = read_member(self._handle(shard), offset - TAR_BLOCK, TAR_BLOCK)
        member = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
        return f"{SHARDS_DIRNAME}/{shard_stem(shard)}.tar:{member}"

    def select(self, indices: Sequence[int]) -> "ShardTable":
        """A table of the given rows of this one, in that order."""
        return ShardTable(self.folder, self.rows[np.asarray(list(indices), dtype=np.int64)], self.placement)

    def shuffle(self, seed: int) -> "ShardTable":
        """This table's rows in a seeded random order."""
        return self.select(np.random.default_rng(seed).permutation(len(self.rows)))

    def with_format(self, kind: str) -> ArrowColumns:
        """Column access as Arrow (the only format the trainer asks a table for)."""
        if kind != "arrow":
            raise ValueError(f"a sharded table has no {kind!r} format")
        return ArrowColumns(self)

    def fingerprint(self, image_column: str, caption_column: str) -> str:
        """sha256 of every shard's recorded sha256 (whose tars hold the images and captions) and the rows shown."""
        stats = read_json(self.folder / SHARDS_STATS_FILENAME) or {}
        digest = hashlib.sha256(json.dumps([image_column, caption_column]).encode())
        for shard in stats.get("per_shard", []):
            digest.update(str(shard.get("sha256")).encode())
        digest.update(self.rows.tobytes())
        return digest.hexdigest()


# Shards whose rows are shuffled together each epoch: reads stay within a few open tars at a time (a network
# filesystem reads a tar best front to back), while a group of 8 default shards mixes 80,000 rows, more than
# webdataset's usual shuffle buffer.
SHARDS_PER_GROUP = 8


class ShardGroupSampler:
    """Each epoch, the shards in a seeded random order, SHARDS_PER_GROUP at a time, each group's rows shuffled
    together; the order depends only on (seed, epoch), so every process draws the same one and a resume replays it."""

    def __init__(self, shard_of_rows: np.ndarray, seed: int, group: int = SHARDS_PER_GROUP):
        """shard_of_rows: the shard of each row the dataset shows, by dataset index."""
        self.by_shard = np.argsort(shard_of_rows, kind="stable")
        shards, starts = np.unique(shard_of_rows[self.by_shard], return_index=True)
        self.spans = list(zip(starts, list(starts[1:]) + [len(shard_of_rows)]))
        self.seed, self.group, self.epoch = seed, group, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's order next (accelerate's DataLoader calls it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Rows per epoch."""
        return len(self.by_shard)

    def __iter__(self):
        """Dataset indices, group by group."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.spans))
        for first in range(0, len(order), self.group):
            rows = np.concatenate([self.by_shard[slice(*self.spans[k])] for k in order[first:first + self.group]])
            yield from rng.permutation(rows).tolist()


def group_sampler(dataset, seed: int) -> Optional[ShardGroupSampler]:
    """The shard-grouped order for a dataset over a sharded table, None for any other (a plain shuffle)."""
    table = getattr(dataset, "table", None)
    return ShardGroupSampler(table.placement[0][table.rows], seed) if isinstance(table, ShardTable) else None


def check_shards_dir(data_dir: Path, image_column: str, caption_column: str) -> None:
    """A sharded --train_data_dir is finished (merged) and has the named columns; from the index's schema alone."""
    if not (data_dir / SHARDS_STATS_FILENAME).is_file():
        raise UsageError(f"--train_data_dir '{data_dir}' has a shard index but no {SHARDS_STATS_FILENAME}: its "
                         f"merge did not finish; run python diffusion_model/create.py --merge {data_dir}")
    columns = [IMAGE_COLUMN] + [c for c in index_columns(data_dir) if c not in PLACEMENT_COLUMNS]
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise UsageError(f"{flag} '{column}' is not a column of the sharded dataset {data_dir}; "
                             f"columns: {', '.join(columns)}.")
