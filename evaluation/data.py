"""Held-out pairs for evaluation: captions and real images from a metadata.jsonl folder, a sharded folder (create.py
--output_format webdataset, read through its index), a Parquet split, or any source create.py reads (Karpathy/NWPU
JSON at a split, CSV/JSONL index, webdataset shards).

Each row keeps its 1-based number in the source, which names its generated image and fixes its seed, so the same
row gets the same file and the same pixels in every run, and its scene class, read with it by the same reader (the
file name's prefix, or the --class_column cell). A row that cannot be used (no caption at the chosen index, a
missing or undecodable image) is kept as a BadRow with its reason for the report, never dropped silently.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, NamedTuple, Optional, Tuple, Union

from PIL import Image

from diffusion_model.captions import select_captions
from diffusion_model.create_job import image_number
from utils.image_errors import ImageRejected
from diffusion_model.imaging import decode_rgb, resize
from diffusion_model.metadata import unsafe_name_reason
from diffusion_model.parquet_source import inspect_sources, iter_rows, resolve_parquet_paths
from diffusion_model.parquet_source import check_label_column
from utils.shard_index import is_shards_dir, read_member, shard_files
from diffusion_model.sources import SourceOptions, open_source
from evaluation.scene import class_from_filename, class_from_value
from utils.cli import UsageError
from utils.constants import CONDITIONING_KEY, METADATA_FILENAME, METADATA_KEY, SHARDS_INDEX_FILENAME, SOURCE_FILE_KEY
from utils.logger import get_logger

PARQUET_BATCH_ROWS = 64
# Real images as large as create.py accepts by default; larger headers are refused before decoding.
MAX_PIXELS = 8192 * 8192
REASON_NO_CAPTION = "no_caption_at_index"
REASON_MISSING_IMAGE = "missing_image"
REASON_BAD_LINE = "bad_metadata_line"


@dataclass(frozen=True)
class EvalRow:
    """One held-out pair: source row number (1-based), the caption used, the real image (bytes or a file), and the
    row's scene class, or why it has none (a key of evaluation.scene.NO_CLASS_WHY)."""

    number: int
    caption: str
    image: Union[bytes, Path, None]
    scene: Optional[str] = None
    no_class: Optional[str] = None
    conditioning: Optional[Path] = None  # a create.py folder's conditioning file (metadata.jsonl conditioning_image)
    metadata: Optional[dict] = None  # a metadata.jsonl line's "metadata" (gsd, lat, ...), None elsewhere


class RawRow(NamedTuple):
    """A source row as read, before a caption is chosen: number, captions cell, image, class or why none, the
    conditioning file a create.py folder names for it, and its metadata (a create.py folder's metadata.jsonl or shard
    index only)."""

    number: int
    captions: object
    image: Union[bytes, Path, None]
    scene: Optional[str]
    no_class: Optional[str]
    conditioning: Optional[Path] = None
    metadata: Optional[dict] = None


@dataclass(frozen=True)
class BadRow:
    """A source row left out of the figures, with a short reason and a detail for the report."""

    number: int
    reason: str
    detail: str = ""


def usable_captions(raw) -> list:
    """A cell's captions as create.py keeps them: cleaned, junk (RSICD's " .") and near-duplicates dropped."""
    return select_captions(raw, "all")


def row_class(name: Optional[str], label, class_column: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(scene class, None), or (None, why it has none): the --class_column cell when one is named, else the file
    name's prefix; create.py's own image_NNNNNN names carry none."""
    if class_column:
        scene = class_from_value(label)
        return (scene, None) if scene else (None, "empty_cell")
    if not name:
        return None, "no_name"
    if image_number(str(name).replace("\\", "/")) is not None:
        return None, "create_name"
    scene = class_from_filename(name)
    return (scene, None) if scene else (None, "no_prefix")


def split_rows(raw_rows: Iterable[RawRow], caption_index: int) -> Tuple[list, list, int]:
    """Turn RawRows into EvalRows and BadRows; also return the most captions seen."""
    rows, bad, most = [], [], 0
    for raw in raw_rows:
        captions = usable_captions(raw.captions)
        most = max(most, len(captions))
        if caption_index >= len(captions):
            bad.append(BadRow(raw.number, REASON_NO_CAPTION,
                              f"{len(captions)} usable caption(s), index {caption_index}"))
        else:
            rows.append(EvalRow(raw.number, captions[caption_index], raw.image, raw.scene, raw.no_class,
                                raw.conditioning,
                                raw.metadata))
    return rows, bad, most


def metadata_raw_rows(data_dir: Path, limit: Optional[int], class_column: Optional[str] = None) -> Tuple[list, list]:
    """Read DATA_DIR/metadata.jsonl into RawRows (image paths); broken lines become BadRows."""
    metadata = data_dir / METADATA_FILENAME
    if not metadata.is_file():
        raise UsageError(f"--data_dir {data_dir} has no {METADATA_FILENAME} (give the folder format.py wrote it to)")
    raw_rows, bad, has_column = [], [], False
    with open(metadata, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and number > limit:
                break
            try:
                record = json.loads(line)
                name = record["file_name"]
                reason = unsafe_name_reason(name)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                bad.append(BadRow(number, REASON_BAD_LINE, f"{type(err).__name__}: {err}"))
                continue
            if reason:
                bad.append(BadRow(number, REASON_BAD_LINE, f"file_name {name!r}: {reason}"))
                continue
            has_column = has_column or class_column in record
            # format.py's source_file is the image's name before create.py renamed it (null: the source had none)
            source_name = record[SOURCE_FILE_KEY] if SOURCE_FILE_KEY in record else name
            conditioning = record.get(CONDITIONING_KEY)
            raw_rows.append(RawRow(number, record.get("text"), data_dir / name,
                                   *row_class(source_name, record.get(class_column), class_column),
                                   data_dir / conditioning if isinstance(conditioning, str)
                                   and not unsafe_name_reason(conditioning) else None,
                                   record.get(METADATA_KEY)))
    if class_column and raw_rows and not has_column:
        raise UsageError(f"--class_column {class_column!r} is a key of no line of {metadata}")
    return raw_rows, bad


def shard_raw_rows(folder: Path, limit: Optional[int], class_column: Optional[str] = None) -> Tuple[list, list]:
    """The first rows of a sharded folder (create.py --output_format webdataset) as RawRows: captions, source file and
    metadata from its index, image bytes read by offset from the tars; --class_column names an index column."""
    import pyarrow.parquet as pq

    index = pq.ParquetFile(str(folder / SHARDS_INDEX_FILENAME))
    if class_column and class_column not in index.schema_arrow.names:
        raise UsageError(f"--class_column {class_column!r} is not a column of {folder / SHARDS_INDEX_FILENAME} "
                         f"(columns: {', '.join(index.schema_arrow.names)})")
    raw_rows, handles = [], {}
    try:
        for batch in index.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist()[: None if limit is None else limit - len(raw_rows)]:
                tar = shard_files(folder, record["shard"])[0]
                handle = handles.get(tar) or handles.setdefault(tar, open(tar, "rb"))
                image = read_member(handle, record["image_offset"], record["image_size"])
                label = record.get(class_column) if class_column else None
                metadata = json.loads(record["metadata"]) if record.get("metadata") else None
                raw_rows.append(RawRow(record["row"], record["text"], image,
                                       *row_class(record["source_file"], label, class_column), None, metadata))
            if limit is not None and len(raw_rows) >= limit:
                break
    finally:
        for handle in handles.values():
            handle.close()
    return raw_rows, []


def parquet_raw_rows(spec: str, limit: Optional[int], class_column: Optional[str] = None) -> Tuple[list, list]:
    """Read a Parquet file or folder of shards (RSICD or image+text schema) into RawRows (image bytes)."""
    paths = resolve_parquet_paths([spec])
    columns, _total = inspect_sources(paths)
    if class_column:
        check_label_column(paths, class_column, "--class_column")
    rows = iter_rows(paths, columns, PARQUET_BATCH_ROWS, limit, class_column)
    return [raw_row(row, class_column) for row in rows], []


def raw_row(row, class_column: Optional[str]) -> RawRow:
    """A reader's Row (diffusion_model.parquet_source.Row) as a RawRow, its class from the label or the name."""
    return RawRow(row.number, row.captions, row.image, *row_class(row.filename, row.label, class_column))


def source_raw_rows(spec: str, options: SourceOptions, limit: Optional[int]) -> Tuple[list, list]:
    """Read any create.py source; a row its reader already failed (missing file, unsafe name) is a BadRow."""
    raw_rows, bad = [], []
    source = open_source([spec], options)
    get_logger().info("held-out rows from %s (%s)", spec, source.label())
    for row in source.rows(limit):
        if row.failure:
            bad.append(BadRow(row.number, *row.failure))
        else:
            raw_rows.append(raw_row(row, options.class_column))
    return raw_rows, bad


def load_rows(data_dir: Optional[str], parquet_path: Optional[str], caption_index: int,
              limit: Optional[int], source: Optional[str] = None, options: Optional[SourceOptions] = None,
              class_column: Optional[str] = None) -> Tuple[List[EvalRow], List[BadRow], int]:
    """The first `limit` rows of the source as EvalRows (each with its class: class_column's cell, else the file
    name's prefix) and BadRows, plus the number of rows read."""
    if source is not None:
        options = dataclasses.replace(options or SourceOptions(default_split="test"), class_column=class_column)
        raw_rows, bad = source_raw_rows(source, options, limit)
    elif data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UsageError(f"--data_dir {data_dir} is not a folder")
        read = shard_raw_rows if is_shards_dir(folder) else metadata_raw_rows
        raw_rows, bad = read(folder, limit, class_column)
    else:
        raw_rows, bad = parquet_raw_rows(parquet_path, limit, class_column)
    rows, no_caption, most = split_rows(raw_rows, caption_index)
    if raw_rows and not rows and caption_index >= most:
        raise UsageError(f"--caption_index {caption_index} is out of range: rows have at most {most} caption(s)")
    read = len(raw_rows) + len(bad)
    if read == 0:
        raise UsageError(f"{data_dir or parquet_path or source} holds no rows")
    return rows, sorted(bad + no_caption, key=lambda b: b.number), read


def real_image(row: EvalRow, resolution: int) -> Image.Image:
    """Decode a row's real image to 8-bit RGB, centre-cropped and resized to resolution; ImageRejected if unusable."""
    if isinstance(row.image, Path):
        if not row.image.is_file():
            raise ImageRejected(REASON_MISSING_IMAGE, str(row.image))
        data = row.image.read_bytes()
    else:
        data = row.image
    # The decode create.py uses, so held-out GeoTIFFs get the same default bands and stretch as training ones.
    return resize(decode_rgb(data, MAX_PIXELS), resolution, "center_crop")
