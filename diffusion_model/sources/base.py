"""What every reader shares: the options it is opened with, the Source it returns, splits, and the image folder.

A reader turns one source form into numbered Rows (diffusion_model.parquet_source.Row); everything after the
reader (captions, imaging, the create job) is the same for every form. A row the reader already knows is bad
(missing file, unsafe name, broken entry) carries a failure reason instead of stopping the run.
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from diffusion_model.geo_metadata import SIDECAR_PROBLEM, sidecar_raw
from utils.image_errors import REASON_UNREADABLE
from diffusion_model.metadata import unsafe_name_reason
from diffusion_model.parquet_source import Row
from utils.cli import UsageError

FORMATS = ("auto", "parquet", "karpathy", "nwpu", "csv", "jsonl", "webdataset")
SPLITS = ("train", "val", "test", "all")
# The names releases use for each split; `val` is `valid` in RSICD's Parquet and `validation` elsewhere.
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"), "test": ("test", "testing")}

# Reasons a row fails before its image is decoded, as they appear in create_report.json.
REASON_MISSING_IMAGE = "missing_image"
REASON_UNSAFE_PATH = "unsafe_path"
REASON_BAD_ENTRY = "bad_entry"
REASON_NO_CAPTION = "no_caption"
# Entries looked at to find where an index's images live (the folder itself or one of its subfolders).
PROBE_ENTRIES = 32
# An image's fMoW-style metadata file beside it: <stem>.json (fMoW's X_rgb.jpg + X_rgb.json), else <stem>_rgb.json.
SIDECAR_SUFFIXES = (".json", "_rgb.json")


@dataclass(frozen=True)
class SourceOptions:
    """How to read a source: form, split, image folder and column names (None = detect)."""

    form: str = "auto"
    split: Optional[str] = None
    images_dir: Optional[str] = None
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    # create.py trains on `train` unless told otherwise; the evaluator reads `test`.
    default_split: str = "train"
    # evaluate.py's --class_column: read beside the captions into each Row's label (Parquet, CSV and JSONL only).
    class_column: Optional[str] = None
    # create.py's --metadata_columns ({field: column or sidecar key}) and --metadata_sidecars.
    metadata_columns: Optional[dict] = None
    metadata_sidecars: bool = False
    # create.py's --conditioning_column (a column, or a webdataset member extension) and --conditioning_dir.
    conditioning_column: Optional[str] = None
    conditioning_dir: Optional[str] = None


@dataclass
class Source:
    """An opened source: its form, files, the split read, its row count, and how to stream its rows."""

    form: str
    inputs: list
    rows_total: int
    read_rows: Callable[[Optional[int]], Iterator[Row]]
    split: Optional[str] = None
    split_names: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def rows(self, limit: Optional[int] = None) -> Iterator[Row]:
        """Rows numbered from 1 in a fixed order, at most limit of them."""
        return self.read_rows(limit)

    def label(self) -> str:
        """Short description for the summary line: form, split read, and the file's own split names if others."""
        if self.split is None:
            return self.form
        names = "" if self.split_names in ([], [self.split]) else f" (as {', '.join(map(repr, self.split_names))} in the file)"
        return f"{self.form}, split {self.split}{names}"

    def record(self) -> dict:
        """The source's identity, as kept in the output folder's settings and the report."""
        return {"format": self.form, "inputs": [str(p) for p in self.inputs], "split": self.split,
                "split_names": self.split_names, **self.details}


def split_matcher(wanted: str) -> Callable[[object], bool]:
    """A test for a file's split value: `all` takes every value, else the wanted split under any of its names."""
    if wanted == "all":
        return lambda value: True
    names = SPLIT_NAMES[wanted]
    return lambda value: isinstance(value, str) and value.strip().lower() in names


def seen_split_names(values: Iterable, wanted: str) -> list:
    """The distinct split values a file used for the wanted split, sorted (reported so a mapping is visible)."""
    match = split_matcher(wanted)
    return sorted({v.strip().lower() if isinstance(v, str) else str(v) for v in values if match(v)})


class ImageFolder:
    """Resolves an index's image names inside one folder, refusing any name that would lead out of it."""

    def __init__(self, root: Path, base: Path, patterns: Sequence[Callable[[dict], Optional[str]]]):
        """root: the folder names may not leave; base: where names resolve (root or a subfolder of it)."""
        self.root = root.resolve()
        self.base = base
        self.patterns = patterns

    def candidates(self, entry: dict) -> list:
        """Relative names this entry's image may have, most specific first."""
        return [name for name in (pattern(entry) for pattern in self.patterns) if name]

    def locate(self, entry: dict) -> tuple:
        """(path, None) of the entry's image, or (None, (reason, detail)) when it cannot be reached safely."""
        names = self.candidates(entry)
        if not names:
            return None, (REASON_BAD_ENTRY, "no file name")
        for name in names:
            unsafe = unsafe_name_reason(name)
            if unsafe:
                return None, (REASON_UNSAFE_PATH, f"{name!r}: {unsafe}")
        for name in names:
            path = self.base / name
            if not path.exists():
                continue
            if not path.resolve().is_relative_to(self.root):
                return None, (REASON_UNSAFE_PATH, f"{name!r} resolves outside {self.root}")
            return path, None
        return None, (REASON_MISSING_IMAGE, f"{names[0]} not found under {self.base}")

    def read(self, entry: dict) -> tuple:
        """(bytes, None) for the entry's image, or (None, (reason, detail)) when it cannot be read safely."""
        path, failure = self.locate(entry)
        if failure:
            return None, failure
        try:
            return path.read_bytes(), None
        except OSError as err:
            return None, (REASON_UNREADABLE, f"{path.relative_to(self.base)}: {err.strerror or err}")

    def sidecar(self, entry: dict) -> tuple:
        """(JSON object, None) beside the entry's image, or (None, (file looked for, why not)) when there is none."""
        path, failure = self.locate(entry)
        if failure:
            return None, ("", "no image")
        for suffix in SIDECAR_SUFFIXES:
            candidate = path.with_name(path.stem + suffix)
            if candidate.is_file() and candidate.resolve().is_relative_to(self.root):
                try:
                    document = json.loads(candidate.read_text(encoding="utf-8"))
                except (OSError, ValueError) as err:
                    return None, (candidate.name, f"unreadable: {err}")
                if isinstance(document, dict):
                    return document, None
                return None, (candidate.name, f"a {type(document).__name__}, not an object")
        return None, (path.stem + SIDECAR_SUFFIXES[0], "missing")


def open_image_folder(root: Path, entries: Sequence[dict], patterns: Sequence[Callable]) -> ImageFolder:
    """Find where the first entries' images live: root itself or one subfolder of it (RSICD_images/, imgs/)."""
    if not root.is_dir():
        raise UsageError(f"--images_dir {root} is not a folder")
    probe = [entry for entry in entries[:PROBE_ENTRIES] if not entry.get("failure")]
    bases = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    best, best_found = root, 0
    for base in bases:
        folder = ImageFolder(root, base, patterns)
        found = sum(any((base / n).is_file() for n in folder.candidates(e) if not unsafe_name_reason(n)) for e in probe)
        if found > best_found:
            best, best_found = base, found
    return ImageFolder(root, best, patterns)


def pick_split(items: Sequence, options: SourceOptions, path: Path) -> tuple:
    """Choose a JSON index's entries of the wanted split: (positions, split read or None, names seen, others' counts).

    A file whose entries carry no split field at all has no splits: every entry is read. In a file that has them,
    an entry without one (or not an object) cannot be placed, so it is kept in every split as a failed row.
    """
    if not any(isinstance(item, dict) and "split" in item for item in items):
        if options.split not in (None, "all"):
            raise UsageError(f"--split {options.split}: the entries of {path} carry no split")
        return list(range(len(items))), None, [], {}
    split = effective_split(options)
    match = split_matcher(split)
    placed = [isinstance(item, dict) and isinstance(item.get("split"), str) for item in items]
    positions = [n for n, item in enumerate(items) if not placed[n] or match(item["split"])]
    others = Counter(item["split"] for n, item in enumerate(items) if placed[n] and not match(item["split"]))
    if not any(placed[n] for n in positions):
        raise UsageError(f"--split {split}: {path} has no {split} entries ({no_split_note(others)})")
    names = seen_split_names((items[n]["split"] for n in positions if placed[n]), split)
    return positions, split, names, dict(others)


def no_split_note(others: Counter) -> str:
    """What a file holds instead of the wanted split, for the usage error."""
    return "it has " + ", ".join(f"{n} {name!r}" for name, n in others.most_common()) if others else "it is empty"


def split_failed(entry: dict, item, split: Optional[str]) -> dict:
    """entry, failed when its item is an object with no usable split in a file that has splits."""
    if split is None or not isinstance(item, dict) or isinstance(item.get("split"), str) or entry.get("failure"):
        return entry
    return {**entry, "failure": (REASON_BAD_ENTRY, f"no split (split is {item.get('split')!r})")}


def sidecar_metadata(folder: ImageFolder, entry: dict, options: SourceOptions) -> Optional[dict]:
    """The entry's raw metadata from its JSON sidecar (with --metadata_sidecars), a missing one noted, else None."""
    if not options.metadata_sidecars:
        return entry.get("metadata")
    document, problem = folder.sidecar(entry)
    return {SIDECAR_PROBLEM: problem} if problem else sidecar_raw(document, options.metadata_columns)


def check_sidecars(folder: ImageFolder, entries: Sequence[dict], options: SourceOptions) -> None:
    """With --metadata_sidecars: a usage error when none of the first images has one, or the first one found lacks
    a key --metadata_columns names."""
    if not options.metadata_sidecars:
        return
    probe = [e for e in entries[:PROBE_ENTRIES] if not e.get("failure")]
    found = next((doc for doc, _ in map(folder.sidecar, probe) if doc is not None), None)
    if found is None:
        raise UsageError(f"--metadata_sidecars: none of the first {len(probe)} images under {folder.base} has a "
                         f"sidecar (<image stem>{' or <image stem>'.join(SIDECAR_SUFFIXES)})")
    for field, key in (options.metadata_columns or {}).items():
        if key not in found:
            raise UsageError(f"--metadata_columns {field}={key}: the sidecars have no key {key!r} "
                             f"(keys: {', '.join(found)})")


def index_rows(entries: Iterable[dict], folder: ImageFolder, limit: Optional[int],
               options: SourceOptions = SourceOptions()) -> Iterator[Row]:
    """Rows from index entries (dicts with a `captions` list or a `failure`), images (and sidecars) read from the
    folder."""
    for number, entry in enumerate(entries, start=1):
        if limit is not None and number > limit:
            return
        name = entry.get("name")
        if entry.get("failure"):
            yield Row(number, name, None, entry.get("captions"), entry["failure"])
            continue
        data, failure = folder.read(entry)
        metadata = None if failure else sidecar_metadata(folder, entry, options)
        yield Row(number, name, data, entry.get("captions"), failure, metadata=metadata)


def images_root(options: SourceOptions, index_path: Path) -> Path:
    """--images_dir, else the index's own folder."""
    return Path(options.images_dir) if options.images_dir else index_path.parent


def effective_split(options: SourceOptions) -> str:
    """The split to read from a source that carries splits."""
    return options.split or options.default_split
