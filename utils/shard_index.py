"""A sharded dataset folder (create.py --output_format webdataset): where its files are, each shard's index part and
stats, the merge that writes the global index and stats, and reading one sample's member by its byte offset.

Layout of OUTPUT_DIR:
  shards/shard-NNNNNN.tar      samples `KEY.jpg`, `KEY.txt` (every caption, one a line), `KEY.json` (row, key,
                               source file, captions, metadata), KEY = image_<row>
  shards/shard-NNNNNN.parquet  that shard's index part (INDEX_SCHEMA), one row per sample, in tar order
  shards/shard-NNNNNN.json     that shard's stats and failed rows; written last, so it marks the shard finished
  shards_index.parquet         every part in shard order (the merge)
  create_report.json           the failed rows of every shard, counts (the merge)
  shards_stats.json            per-shard stats and totals; written last: the folder is complete
Shard j holds source rows j*shard_size+1 .. (j+1)*shard_size (those that did not fail), so its bytes depend only on
those rows and the settings, whichever task writes it.
"""

import json
import os
from pathlib import Path
from typing import Optional

import pyarrow as pa

from utils.atomic import tmp_path_for, write_json_atomic
from utils.cli import UsageError
from utils.constants import (CREATE_REPORT_FILENAME, SHARDS_DIRNAME, SHARDS_INDEX_FILENAME, SHARDS_STATS_FILENAME)

SHARD_PREFIX = "shard-"
SHARD_DIGITS = 6
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int32()), ("row", pa.int64()),
                          ("text", pa.list_(pa.string())), ("source_file", pa.string()), ("metadata", pa.string()),
                          ("image_offset", pa.int64()), ("image_size", pa.int64())])
# create.py's settings file: the merge reads the shard count from it.
SETTINGS_FILENAME = "create_settings.json"


def shard_stem(shard: int) -> str:
    """The name shard number `shard`'s files share."""
    return f"{SHARD_PREFIX}{shard:0{SHARD_DIGITS}d}"


def shard_files(folder: Path, shard: int) -> tuple:
    """(tar, index part, stats) paths of a shard."""
    base = Path(folder) / SHARDS_DIRNAME / shard_stem(shard)
    return base.with_suffix(".tar"), base.with_suffix(".parquet"), base.with_suffix(".json")


def is_shards_dir(folder) -> bool:
    """True when folder holds a sharded dataset's global index."""
    return folder is not None and (Path(folder) / SHARDS_INDEX_FILENAME).is_file()


def read_json(path: Path) -> Optional[dict]:
    """A JSON object file, or None when absent or unreadable."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def finished_stats(folder: Path, shard: int) -> Optional[dict]:
    """A shard's stats when the shard is finished (its stats, part and a tar of the recorded size exist), else None."""
    tar, part, stats_path = shard_files(folder, shard)
    stats = read_json(stats_path)
    if stats is None or not part.is_file() or not tar.is_file() or tar.stat().st_size != stats.get("tar_bytes"):
        return None
    return stats


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """A Parquet file written under a temporary name, then renamed into place."""
    import pyarrow.parquet as pq

    tmp = tmp_path_for(path)
    pq.write_table(table, str(tmp))
    os.replace(tmp, path)


def missing_shards(folder: Path, total: int) -> list:
    """The shard numbers below total that are not finished."""
    return [j for j in range(total) if finished_stats(folder, j) is None]


def stored_shard_count(folder: Path) -> int:
    """How many shards the folder's settings say it has; a usage error when it is not a sharded create folder."""
    settings = read_json(Path(folder) / SETTINGS_FILENAME)
    if not settings or settings.get("output_format") != "webdataset":
        raise UsageError(f"--merge {folder}: no create.py --output_format webdataset settings there")
    return int(settings["shards"])


def merged_report(folder: Path, stats: list, settings: dict) -> dict:
    """create_report.json of a sharded folder: totals and every shard's failed rows and bad metadata values."""
    failures = [f for s in stats for f in s["failures"]]
    reasons: dict = {}
    for failure in failures:
        reasons[failure["reason"]] = reasons.get(failure["reason"], 0) + 1
    return {"output_format": "webdataset", "output_dir": str(folder), "settings": settings,
            "rows_in_inputs": settings.get("rows_in_inputs"), "rows_processed": sum(s["rows"] for s in stats),
            "images_ok": sum(s["samples"] for s in stats), "caption_lines": sum(s["captions"] for s in stats),
            "rows_failed": len(failures), "failures_by_reason": dict(sorted(reasons.items(), key=lambda r: -r[1])),
            "failures": failures, "shards": len(stats),
            "metadata": {"rows_with_metadata": sum(s["metadata_rows"] for s in stats),
                         "bad_values": sum(len(s["metadata_problems"]) for s in stats)},
            "metadata_problems": [p for s in stats for p in s["metadata_problems"]]}


def write_index(folder: Path, total: int) -> None:
    """shards_index.parquet: the shards' index parts in order, one row group per shard (never all in memory)."""
    import pyarrow.parquet as pq

    path = Path(folder) / SHARDS_INDEX_FILENAME
    tmp = tmp_path_for(path)
    with pq.ParquetWriter(str(tmp), INDEX_SCHEMA) as writer:
        for shard in range(total):
            writer.write_table(pq.read_table(str(shard_files(folder, shard)[1]), schema=INDEX_SCHEMA))
    os.replace(tmp, path)


def merge(folder: Path) -> dict:
    """Check every shard is finished, then write the global index, the report and, last, the stats; return them."""
    folder = Path(folder)
    total = stored_shard_count(folder)
    absent = missing_shards(folder, total)
    if absent:
        shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
        raise UsageError(f"--merge {folder}: {len(absent)} of {total} shards are not finished (shard {shown}); "
                         "rerun the create tasks that own them")
    stats = [finished_stats(folder, j) for j in range(total)]
    write_index(folder, total)
    settings = read_json(folder / SETTINGS_FILENAME) or {}
    report = merged_report(folder, stats, settings)
    write_json_atomic(folder / CREATE_REPORT_FILENAME, report)
    summary = {"shards": total, "samples": report["images_ok"], "rows": report["rows_processed"],
               "captions": report["caption_lines"], "bytes": sum(s["tar_bytes"] for s in stats),
               "shard_size": settings.get("shard_size"),
               "per_shard": [{k: v for k, v in s.items() if k not in ("failures", "metadata_problems")}
                             for s in stats]}
    write_json_atomic(folder / SHARDS_STATS_FILENAME, summary)
    return summary


def read_member(handle, offset: int, size: int) -> bytes:
    """size bytes at offset of an open tar file: one member's data, found through the index."""
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise OSError(f"short read at byte {offset} of {getattr(handle, 'name', 'a shard')}: the shard is truncated")
    return data
