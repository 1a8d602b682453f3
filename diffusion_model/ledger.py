"""Which sources an output folder holds and where each one's rows are numbered.

create_settings.json keeps, beside the image settings, one record per source: its form, files, split, columns,
first output row and row count. The first command's source starts at row 1; `--append` places a new source after
the last one, and a re-run of any command finds its own record again, so it resumes its own rows instead of
adding them twice. A source's rows are numbered over its full row count (not --limit), so a later --limit or a
failed row never moves another source's numbers.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from diffusion_model.geotiff import MultibandSettings
from utils.cli import UsageError

# What names a source; two records with these equal are the same source (a re-run, not a second copy).
IDENTITY_KEYS = ("format", "inputs", "split", "columns")
# create.py versions before --input stored only these; their folders read as Parquet, no split, default TIFF bands.
LEGACY = {"format": "parquet", "split": None, "multiband": asdict(MultibandSettings())}


@dataclass(frozen=True)
class Placement:
    """Where this run's rows go: output rows first..last; the settings to guard and to store."""

    first_row: int
    last_row: int
    guarded: dict
    document: dict
    appended: bool

    @property
    def offset(self) -> int:
        """Added to a source row number to get its output row number."""
        return self.first_row - 1


def read_json_object(path: Path) -> dict:
    """A stored JSON object (settings or report), or {} when there is none or it cannot be read."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def identity(record: dict) -> dict:
    """The keys that name a source."""
    return {key: record.get(key, LEGACY.get(key)) for key in IDENTITY_KEYS}


def base_keys(record: dict, image_column: Optional[str]) -> dict:
    """The first source's keys at the top of the settings (the layout older create.py versions check)."""
    return {"inputs": record["inputs"], "image_column": image_column, "format": record["format"],
            "split": record["split"]}


def check_room(sources: list, index: int, rows: int) -> None:
    """Refuse when a source now has more rows than the numbers left before the next source."""
    first = sources[index]["first_row"]
    later = [s["first_row"] for s in sources if s["first_row"] > first]
    if later and first + rows - 1 >= min(later):
        raise UsageError(f"{', '.join(sources[index]['inputs'])} now has {rows} rows, but the source appended after "
                         f"it starts at row {min(later)}; rerun the first command with --overwrite to rebuild the folder")


def place_first(stored: dict, image: dict, record: dict, image_column, rows: int, overwrite: bool) -> Placement:
    """The first command's source: rows from 1; later (appended) sources are kept unless --overwrite."""
    guarded = {**image, **base_keys(record, image_column)}
    later = [] if overwrite else [s for s in stored.get("sources", [])[1:]]
    sources = [{**record, "first_row": 1, "rows": rows}] + later
    same = bool(stored.get("sources")) and identity(stored["sources"][0]) == identity(record)
    if same:  # another first source is refused by the settings guard, with a better message
        check_room(sources, 0, rows)
    return Placement(1, max(rows, 1), guarded, {**guarded, "sources": sources}, False)


def place_appended(stored: dict, image: dict, record: dict, rows: int, folder: Path) -> Placement:
    """An --append source: its own earlier place when it was appended before, else after the last source."""
    sources = [dict(s) for s in stored.get("sources", [])]
    if not sources:
        raise UsageError(f"{folder} was made by an older create.py that did not record its source; rerun its "
                         "first command once, then --append")
    same = [i for i, s in enumerate(sources) if identity(s) == identity(record)]
    if same:
        index = same[0]
        check_room(sources, index, rows)
        sources[index] = {**record, "first_row": sources[index]["first_row"], "rows": rows}
    else:
        index = len(sources)
        sources.append({**record, "first_row": max(s["first_row"] + s["rows"] for s in sources), "rows": rows})
    first = sources[index]["first_row"]
    return Placement(first, first + max(rows, 1) - 1, image, {**stored, **image, "sources": sources}, True)


def place(settings_path: Path, image: dict, record: dict, image_column, rows: int, append: bool,
          overwrite: bool) -> Placement:
    """Decide this run's rows: the first source (no --append, or nothing there yet) or an appended one."""
    stored = read_json_object(settings_path)
    if append and stored:
        return place_appended(stored, image, record, rows, settings_path.parent)
    return place_first(stored, image, record, image_column, rows, overwrite)


def other_failures(output_dir: Path, report_names: tuple, rows: range) -> list:
    """Failed rows of the folder's other sources, from the last report (or the one set aside by a killed run)."""
    for name in report_names:
        report = read_json_object(output_dir / name)
        if report:
            failures = report.get("failures", []) + report.get("other_sources_failures", [])
            return sorted((f for f in failures if isinstance(f, dict) and f.get("row") not in rows),
                          key=lambda f: f.get("row", 0))
    return []
