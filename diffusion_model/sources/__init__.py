"""Readers for every caption source form; open_source picks the form (or takes --format) and opens it.

Forms: Parquet (file, files or folder of shards), Karpathy JSON, NWPU-Captions JSON, CSV, JSONL, webdataset tar
shards. Each reader yields the same numbered Rows, so nothing after the reader knows which form it read.
"""

import json
from pathlib import Path
from typing import Sequence

from diffusion_model.parquet_source import (check_conditioning_column, check_label_column, check_metadata_columns,
                                            inspect_sources, iter_rows, resolve_parquet_paths)
from diffusion_model.sources.base import FORMATS, SPLIT_NAMES, SPLITS, ImageFolder, Source, SourceOptions
from diffusion_model.sources.conditioning import NAME_PATTERN, ConditioningDir, resolve_cells
from diffusion_model.sources.karpathy import is_karpathy, open_karpathy
from diffusion_model.sources.nwpu import is_nwpu, open_nwpu
from diffusion_model.sources.table import open_table
from diffusion_model.sources.webdataset import open_webdataset
from utils.cli import UsageError
from utils.constants import PARQUET_EXTENSION

__all__ = ["FORMATS", "SPLITS", "Source", "SourceOptions", "open_source"]

PARQUET_BATCH_ROWS = 64
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX_FORMS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}


def suffix_form(path: Path) -> str:
    """The form a file's name says it is ("json" still needs a look inside), or "" when it says nothing."""
    name = path.name.lower()
    if name.endswith(PARQUET_EXTENSION):
        return "parquet"
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    return INDEX_FORMS.get(path.suffix.lower(), "")


def folder_files(folder: Path) -> tuple:
    """(form, files) for a folder: its Parquet shards, else its tar shards, else its one index file."""
    for form in ("parquet", "webdataset"):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and suffix_form(p) == form)
        if files:
            return form, files
    indexes = sorted(p for p in folder.iterdir() if p.is_file() and suffix_form(p) in ("csv", "jsonl", "json"))
    if len(indexes) != 1:
        found = ", ".join(p.name for p in indexes) or "no Parquet, tar, JSON, CSV or JSONL file"
        raise UsageError(f"--input folder {folder}: cannot tell which source to read ({found}); name the file")
    return suffix_form(indexes[0]), indexes


def resolve_inputs(specs: Sequence[str]) -> tuple:
    """(form by name, sorted unique files) for the --input paths; all must be of one form."""
    forms, files = set(), set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            form, found = folder_files(path)
        elif path.is_file():
            form, found = suffix_form(path), [path]
        else:
            raise UsageError(f"--input {spec} does not exist")
        forms.add(form)
        files.update(p.resolve() for p in found)
    if len(forms) > 1:
        raise UsageError(f"--input mixes source forms ({', '.join(sorted(f or '?' for f in forms))}); "
                         "give one form per run and add the others with --append")
    return forms.pop(), sorted(files, key=str)


def load_json(path: Path):
    """A JSON index, whole; an unreadable one is a usage error naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read JSON {path}: {err}") from None


def json_form(doc, path: Path, wanted: str) -> str:
    """karpathy or nwpu, from the document's shape; a usage error when it is neither (or not the one asked for)."""
    form = "karpathy" if is_karpathy(doc) else "nwpu" if is_nwpu(doc) else ""
    if not form:
        raise UsageError(f"{path} is neither a Karpathy JSON (images[] with sentences[]) nor an NWPU-Captions JSON "
                         "(class -> entries with filename, split, raw)")
    if wanted not in ("auto", form):
        raise UsageError(f"--format {wanted}: {path} looks like a {form} JSON")
    return form


def shards_of_split(paths: list, split: str) -> list:
    """Parquet or tar shards whose file name starts with the split's name (train-..., valid-..., test-...)."""
    if split == "all":
        return paths
    names = SPLIT_NAMES[split]
    chosen = [p for p in paths if any(p.name.lower().startswith((f"{n}-", f"{n}_", f"{n}.")) for n in names)]
    if not chosen:
        raise UsageError(f"--split {split}: no shard name starts with {' or '.join(names)} among {len(paths)} file(s)")
    return chosen


def open_parquet_source(paths: list, options: SourceOptions) -> Source:
    """Parquet as before: columns detected once, rows streamed by record batches."""
    paths = resolve_parquet_paths([str(p) for p in paths])
    paths = shards_of_split(paths, options.split) if options.split else paths
    columns, total = inspect_sources(paths, options.image_column, options.caption_column)
    if options.class_column:
        check_label_column(paths, options.class_column, "--class_column")
    check_metadata_columns(paths, options.metadata_columns)
    conditioning = options.conditioning_column
    check_conditioning_column(paths, conditioning)
    # A conditioning column of path strings names files beside the (first) Parquet file.
    folder = ImageFolder(paths[0].parent, paths[0].parent, NAME_PATTERN)

    def read_rows(limit):
        """The rows, with their conditioning cells read when there is a conditioning column."""
        rows = iter_rows(paths, columns, PARQUET_BATCH_ROWS, limit, options.class_column, options.metadata_columns,
                         conditioning)
        return resolve_cells(rows, folder) if conditioning else rows

    return Source("parquet", paths, total, read_rows, options.split, [], {"columns": vars(columns)})


# Flags that only some forms read; given to another form they would be silently ignored, so they are refused.
INDEX_FORMS_WITH_FOLDER = ("json", "karpathy", "nwpu", "csv", "jsonl")
FLAG_FORMS = {"images_dir": INDEX_FORMS_WITH_FOLDER,
              "image_column": ("parquet", "csv", "jsonl"), "caption_column": ("parquet", "csv", "jsonl"),
              "class_column": ("parquet", "csv", "jsonl"),
              "conditioning_column": ("parquet", "csv", "jsonl", "webdataset")}
# Where --metadata_columns finds its columns: the table's own, a webdataset sample's .json, or (any index form
# with an image folder) the images' JSON sidecars.
METADATA_COLUMN_FORMS = ("parquet", "csv", "jsonl", "webdataset")


def metadata_flag_text(mapping: dict) -> str:
    """--metadata_columns as the user wrote it."""
    return ",".join(f"{field}={column}" for field, column in mapping.items())


def check_flags(form: str, options: SourceOptions) -> None:
    """A usage error for a flag the source's form does not use."""
    for flag, forms in FLAG_FORMS.items():
        if getattr(options, flag) is not None and form not in forms:
            raise UsageError(f"--{flag} {getattr(options, flag)} does not apply to a {form} source")
    if options.metadata_sidecars and form not in INDEX_FORMS_WITH_FOLDER:
        raise UsageError(f"--metadata_sidecars does not apply to a {form} source (only to an index with an image "
                         "folder: Karpathy or NWPU JSON, CSV, JSONL)")
    if options.metadata_columns and not options.metadata_sidecars and form not in METADATA_COLUMN_FORMS:
        raise UsageError(f"--metadata_columns {metadata_flag_text(options.metadata_columns)} does not apply to a "
                         f"{form} source without --metadata_sidecars")


def open_source(specs: Sequence[str], options: SourceOptions) -> Source:
    """Open --input in the form given or detected, each row with its conditioning from --conditioning_dir when
    given; every check that can fail fails here, before any output."""
    source = open_form(specs, options)
    if options.conditioning_dir is None:
        return source
    folder, read_rows = ConditioningDir(Path(options.conditioning_dir)), source.read_rows
    source.read_rows = lambda limit: folder.attach(read_rows(limit))
    source.details["conditioning_dir"] = str(folder.root)
    return source


def open_form(specs: Sequence[str], options: SourceOptions) -> Source:
    """Open --input in the form given or detected."""
    by_name, files = resolve_inputs(specs)
    form = options.form if options.form != "auto" else by_name
    check_flags(form, options)
    if form in ("json", "karpathy", "nwpu"):
        if len(files) != 1:
            raise UsageError(f"--input: give one JSON index at a time, got {len(files)}")
        doc = load_json(files[0])
        opener = open_karpathy if json_form(doc, files[0], options.form) == "karpathy" else open_nwpu
        return opener(files[0], doc, options)
    if form in ("csv", "jsonl"):
        return open_table(files, form, options)
    if form == "webdataset":
        return open_webdataset(shards_of_split(files, options.split) if options.split else files, options.split,
                               options.metadata_columns, options.conditioning_column)
    if form == "parquet":
        return open_parquet_source(files, options)
    raise UsageError(f"--input {specs[0]}: cannot tell its form from the name; give --format "
                     f"({', '.join(f for f in FORMATS if f != 'auto')})")
