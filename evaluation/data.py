"""Held-out pairs for evaluation: captions and real images from a metadata.jsonl folder, a Parquet split, or any
source create.py reads (Karpathy/NWPU JSON at a split, CSV/JSONL index, webdataset shards).

Each row keeps its 1-based number in the source, which names its generated image and fixes its seed, so the same
row gets the same file and the same pixels in every run. A row that cannot be used (no caption at the chosen index,
a missing or undecodable image) is kept as a BadRow with its reason for the report, never dropped silently.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from PIL import Image

from diffusion_model.captions import select_captions
from diffusion_model.image_errors import ImageRejected
from diffusion_model.imaging import decode_rgb, resize
from diffusion_model.metadata import unsafe_name_reason
from diffusion_model.parquet_source import inspect_sources, iter_rows, resolve_parquet_paths
from diffusion_model.sources import SourceOptions, open_source
from utils.cli import UsageError
from utils.constants import METADATA_FILENAME
from utils.logger import get_logger

PARQUET_BATCH_ROWS = 64
# Real images as large as create.py accepts by default; larger headers are refused before decoding.
MAX_PIXELS = 8192 * 8192
REASON_NO_CAPTION = "no_caption_at_index"
REASON_MISSING_IMAGE = "missing_image"
REASON_BAD_LINE = "bad_metadata_line"


@dataclass(frozen=True)
class EvalRow:
    """One held-out pair: source row number (1-based), the caption used, and the real image (bytes or a file)."""

    number: int
    caption: str
    image: Union[bytes, Path, None]


@dataclass(frozen=True)
class BadRow:
    """A source row left out of the figures, with a short reason and a detail for the report."""

    number: int
    reason: str
    detail: str = ""


def usable_captions(raw) -> list:
    """A cell's captions as create.py keeps them: cleaned, junk (RSICD's " .") and near-duplicates dropped."""
    return select_captions(raw, "all")


def split_rows(raw_rows: Iterable[Tuple[int, object, object]], caption_index: int) -> Tuple[list, list, int]:
    """Turn (number, captions cell, image) triples into EvalRows and BadRows; also return the most captions seen."""
    rows, bad, most = [], [], 0
    for number, raw, image in raw_rows:
        captions = usable_captions(raw)
        most = max(most, len(captions))
        if caption_index >= len(captions):
            bad.append(BadRow(number, REASON_NO_CAPTION, f"{len(captions)} usable caption(s), index {caption_index}"))
        else:
            rows.append(EvalRow(number, captions[caption_index], image))
    return rows, bad, most


def metadata_triples(data_dir: Path, limit: Optional[int]) -> Tuple[list, list]:
    """Read DATA_DIR/metadata.jsonl into (line number, text, image path) triples; broken lines become BadRows."""
    metadata = data_dir / METADATA_FILENAME
    if not metadata.is_file():
        raise UsageError(f"--data_dir {data_dir} has no {METADATA_FILENAME} (give the folder format.py wrote it to)")
    triples, bad = [], []
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
            triples.append((number, record.get("text"), data_dir / name))
    return triples, bad


def parquet_triples(spec: str, limit: Optional[int]) -> Tuple[list, list]:
    """Read a Parquet file or folder of shards (RSICD or image+text schema) into (row, captions, bytes) triples."""
    paths = resolve_parquet_paths([spec])
    columns, _total = inspect_sources(paths)
    rows = iter_rows(paths, columns, PARQUET_BATCH_ROWS, limit)
    return [(row.number, row.captions, row.image) for row in rows], []


def source_triples(spec: str, options: SourceOptions, limit: Optional[int]) -> Tuple[list, list]:
    """Read any create.py source; a row its reader already failed (missing file, unsafe name) is a BadRow."""
    triples, bad = [], []
    source = open_source([spec], options)
    get_logger().info("held-out rows from %s (%s)", spec, source.label())
    for row in source.rows(limit):
        if row.failure:
            bad.append(BadRow(row.number, *row.failure))
        else:
            triples.append((row.number, row.captions, row.image))
    return triples, bad


def load_rows(data_dir: Optional[str], parquet_path: Optional[str], caption_index: int,
              limit: Optional[int], source: Optional[str] = None,
              options: Optional[SourceOptions] = None) -> Tuple[List[EvalRow], List[BadRow], int]:
    """The first `limit` rows of the source as EvalRows and BadRows, plus the number of rows read."""
    if source is not None:
        triples, bad = source_triples(source, options or SourceOptions(default_split="test"), limit)
    elif data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise UsageError(f"--data_dir {data_dir} is not a folder")
        triples, bad = metadata_triples(folder, limit)
    else:
        triples, bad = parquet_triples(parquet_path, limit)
    rows, no_caption, most = split_rows(triples, caption_index)
    if triples and not rows and caption_index >= most:
        raise UsageError(f"--caption_index {caption_index} is out of range: rows have at most {most} caption(s)")
    read = len(triples) + len(bad)
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
