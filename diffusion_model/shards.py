"""create.py --output_format webdataset: numbered rows -> tar shards of --shard_size rows, split over tasks.

Shard j holds rows j*shard_size+1 .. (j+1)*shard_size. Task K of S (--shard_index/--num_shards, or Slurm's array
variables) writes the contiguous block of shards K*T//S .. (K+1)*T//S-1 and reads the source only up to its block's
last row. Each shard is written under a temporary name and renamed, then its index part, then its stats (last: the
shard is finished); a rerun skips finished shards, so a killed run redoes at most the shard it was writing. Tar
members carry no time, owner or mode of their own, so a shard's bytes depend only on its rows and the settings:
the union of the tasks' shards is byte for byte what one run writes. Workers encode the JPEGs and return their bytes;
the main process appends them to the open shard in row order. See utils/shard_index.py for the layout.
"""

import io
import json
import math
import multiprocessing
import os
import re
import tarfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import pyarrow as pa
from tqdm import tqdm

from diffusion_model import create_job
from diffusion_model.create_job import (CHUNK_BYTES, CHUNK_ROWS, CHUNKS_IN_FLIGHT_PER_WORKER, REASON_NO_CAPTION,
                                        JobTally, MetadataPlan, chunked, guard_settings, metadata_values, plan_chunk)
from utils.image_errors import ImageRejected
from utils.shard_index import (INDEX_SCHEMA, SETTINGS_FILENAME, SHARD_PREFIX, finished_stats, merge,
                                         shard_files, write_parquet_atomic)
from utils.atomic import tmp_path_for, write_json_atomic
from utils.cli import UsageError
from utils.constants import IMAGE_EXTENSION, IMAGE_PREFIX, IMAGE_INDEX_DIGITS, SHARDS_DIRNAME, TMP_SUFFIX

TAR_BLOCK = 512
# Python object addresses in error details (Pillow names its BytesIO): dropped so that a shard's stats are the same
# in every run.
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class ShardPlan:
    """The shards of this run: rows, shard size, the task's block and whether finished shards are redone."""

    rows: int
    shard_size: int
    num_tasks: int = 1
    task: int = 0
    overwrite: bool = False

    @property
    def total(self) -> int:
        """Shards in the whole dataset."""
        return math.ceil(self.rows / self.shard_size)

    @property
    def block(self) -> range:
        """This task's shards."""
        return range(self.task * self.total // self.num_tasks, (self.task + 1) * self.total // self.num_tasks)

    def shard_of(self, number: int) -> int:
        """The shard that holds row number (1-based)."""
        return (number - 1) // self.shard_size

    def last_row(self) -> int:
        """The last row of this task's block (0 when it has none)."""
        return min(self.rows, self.block.stop * self.shard_size) if len(self.block) else 0


def task_from_env(num_shards: Optional[int], shard_index: Optional[int], environ=os.environ) -> tuple:
    """(tasks, this task) from the flags, else Slurm's array variables, else (1, 0); a usage error when invalid."""
    def number(flag, value, name):
        if value is not None:
            return value, flag
        try:
            return (int(environ[name]), name) if environ.get(name) not in (None, "") else (None, name)
        except ValueError:
            raise UsageError(f"{name}={environ[name]!r} is not a whole number") from None

    count, count_from = number("--num_shards", num_shards, "SLURM_ARRAY_TASK_COUNT")
    index, index_from = number("--shard_index", shard_index, "SLURM_ARRAY_TASK_ID")
    if shard_index is None and index is not None and environ.get("SLURM_ARRAY_TASK_MIN", "").isdigit():
        index -= int(environ["SLURM_ARRAY_TASK_MIN"])  # an array numbered from 1 (or more) still starts at task 0
    count, index = count or 1, index or 0
    if count < 1:
        raise UsageError(f"{count_from} must be at least 1, got {count}")
    if not 0 <= index < count:
        raise UsageError(f"{index_from} must be between 0 and {count - 1} ({count_from} {count}), got {index}")
    return count, index


def sample_key(number: int) -> str:
    """A sample's key: the image name create.py gives row number, without its extension."""
    return f"{IMAGE_PREFIX}{number:0{IMAGE_INDEX_DIGITS}d}"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member with fixed time, owner and mode (reproducible bytes); return its data's byte offset."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - math.ceil(len(data) / TAR_BLOCK) * TAR_BLOCK


def encode_chunk(items: list) -> list:
    """Worker: (number, outcome, detail, source facts, JPEG bytes) per row; nothing is written to disk here."""
    settings, results = create_job._worker_state["settings"], []
    with create_job.reading_rows():
        for number, data, wanted, _conditioning in items:
            facts = create_job.source_facts(data, wanted) if data else None
            try:
                jpeg, _, _ = create_job.make_row(number, data, None, settings)
            except ImageRejected as err:
                results.append((number, err.reason, err.detail, None, None))
                continue
            results.append((number, create_job.WRITTEN, "", facts, jpeg))
    return results


@dataclass
class ShardWriter:
    """The shard being written: its temporary tar, index rows, failed rows and counts."""

    folder: Path
    shard: int
    tally: JobTally = field(default_factory=JobTally)
    index: list = field(default_factory=list)

    def __post_init__(self):
        """Open the temporary tar."""
        self.tar_path = shard_files(self.folder, self.shard)[0]
        self.tar = tarfile.open(tmp_path_for(self.tar_path), "w", format=tarfile.USTAR_FORMAT)

    def add(self, row, captions: list, jpeg: bytes, metadata: dict) -> None:
        """Append one sample (image, captions, record) and its index row."""
        key = sample_key(row.number)
        record = {"row": row.number, "key": key, "source_file": row.filename, "captions": captions,
                  "metadata": metadata or None}
        offset = add_member(self.tar, key + IMAGE_EXTENSION, jpeg)
        add_member(self.tar, key + ".txt", "".join(c + "\n" for c in captions).encode("utf-8"))
        add_member(self.tar, key + ".json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        self.index.append({"key": key, "shard": self.shard, "row": row.number, "text": captions,
                           "source_file": row.filename,
                           "metadata": json.dumps(metadata, sort_keys=True) if metadata else None,
                           "image_offset": offset, "image_size": len(jpeg)})
        self.tally.images_written += 1
        self.tally.caption_lines += len(captions)

    def finish(self) -> dict:
        """Close and publish the tar, then the index part, then the stats (the shard is finished); return them."""
        import hashlib

        self.tar.close()
        os.replace(tmp_path_for(self.tar_path), self.tar_path)
        tar, part, stats_path = shard_files(self.folder, self.shard)
        write_parquet_atomic(part, pa.Table.from_pylist(self.index, schema=INDEX_SCHEMA))
        digest = hashlib.sha256()
        with open(tar, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        stats = {"shard": self.shard, "name": tar.name, "rows": self.tally.rows_processed,
                 "samples": len(self.index), "captions": self.tally.caption_lines,
                 "first_row": self.index[0]["row"] if self.index else None,
                 "last_row": self.index[-1]["row"] if self.index else None, "tar_bytes": tar.stat().st_size,
                 "sha256": digest.hexdigest(), "metadata_rows": self.tally.metadata_rows,
                 "failures": self.tally.failures, "metadata_problems": self.tally.metadata_problems}
        write_json_atomic(stats_path, stats)
        return stats


@dataclass
class RunTally:
    """What this task did: shards written and kept, rows, samples and failures of the shards it wrote."""

    written: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    rows: int = 0
    samples: int = 0
    failures: int = 0


def settle(plans: list, results: list, state: dict, folder: Path, plan: ShardPlan, metadata_plan: MetadataPlan,
           run: RunTally) -> None:
    """Fold a finished chunk into its shards in row order, finishing each shard as the next one starts."""
    outcomes = {r[0]: r[1:] for r in results}
    for row, captions in plans:
        shard = plan.shard_of(row.number)
        writer = state.get("writer")
        if writer is None or writer.shard != shard:
            finish_writer(state, run)
            writer = state["writer"] = ShardWriter(folder, shard)
        writer.tally.rows_processed += 1
        outcome, detail, facts, jpeg = outcomes.get(row.number, (*(row.failure or (REASON_NO_CAPTION, "")), None,
                                                                 None))
        if outcome != create_job.WRITTEN:
            writer.tally.fail(row.number, row.filename, outcome, ADDRESS.sub("", detail))
            continue
        values = metadata_values(row, facts, metadata_plan, writer.tally)
        writer.tally.metadata_rows += bool(values)
        writer.add(row, captions, jpeg, values)


def finish_writer(state: dict, run: RunTally) -> None:
    """Finish the open shard, if any, and count it."""
    writer = state.pop("writer", None)
    if writer is not None:
        stats = writer.finish()
        run.written.append(writer.shard)
        run.rows, run.samples, run.failures = (run.rows + stats["rows"], run.samples + stats["samples"],
                                               run.failures + len(stats["failures"]))


def rows_to_do(rows: Iterable, plan: ShardPlan, todo: set):
    """The source rows of the shards to write (reading stops after the block's last row)."""
    last = plan.last_row()
    for row in rows:
        if row.number > last:
            return
        if plan.shard_of(row.number) in todo:
            yield row


def run_shards(rows: Iterable, folder: Path, plan: ShardPlan, settings, caption_mode: str, num_workers: int,
               metadata_plan: MetadataPlan) -> tuple:
    """Write this task's unfinished shards with a bounded pool; return (RunTally, seconds)."""
    started, run, state, pending = time.monotonic(), RunTally(), {}, deque()
    todo = {j for j in plan.block if plan.overwrite or finished_stats(folder, j) is None}
    run.kept = [j for j in plan.block if j not in todo]
    total = sum(min(plan.rows, (j + 1) * plan.shard_size) - j * plan.shard_size for j in todo)
    with multiprocessing.Pool(num_workers, create_job.init_worker, (str(folder), settings, True)) as pool, \
            tqdm(total=total, unit="row", desc="create shards", disable=None) as bar:
        for chunk in chunked(rows_to_do(rows, plan, todo), CHUNK_ROWS, CHUNK_BYTES):
            plans, work = plan_chunk(chunk, caption_mode, metadata_plan.literals)
            pending.append((plans, pool.apply_async(encode_chunk, (work,)) if work else None))
            while len(pending) >= num_workers * CHUNKS_IN_FLIGHT_PER_WORKER:
                settle_oldest(pending, state, folder, plan, metadata_plan, run, bar)
        while pending:
            settle_oldest(pending, state, folder, plan, metadata_plan, run, bar)
        finish_writer(state, run)
    return run, time.monotonic() - started


def settle_oldest(pending: deque, state: dict, folder: Path, plan: ShardPlan, metadata_plan: MetadataPlan,
                  run: RunTally, bar) -> None:
    """Wait for the oldest chunk in flight and write its rows."""
    plans, result = pending.popleft()
    settle(plans, result.get() if result else [], state, folder, plan, metadata_plan, run)
    bar.update(len(plans))


def write_settings(folder: Path, document: dict) -> None:
    """The settings file, under a temporary name of this process's own (tasks may write it at once), then renamed."""
    path = folder / SETTINGS_FILENAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_shards(folder: Path, plan: ShardPlan, wanted: dict) -> None:
    """Check the settings match a previous run's (unless --overwrite), clear this task's temporary files (and, with
    --overwrite, its shards) and shards beyond the last, and store the settings."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output_dir {folder} exists and is not a folder")
    guard_settings(folder, wanted, plan.overwrite)
    try:
        (folder / SHARDS_DIRNAME).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --output_dir {folder}: {err.strerror}") from None
    for path in (folder / SHARDS_DIRNAME).iterdir():
        shard = shard_number(path.name)
        mine = shard in plan.block and (plan.overwrite or path.name.endswith(TMP_SUFFIX))
        if shard is not None and (mine or shard >= plan.total):
            path.unlink(missing_ok=True)
    write_settings(folder, wanted)


def shard_number(name: str) -> Optional[int]:
    """The shard number in one of our shard file names (temporary ones too), or None."""
    stem = name.split(".", 1)[0]
    digits = stem[len(SHARD_PREFIX):]
    return int(digits) if stem.startswith(SHARD_PREFIX) and digits.isdigit() else None


def shard_settings(image_settings, plan: ShardPlan, source_record: dict, caption_mode: str,
                   metadata_plan: MetadataPlan, rows_total: int) -> dict:
    """What decides the shards' bytes (guarded on resume) and what the merge needs, as stored JSON."""
    document = {**asdict(image_settings), "output_format": "webdataset", "shard_size": plan.shard_size,
                "rows": plan.rows, "shards": plan.total, "caption_mode": caption_mode,
                "metadata_literals": metadata_plan.literals, "source": source_record, "rows_in_inputs": rows_total}
    return json.loads(json.dumps(document, default=str))


def summary_line(run: RunTally, plan: ShardPlan, folder: Path, seconds: float, merged: Optional[dict]) -> str:
    """One line: this task's shards, rows and failures, and the merge's totals (or how to merge)."""
    task = f" (task {plan.task + 1} of {plan.num_tasks})" if plan.num_tasks > 1 else ""
    block = f"shards {plan.block.start}-{plan.block.stop - 1}" if len(plan.block) else "no shards"
    line = (f"create{task}: {block} of {plan.total}: {len(run.written)} written, {len(run.kept)} already finished; "
            f"{run.samples}/{run.rows} rows ok, {run.failures} failed; {seconds:.1f}s")
    if merged is not None:
        return line + f"; merged: {merged['samples']} samples in {merged['shards']} shards, index in {folder}"
    return line + f"; when every task has finished: python diffusion_model/create.py --merge {folder}"


def create_shards(args, source, image_settings, metadata_plan: MetadataPlan, output_dir: Path) -> int:
    """The webdataset path of create.py: plan, guard, write this task's shards, merge when it is the only task."""
    num_tasks, task = task_from_env(args.num_shards, args.shard_index)
    rows = min(source.rows_total, args.limit or source.rows_total)
    if rows == 0:
        raise UsageError(f"--input {' '.join(args.input)} holds no rows")
    plan = ShardPlan(rows, args.shard_size, num_tasks, task, args.overwrite)
    wanted = shard_settings(image_settings, plan, source.record(), args.caption_mode, metadata_plan,
                            source.rows_total)
    prepare_shards(output_dir, plan, wanted)
    run, seconds = run_shards(source.rows(args.limit), output_dir, plan, image_settings, args.caption_mode,
                              args.num_workers, metadata_plan)
    merged = merge(output_dir) if num_tasks == 1 else None
    print(summary_line(run, plan, output_dir, seconds, merged))
    return 1 if args.strict and run.failures else 0
