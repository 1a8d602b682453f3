"""Where a row's conditioning image comes from: a column or member of the source (--conditioning_column), or a
folder of files matched to the images by file stem (--conditioning_dir, LoveDA's images_png/ + masks_png/).

The readers hand each Row its conditioning bytes; a row whose conditioning is missing, unsafe or unreadable fails
with a `conditioning_...` reason, like a row whose image is.
"""

from pathlib import Path
from typing import Iterator, Optional

from diffusion_model.parquet_source import Row
from diffusion_model.sources.base import REASON_MISSING_IMAGE, REASON_UNREADABLE, REASON_UNSAFE_PATH, ImageFolder
from utils.cli import UsageError

PREFIX = "conditioning_"
DIR_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
REASON_AMBIGUOUS = "conditioning_ambiguous"
NAME_PATTERN = (lambda entry: entry.get("name"),)


def marked(failure: tuple) -> tuple:
    """A reader failure (reason, detail) as the conditioning's."""
    return PREFIX + failure[0], failure[1]


def missing(detail: str) -> tuple:
    """The failure of a row without conditioning."""
    return PREFIX + REASON_MISSING_IMAGE, detail


def read_cell(cell, folder: Optional[ImageFolder]) -> tuple:
    """(bytes, None) of a conditioning cell (bytes, an {bytes, path} struct, or a path in folder), else
    (None, failure)."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return (bytes(cell), None) if cell else (None, missing("empty conditioning bytes"))
    if not isinstance(cell, str) or not cell.strip():
        return None, missing("no conditioning in the row")
    if folder is None:
        return None, missing(f"{cell!r}: a path, but the source has no folder to find it in")
    data, failure = ImageFolder(folder.root, folder.base, NAME_PATTERN).read({"name": cell.strip()})
    return (data, None) if failure is None else (None, marked(failure))


def with_conditioning(row: Row, data: Optional[bytes], failure: Optional[tuple]) -> Row:
    """The row with its conditioning bytes, or failed by the conditioning (a row failed already keeps its reason)."""
    if row.failure:
        return row._replace(conditioning=None)
    return row._replace(failure=failure, conditioning=None) if failure else row._replace(conditioning=data)


def resolve_cells(rows: Iterator[Row], folder: Optional[ImageFolder]) -> Iterator[Row]:
    """Rows whose conditioning field holds a raw cell, with it read (see read_cell)."""
    for row in rows:
        yield with_conditioning(row, *read_cell(row.conditioning, folder)) if not row.failure else row


def name_stem(filename: Optional[str]) -> Optional[str]:
    """The file stem of a row's source name: an index's path, a webdataset `shard.tar:dir/key`, a Parquet name."""
    if not filename:
        return None
    base = filename.rpartition(":")[2].replace("\\", "/").rpartition("/")[2]
    return Path(base).stem if "." in base else base


class ConditioningDir:
    """A folder of conditioning files (any depth), found by the stem of each row's image name."""

    def __init__(self, root: Path):
        """Index the folder's files by stem; a usage error when it is not a folder or holds none."""
        if not root.is_dir():
            raise UsageError(f"--conditioning_dir {root} is not a folder")
        self.root, self.by_stem = root.resolve(), {}
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in DIR_SUFFIXES and path.is_file() and not path.name.startswith("."):
                self.by_stem.setdefault(path.stem, []).append(path)
        if not self.by_stem:
            raise UsageError(f"--conditioning_dir {root} holds no {', '.join(DIR_SUFFIXES)} file")

    def read(self, filename: Optional[str]) -> tuple:
        """(bytes, None) of the file named like the row's image, else (None, failure)."""
        stem = name_stem(filename)
        if stem is None:
            return None, missing("the row has no file name to look up in --conditioning_dir")
        found = self.by_stem.get(stem, [])
        if len(found) != 1:
            if found:
                names = ", ".join(p.relative_to(self.root).as_posix() for p in found)
                return None, (REASON_AMBIGUOUS, f"stem {stem!r} matches {names}")
            return None, missing(f"no {stem}{{{','.join(DIR_SUFFIXES)}}} in {self.root}")
        path = found[0]
        if not path.resolve().is_relative_to(self.root):
            return None, (PREFIX + REASON_UNSAFE_PATH, f"{path.name} resolves outside {self.root}")
        try:
            return path.read_bytes(), None
        except OSError as err:
            return None, (PREFIX + REASON_UNREADABLE, f"{path.name}: {err.strerror or err}")

    def attach(self, rows: Iterator[Row]) -> Iterator[Row]:
        """Each row with its conditioning file's bytes (or failed by it)."""
        for row in rows:
            yield with_conditioning(row, *self.read(row.filename)) if not row.failure else row
