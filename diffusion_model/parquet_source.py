"""Stream rows out of one or more Parquet files: resolve shards, detect columns, yield numbered rows.

Rows are numbered from 1 across all files in sorted path order, so a row number names the same row in every
run. Reading goes by record batches, so memory depends on the batch size, never on the file size.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from utils.cli import UsageError
from utils.constants import PARQUET_EXTENSION

IMAGE_CANDIDATES = ("image", "img", "jpg", "png")
CAPTION_CANDIDATES = ("captions", "caption", "text", "sentences")
FILENAME_CANDIDATES = ("filename", "file_name")
# Buffered reads keep pyarrow from pulling a whole column chunk of large images into memory at once.
READ_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class Columns:
    """Which columns hold the image, the captions and (optionally) the source file name."""

    image: str
    caption: str
    filename: Optional[str]
    image_is_struct: bool


class Row(NamedTuple):
    """One input row: 1-based number across all files, source filename (or None), image bytes, raw captions.

    failure is (reason, detail) when the reader already knows the row is bad (say, its image file is missing).
    label is the cell of a column the reader was asked for besides these (evaluate.py's --class_column), else None.
    metadata is {field: raw value} of the row's metadata (create.py's --metadata_columns or sidecars), else None.
    conditioning is the bytes of the row's conditioning image (create.py's --conditioning_column or _dir), else None.
    """

    number: int
    filename: Optional[str]
    image: Optional[bytes]
    captions: object
    failure: Optional[tuple] = None
    label: object = None
    metadata: Optional[dict] = None
    conditioning: Optional[bytes] = None


def resolve_parquet_paths(specs: Sequence[str]) -> list:
    """Expand files and folders of shards into one sorted, de-duplicated list of Parquet files."""
    found = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            shards = [p for p in path.rglob(f"*{PARQUET_EXTENSION}") if p.is_file()]
            if not shards:
                raise UsageError(f"--parquet_path folder {spec} holds no {PARQUET_EXTENSION} files")
            found.update(p.resolve() for p in shards)
        elif path.is_file():
            found.add(path.resolve())
        else:
            raise UsageError(f"--parquet_path {spec} does not exist")
    return sorted(found, key=str)


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a Parquet file for streaming; an unreadable one is a usage error naming it."""
    try:
        return pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
    except (OSError, pa.ArrowException) as err:
        raise UsageError(f"cannot read Parquet file {path}: {err}") from None


def is_binary(data_type: pa.DataType) -> bool:
    """True for binary and large_binary."""
    return pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)


def is_string(data_type: pa.DataType) -> bool:
    """True for string and large_string."""
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def is_caption_type(data_type: pa.DataType) -> bool:
    """A caption column is a string or a list of strings."""
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return is_string(data_type.value_type)
    return is_string(data_type)


def image_is_struct(name: str, data_type: pa.DataType, path: Path) -> bool:
    """Check an image column's type: binary, or a struct with binary 'bytes' (the HF Image feature)."""
    if is_binary(data_type):
        return False
    if pa.types.is_struct(data_type) and data_type.get_field_index("bytes") >= 0:
        if is_binary(data_type.field("bytes").type):
            return True
    raise UsageError(f"image column {name!r} in {path} has type {data_type}; expected binary or struct<bytes, path>")


def pick_column(schema: pa.Schema, chosen: Optional[str], candidates: Sequence[str], flag: str, path: Path) -> str:
    """Return the chosen column if present, else the first candidate present; a usage error otherwise."""
    names = schema.names
    if chosen is not None:
        if chosen not in names:
            raise UsageError(f"{flag} {chosen!r} is not a column of {path} (columns: {', '.join(names)})")
        return chosen
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise UsageError(f"no {flag.lstrip('-').replace('_', ' ')} found in {path} (columns: {', '.join(names)}); name it with {flag}")


def detect_columns(schema: pa.Schema, path: Path, image_column=None, caption_column=None) -> Columns:
    """Find the image, caption and filename columns (RSICD or image+text schema), honouring overrides."""
    image = pick_column(schema, image_column, IMAGE_CANDIDATES, "--image_column", path)
    caption = pick_column(schema, caption_column, CAPTION_CANDIDATES, "--caption_column", path)
    if not is_caption_type(schema.field(caption).type):
        raise UsageError(f"caption column {caption!r} in {path} has type {schema.field(caption).type}; expected string or list<string>")
    filename = next((n for n in FILENAME_CANDIDATES if n in schema.names and is_string(schema.field(n).type)), None)
    return Columns(image, caption, filename, image_is_struct(image, schema.field(image).type, path))


def inspect_sources(paths: Sequence[Path], image_column=None, caption_column=None) -> tuple:
    """Validate every file up front; return the columns (from the first file, required in all) and total rows."""
    columns, total = None, 0
    for path in paths:
        parquet = open_parquet(path)
        found = detect_columns(
            parquet.schema_arrow,
            path,
            image_column or (columns and columns.image),
            caption_column or (columns and columns.caption),
        )
        columns = columns or found
        total += parquet.metadata.num_rows
        parquet.close()
    return columns, total


def check_label_column(paths: Sequence[Path], column: str, flag: str) -> None:
    """A usage error naming the flag when a file lacks the column the user named."""
    for path in paths:
        parquet = open_parquet(path)
        names = parquet.schema_arrow.names
        parquet.close()
        if column not in names:
            raise UsageError(f"{flag} {column!r} is not a column of {path} (columns: {', '.join(names)})")


def check_metadata_columns(paths: Sequence[Path], mapping: Optional[dict]) -> None:
    """A usage error naming the first --metadata_columns column a file lacks."""
    for path in paths if mapping else ():
        parquet = open_parquet(path)
        names = parquet.schema_arrow.names
        parquet.close()
        for field, column in mapping.items():
            if column not in names:
                raise UsageError(f"--metadata_columns {field}={column}: {column!r} is not a column of {path} "
                                 f"(columns: {', '.join(names)})")


def check_conditioning_column(paths: Sequence[Path], column: Optional[str]) -> None:
    """A usage error when a file lacks --conditioning_column or its type holds no image (bytes, {bytes, path} or a
    path string)."""
    for path in paths if column else ():
        parquet = open_parquet(path)
        schema = parquet.schema_arrow
        parquet.close()
        if column not in schema.names:
            raise UsageError(f"--conditioning_column {column!r} is not a column of {path} "
                             f"(columns: {', '.join(schema.names)})")
        data_type = schema.field(column).type
        struct = pa.types.is_struct(data_type) and data_type.get_field_index("bytes") >= 0
        if not (is_binary(data_type) or is_string(data_type) or struct):
            raise UsageError(f"--conditioning_column {column!r} in {path} has type {data_type}; expected binary, "
                             "struct<bytes, path> or a path string")


def metadata_cells(batch: pa.RecordBatch, mapping: Optional[dict]) -> list:
    """Per row, {field: cell} of the mapped metadata columns (None per row without a mapping)."""
    if not mapping:
        return [None] * batch.num_rows
    cells = {field: batch.column(column).to_pylist() for field, column in mapping.items()}
    return [{field: values[i] for field, values in cells.items()} for i in range(batch.num_rows)]


def batch_rows(batch: pa.RecordBatch, columns: Columns, first_number: int, label_column: Optional[str] = None,
               metadata_columns: Optional[dict] = None, conditioning_column: Optional[str] = None) -> list:
    """Turn one record batch into Rows numbered from first_number (with label_column's cells as labels, the
    metadata columns' cells as raw metadata and conditioning_column's raw cells as conditioning)."""
    images = batch.column(columns.image).to_pylist()
    if columns.image_is_struct:
        images = [cell["bytes"] if cell else None for cell in images]
    captions = batch.column(columns.caption).to_pylist()
    names = batch.column(columns.filename).to_pylist() if columns.filename else [None] * batch.num_rows
    labels = batch.column(label_column).to_pylist() if label_column else [None] * batch.num_rows
    metadata = metadata_cells(batch, metadata_columns)
    conditioning = batch.column(conditioning_column).to_pylist() if conditioning_column else [None] * batch.num_rows
    return [Row(first_number + i, names[i], images[i], captions[i], label=labels[i], metadata=metadata[i],
                conditioning=conditioning[i]) for i in range(batch.num_rows)]


def iter_rows(paths: Sequence[Path], columns: Columns, batch_size: int, limit: Optional[int] = None,
              label_column: Optional[str] = None, metadata_columns: Optional[dict] = None,
              conditioning_column: Optional[str] = None) -> Iterator[Row]:
    """Yield rows across all files in order, numbered from 1, stopping after limit rows; label_column (checked by
    check_label_column) and the metadata columns (by check_metadata_columns) are read beside the image, caption
    and file name, and conditioning_column's raw cells (checked by check_conditioning_column)."""
    extra = (label_column, *(metadata_columns or {}).values(), conditioning_column)
    wanted = list(dict.fromkeys(c for c in (columns.image, columns.caption, columns.filename, *extra) if c))
    number = 1
    for path in paths:
        parquet = open_parquet(path)
        try:
            # Single-threaded decoding: the worker processes own the cores, the reader should not compete with them.
            for batch in parquet.iter_batches(batch_size=batch_size, columns=wanted, use_threads=False):
                for row in batch_rows(batch, columns, number, label_column, metadata_columns, conditioning_column):
                    if limit is not None and row.number > limit:
                        return
                    yield row
                number += batch.num_rows
        except (OSError, pa.ArrowException) as err:
            raise UsageError(f"cannot read Parquet file {path}: {err}") from None
        finally:
            parquet.close()
