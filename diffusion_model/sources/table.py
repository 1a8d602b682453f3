"""A user's own index: a CSV or JSONL of image file name and caption, beside (or pointing into) an image folder.

Both are streamed twice: once to count the rows of the split, once to read them; neither is held in memory.
Several index files are numbered across in sorted path order; each resolves names against its own folder unless
--images_dir is given. A `split` column, when present, is filtered by --split.
"""

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

from diffusion_model.parquet_source import Row
from diffusion_model.sources.conditioning import read_cell, with_conditioning
from diffusion_model.sources.base import (PROBE_ENTRIES, REASON_BAD_ENTRY, Source, SourceOptions, check_sidecars,
                                          effective_split, images_root, no_split_note, open_image_folder,
                                          seen_split_names, sidecar_metadata, split_matcher)
from utils.cli import UsageError

IMAGE_COLUMNS = ("file_name", "filename", "image")
CAPTION_COLUMNS = ("text", "caption", "captions")
SPLIT_COLUMN = "split"
PATTERNS = (lambda e: e.get("name"),)


def pick(names: Sequence[str], chosen: Optional[str], candidates: Sequence[str], flag: str, path: Path) -> str:
    """The chosen column if the file has it, else the first candidate it has; a usage error otherwise."""
    if chosen is not None:
        if chosen not in names:
            raise UsageError(f"{flag} {chosen!r} is not a column of {path} (columns: {', '.join(names)})")
        return chosen
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise UsageError(f"no {flag.lstrip('-').replace('_', ' ')} found in {path} (columns: {', '.join(names)}); "
                         f"name it with {flag}")
    return found


def metadata_columns_of(names: Sequence[str], options: SourceOptions, path: Path) -> dict:
    """--metadata_columns, each checked against the file's columns (a usage error names the first one missing)."""
    for field, column in (options.metadata_columns or {}).items():
        if column not in names:
            raise UsageError(f"--metadata_columns {field}={column}: {column!r} is not a column of {path} "
                             f"(columns: {', '.join(names)})")
    return dict(options.metadata_columns or {})


def caption_cell(value) -> object:
    """A caption cell as create.py's caption cleaner takes it: a CSV cell holding a JSON list becomes that list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, list):
            return parsed
    return value


def csv_records(path: Path) -> Iterator[tuple]:
    """(line, record or None, error) per CSV data row; the header gives the keys."""
    # Undecodable bytes become U+FFFD: the row then fails on its own (say, missing_image), not the whole file.
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.DictReader(handle)
        try:
            for record in reader:
                yield reader.line_num, record, ""
        except csv.Error as err:
            raise UsageError(f"cannot read CSV {path} near line {reader.line_num}: {err}") from None


def jsonl_records(path: Path) -> Iterator[tuple]:
    """(line, record or None, error) per non-blank JSONL line; a broken line is a record-less error."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                yield number, None, f"line {number}: {err}"
                continue
            if isinstance(record, dict):
                yield number, record, ""
            else:
                yield number, None, f"line {number}: a {type(record).__name__}, not an object"


def header(path: Path, form: str) -> list:
    """Column names: the CSV header, or the keys of the first JSONL object."""
    if form == "csv":
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
            return next(csv.reader(handle), [])
    return next((list(record) for _, record, _ in jsonl_records(path) if record is not None), [])


def table_entries(path: Path, form: str, columns: dict, match, seen: Optional[Counter] = None) -> Iterator[dict]:
    """Index entries of the rows in the split: name and captions, or a failure for a broken row.

    seen, when given, counts every split value met (so the report can show what was and was not read).
    """
    records = csv_records(path) if form == "csv" else jsonl_records(path)
    for line, record, error in records:
        if record is None:
            yield {"name": f"{path.name}:{line}", "failure": (REASON_BAD_ENTRY, error)}
            continue
        if columns["split"] and seen is not None:
            seen[str(record.get(columns["split"])).strip().lower()] += 1
        if columns["split"] and not match(record.get(columns["split"])):
            continue
        name = record.get(columns["image"])
        if not isinstance(name, str) or not name.strip():
            yield {"name": f"{path.name}:{line}", "failure": (REASON_BAD_ENTRY, f"no {columns['image']}")}
            continue
        metadata = {field: record.get(column) for field, column in columns.get("metadata", {}).items()}
        yield {"name": name.strip(), "captions": caption_cell(record.get(columns["caption"])),
               "label": record.get(columns["label"]) if columns.get("label") else None, "metadata": metadata or None,
               "conditioning": record.get(columns["conditioning"]) if columns.get("conditioning") else None}


def table_rows(plans: list, limit: Optional[int], options: SourceOptions) -> Iterator[Row]:
    """Rows across all index files, numbered from 1 in file order (metadata from columns or sidecars)."""
    number = 0
    for path, form, columns, folder, match, metadata_columns in plans:
        for entry in table_entries(path, form, {**columns, "metadata": metadata_columns}, match):
            number += 1
            if limit is not None and number > limit:
                return
            if entry.get("failure"):
                yield Row(number, entry["name"], None, entry.get("captions"), entry["failure"])
                continue
            data, failure = folder.read(entry)
            metadata = None if failure else sidecar_metadata(folder, entry, options)
            row = Row(number, entry["name"], data, entry["captions"], failure, entry["label"], metadata)
            yield with_conditioning(row, *read_cell(entry["conditioning"], folder)) if columns.get("conditioning") \
                else row


def open_table(paths: Sequence[Path], form: str, options: SourceOptions) -> Source:
    """Check the columns of every file, count the split's rows, locate each file's image folder."""
    plans, total, split_values, has_split = [], 0, Counter(), []
    for path in paths:
        names = header(path, form)
        columns = {"image": pick(names, options.image_column, IMAGE_COLUMNS, "--image_column", path),
                   "caption": pick(names, options.caption_column, CAPTION_COLUMNS, "--caption_column", path),
                   "split": SPLIT_COLUMN if SPLIT_COLUMN in names else None}
        if options.class_column:  # only then: create.py keeps these columns as part of a source's identity
            columns["label"] = pick(names, options.class_column, (), "--class_column", path)
        if options.conditioning_column:
            columns["conditioning"] = pick(names, options.conditioning_column, (), "--conditioning_column", path)
        metadata_columns = {} if options.metadata_sidecars else metadata_columns_of(names, options, path)
        has_split.append(columns["split"] is not None)
        split = effective_split(options) if columns["split"] else "all"
        match = split_matcher(split)
        head = []
        for entry in table_entries(path, form, {**columns, "metadata": metadata_columns}, match, split_values):
            total += 1
            if len(head) < PROBE_ENTRIES:
                head.append(entry)
        folder = open_image_folder(images_root(options, path), [e for e in head if not e.get("failure")], PATTERNS)
        check_sidecars(folder, head, options)
        # The metadata columns are kept apart: they are no part of the source's identity (a rerun may change them).
        plans.append((path, form, columns, folder, match, metadata_columns))
    if options.split and not any(has_split):
        raise UsageError(f"--split {options.split}: {paths[0]} has no {SPLIT_COLUMN!r} column to select by")
    split = effective_split(options) if any(has_split) else None
    if split and total == 0:
        raise UsageError(f"--split {split}: {', '.join(map(str, paths))} has no {split} rows "
                         f"({no_split_note(split_values)})")
    names = seen_split_names(split_values, split) if split else []
    details = {"columns": plans[0][2], "images_dir": [str(p[3].base) for p in plans]}
    if split:
        details["splits_not_read"] = {k: n for k, n in split_values.items() if not split_matcher(split)(k)}
    return Source(form, list(paths), total, lambda limit: table_rows(plans, limit, options), split, names, details)
