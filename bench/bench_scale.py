"""Benchmark how cost and memory scale with the number of rows: create.py, the latent cache build, training start.

For each size N (default 1k, 10k, 100k rows) it writes an RSICD-schema Parquet of tiny distinct JPEGs with distinct
captions, then runs each stage as its own process under bench/peak_rss.py, so each figure is that stage's own:
  - create:  create.py on the Parquet at --resolution (then format.py, timed as its own row);
  - build:   the trainer with --cache_latents and one optimizer step, timed by its "Latent cache built in X s" line;
  - train:   the trainer again on the built cache: time to first step (process start to the first optimizer step's
             tensorboard stamp, so it includes imports, loading the imagefolder from its datasets cache, which the
             build stage wrote, and hashing the data for the cache key) and steps/s over the steps after the first.
The same stages on sharded data (create.py --output_format webdataset), each its own process too:
  - shards:  create.py --output_format webdataset on the Parquet (its default --shard_size);
  - merge:   create.py --merge on the finished shards (the global index, report and stats: no image is encoded);
  - read:    opening the folder as the trainer does (trainer/shards.py) and reading READ_ROWS rows at random;
  - sbuild:  the cache build from the shards, as build;
  - strain:  the trainer on the shards without the cache: time to first step and steps/s.
--index_rows (default 1M) then runs the stages that encode no image (merge, read, strain) on a sharded folder of
that many rows written directly (one fixed JPEG, distinct captions), for the 1M-row time-to-first-step target.
Figures: peak RSS, seconds per row and bytes on disk per row. Targets (PASS/FAIL): peak RSS grows by at most
64 MiB from the smallest to the largest size, per stage; seconds per row do not grow by more than 1.3x with the
rows (create, format, build, shards, merge, sbuild): no larger size's seconds per row exceed a smaller size's by
more than 1.3x, and the seconds per added row (the slope) between the last two sizes are at most 1.3x those between
the first two, unless the last interval adds under MEASURABLE_S seconds (the stage hardly depends on N); steps/s
within 1.3x; time to first step from shards at --index_rows under 60 s. A fall in seconds per row (a fixed start-up
spread over more rows) is not a failure. For reading, --baseline_rows (default 10) runs every stage once more at
that size first and the spread of seconds per row net of its seconds is printed beside the raw one. The machine's
load (uptime) is printed; figures from a busy machine say "not quiet".

Run: python bench/bench_scale.py [--sizes 1000 10000 100000] [--resolution 16] [--steps 6] [--work_dir DIR]
         [--index_rows 1000000] [--baseline_rows 10] [--skip_imagefolder] [--skip_shards] [--skip_cache_build]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bench.bench_create import cpu_counters
from diffusion_model.sample_data import RSICD_SCHEMA
from utils.constants import DEFAULT_SHARD_SIZE
from utils.cli import ArgumentParser, UsageError, run_main

REPO_ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS = Path(__file__).resolve().with_name("peak_rss.py")
CREATE = REPO_ROOT / "diffusion_model" / "create.py"
FORMAT = REPO_ROOT / "diffusion_model" / "format.py"
TRAINER = REPO_ROOT / "train_text_to_image.py"
BUILD_RE = re.compile(r"Latent cache built in ([\d.]+) s")
STEP_TAG = "train_loss"  # logged at every optimizer step
RSS_GROWTH_MIB = 64.0
TIME_SPREAD = 1.3
# Below this many seconds added from one size to the next, a stage's time is start-up and noise: no slope is judged.
MEASURABLE_S = 1.0
MAX_BACKGROUND = 0.3  # cores other processes may use during a stage for its figures to count as quiet
SOURCE_SIDE = 32  # px of the generated JPEGs: create.py resizes them to --resolution
ROW_GROUP = 1024
WORDS = ("farmland", "river", "pond", "residential", "bareland", "forest", "road", "harbour", "airport", "desert")
STAGES = ("create", "format", "build", "train", "shards", "merge", "read", "sbuild", "strain")
TIMED_STAGES = ("create", "format", "build", "shards", "merge", "sbuild")  # their seconds per row should stay flat
READ_ROWS = 20_000  # rows the read stage reads at random (all of them when fewer)
TRAIN_FLAGS = ["--center_crop", "--train_batch_size", "4", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
               "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--report_to", "tensorboard",
               "--seed", "0", "--cache_latents"]


def parse_args(argv: Optional[Sequence[str]]):
    """Command line."""
    parser = ArgumentParser(description="Peak RSS, seconds and bytes per row of each stage at several sizes.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000],
                        help="Row counts to run, smallest first (default 1000 10000 100000).")
    parser.add_argument("--resolution", type=int, default=16, help="create.py and trainer resolution (default 16).")
    parser.add_argument("--steps", type=int, default=6, help="Optimizer steps of the train stage (default 6).")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "bench_scale"),
                        help="Scratch folder, deleted and recreated (default $TMPDIR/bench_scale).")
    parser.add_argument("--keep", action="store_true", help="Keep each size's files (default: delete after it).")
    parser.add_argument("--baseline_rows", type=int, default=10,
                        help="Rows of a start-up baseline run of every stage (default 10; 0: none). Its seconds are "
                             "each process's fixed cost (imports, model load), subtracted before the per-row target.")
    parser.add_argument("--index_rows", type=int, default=1_000_000,
                        help="Rows of the image-free sharded run (merge, read, time to first step); 0 skips it.")
    parser.add_argument("--skip_imagefolder", action="store_true",
                        help="Run only the sharded stages (not create/format/build/train on the image folder).")
    parser.add_argument("--skip_shards", action="store_true",
                        help="Run only the image-folder stages (create, format, build, train); pair with --index_rows 0.")
    parser.add_argument("--skip_cache_build", action="store_true",
                        help="Leave out the cache build from the shards (sbuild), the slowest stage on a busy box.")
    return parser.parse_args(argv)


def caption(i: int) -> str:
    """A distinct caption for row i, worded like a scene description."""
    return f"{WORDS[i % 10]} scene {i} near the {WORDS[(i // 10) % 10]} with {WORDS[(i // 100) % 10]} beside it"


def tiny_jpeg(rng: np.random.Generator) -> bytes:
    """A SOURCE_SIDE px JPEG of smooth random colour (distinct per row, cheap to make)."""
    corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    image = Image.fromarray(corners).resize((SOURCE_SIDE, SOURCE_SIDE), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_source(path: Path, rows: int) -> Path:
    """An RSICD-schema Parquet of `rows` tiny distinct JPEGs, one distinct caption each, in row groups."""
    rng = np.random.default_rng(rows)
    with pq.ParquetWriter(path, RSICD_SCHEMA) as writer:
        for start in range(0, rows, ROW_GROUP):
            batch = [{"filename": f"img_{i:07d}.jpg", "captions": [caption(i)],
                      "image": {"bytes": tiny_jpeg(rng), "path": f"img_{i:07d}.jpg"}}
                     for i in range(start, min(start + ROW_GROUP, rows))]
            writer.write_table(pa.Table.from_pylist(batch, schema=RSICD_SCHEMA))
    return path


def make_model(folder: Path) -> Path:
    """Save the tiny random pipeline (in a subprocess, so this process stays small)."""
    subprocess.run([sys.executable, "-m", "stand_in.tiny_model", str(folder)], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    return folder


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under folder."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_stage(command: list, datasets_cache: Path) -> dict:
    """Run one stage under peak_rss.py: start stamp, wall seconds, peak RSS, CPU others used meanwhile, stderr."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(datasets_cache)}
    (busy_before, _), started, stamp = cpu_counters(), time.perf_counter(), time.time()
    done = subprocess.run([sys.executable, str(PEAK_RSS), *command], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT)
    (busy_after, _), seconds = cpu_counters(), time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[1]).name} exited {done.returncode}: {done.stderr.strip()[-1500:]}")
    fields = done.stdout.strip().splitlines()[-1].split()
    rss_mib, cpu_s = float(fields[1]), float(fields[3])
    return {"start": stamp, "seconds": seconds, "rss_mib": rss_mib, "stderr": done.stderr, "stdout": done.stdout,
            "others_cores": max(0.0, busy_after - busy_before - cpu_s) / seconds}


def step_stamps(output: Path) -> list:
    """Wall-clock stamps of the run's optimizer steps, in step order, from its tensorboard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stamps = {}
    for events in output.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if STEP_TAG in accumulator.Tags()["scalars"]:
            stamps.update({event.step: event.wall_time for event in accumulator.Scalars(STEP_TAG)})
    return [stamps[step] for step in sorted(stamps)]


def create_stages(parquet: Path, data: Path, resolution: int) -> dict:
    """create.py then format.py, each its own process: seconds, RSS and bytes of the folder they write."""
    create = run_stage([sys.executable, str(CREATE), "--input", str(parquet), "--output_dir", str(data),
                        "--resolution", str(resolution)], data.parent / "hf_datasets")
    create["bytes"] = folder_bytes(data)
    formatted = run_stage([sys.executable, str(FORMAT), "--caption_file", str(data / "captions.txt"),
                           "--output_file", str(data / "metadata.jsonl")], data.parent / "hf_datasets")
    formatted["bytes"] = (data / "metadata.jsonl").stat().st_size
    return {"create": create, "format": formatted}


def trainer_command(model: Path, data: Path, work: Path, name: str, resolution: int, steps: int,
                    cache: str = "cache") -> list:
    """The trainer on the tiny model with the cache in work/cache (its folder name), writing to work/name."""
    return [sys.executable, str(TRAINER), "--pretrained_model_name_or_path", str(model), "--train_data_dir",
            str(data), "--output_dir", str(work / name), "--resolution", str(resolution), "--max_train_steps",
            str(steps), "--latents_cache_dir", str(work / cache), *TRAIN_FLAGS]


def train_stages(model: Path, data: Path, work: Path, resolution: int, steps: int) -> dict:
    """Cache build (one step) then training on the built cache: build seconds, time to first step, steps/s."""
    build = run_stage(trainer_command(model, data, work, "build", resolution, 1), work / "hf_datasets")
    match = BUILD_RE.search(build["stderr"])
    if match is None:
        raise RuntimeError(f"no cache-build line in the trainer's log: {build['stderr'][-1500:]}")
    build["seconds"], build["bytes"] = float(match.group(1)), folder_bytes(work / "cache")
    train = run_stage(trainer_command(model, data, work, "train", resolution, steps + 1), work / "hf_datasets")
    stamps = step_stamps(work / "train")
    if len(stamps) < 2:
        raise RuntimeError(f"the train stage logged {len(stamps)} steps")
    train["first_step_s"] = stamps[0] - train["start"]
    train["steps_per_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"build": build, "train": train}


def read_shards(folder: str, rows: int) -> None:
    """The read stage's own process: open the folder as the trainer does, read rows at random, print the timings."""
    from trainer.shards import ShardTable

    started = time.perf_counter()
    table = ShardTable(folder)
    opened = time.perf_counter()
    picks = np.random.default_rng(0).choice(len(table), size=min(rows, len(table)), replace=False)
    for index in picks:
        table[int(index)]["image"].load()
    print(f"shard_read open_s {opened - started:.3f} read_s {time.perf_counter() - opened:.3f} rows {len(picks)}",
          flush=True)


def read_stage(folder: Path) -> dict:
    """read_shards under peak_rss: open seconds, rows read and their seconds."""
    code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from bench.bench_scale import read_shards; "
            f"read_shards({str(folder)!r}, {READ_ROWS})")
    read = run_stage([sys.executable, "-c", code], folder.parent / "hf_datasets")
    fields = next(line for line in read["stdout"].splitlines() if line.startswith("shard_read")).split()
    read.update(open_s=float(fields[2]), read_s=float(fields[4]), rows_read=int(fields[6]))
    return read


def merge_stage(folder: Path) -> dict:
    """create.py --merge on finished shards: seconds, RSS, index bytes."""
    merged = run_stage([sys.executable, str(CREATE), "--merge", str(folder)], folder.parent / "hf_datasets")
    merged["bytes"] = (folder / "shards_index.parquet").stat().st_size
    return merged


def shard_train_stage(model: Path, folder: Path, work: Path, resolution: int, steps: int) -> dict:
    """The trainer on the shards without the cache: time to first step and steps/s."""
    command = [c for c in trainer_command(model, folder, work, "strain", resolution, steps + 1)
               if c != "--cache_latents"]
    train = run_stage(command, work / "hf_datasets")
    stamps = step_stamps(work / "strain")
    if len(stamps) < 2:
        raise RuntimeError(f"the strain stage logged {len(stamps)} steps")
    train.update(first_step_s=stamps[0] - train["start"], steps_per_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return train


def shard_stages(parquet: Path, model: Path, work: Path, resolution: int, steps: int, build: bool = True) -> dict:
    """create.py --output_format webdataset, the merge, the read, the cache build and training from the shards."""
    folder = work / "shards"
    created = run_stage([sys.executable, str(CREATE), "--input", str(parquet), "--output_dir", str(folder),
                         "--resolution", str(resolution), "--output_format", "webdataset"], work / "hf_datasets")
    created["bytes"] = folder_bytes(folder)
    stages = {"shards": created, "merge": merge_stage(folder), "read": read_stage(folder)}
    if build:
        stages["sbuild"] = shard_build_stage(model, folder, work, resolution)
    stages["strain"] = shard_train_stage(model, folder, work, resolution, steps)
    return stages


def shard_build_stage(model: Path, folder: Path, work: Path, resolution: int) -> dict:
    """The cache build from the shards (one step), timed by its "Latent cache built" line."""
    # Its own cache folder: its bytes are not the image folder's cache's.
    build = run_stage(trainer_command(model, folder, work, "sbuild", resolution, 1, "scache"), work / "hf_datasets")
    match = BUILD_RE.search(build["stderr"])
    if match is None:
        raise RuntimeError(f"no cache-build line in the trainer's log: {build['stderr'][-1500:]}")
    build["seconds"], build["bytes"] = float(match.group(1)), folder_bytes(work / "scache")
    return build


def write_index_shards(folder: Path, rows: int, resolution: int) -> None:
    """A finished sharded folder of rows samples written directly (one fixed JPEG, distinct captions), no merge."""
    from diffusion_model.parquet_source import Row
    from diffusion_model.shards import ShardPlan, ShardWriter, write_settings
    from diffusion_model.create_job import JobTally

    plan = ShardPlan(rows, DEFAULT_SHARD_SIZE)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (resolution, resolution), (90, 120, 60)).save(buffer, format="JPEG", quality=95)
    jpeg = buffer.getvalue()
    for shard in range(plan.total):
        writer = ShardWriter(folder, shard, JobTally())
        for number in range(shard * DEFAULT_SHARD_SIZE + 1, min(rows, (shard + 1) * DEFAULT_SHARD_SIZE) + 1):
            writer.tally.rows_processed += 1
            writer.add(Row(number, f"img_{number:07d}.jpg", None, None), [caption(number)], jpeg, {})
        writer.finish()
    write_settings(folder, {"output_format": "webdataset", "shard_size": DEFAULT_SHARD_SIZE, "rows": rows,
                            "shards": plan.total, "rows_in_inputs": rows})


def index_stages(rows: int, model: Path, work: Path, args) -> dict:
    """The stages that encode no image, on a directly written sharded folder of rows samples."""
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "shards"
    started = time.perf_counter()
    write_index_shards(folder, rows, args.resolution)
    print(f"{rows} rows of shards written in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    stages = {"merge": merge_stage(folder), "read": read_stage(folder)}
    stages["strain"] = shard_train_stage(model, folder, work, args.resolution, args.steps)
    return stages


def measure(rows: int, model: Path, work: Path, args) -> dict:
    """Every stage at one size."""
    work.mkdir(parents=True, exist_ok=True)
    parquet = make_source(work / "source.parquet", rows)
    stages = {}
    if not args.skip_imagefolder:
        stages.update(create_stages(parquet, work / "data", args.resolution))
        stages.update(train_stages(model, work / "data", work, args.resolution, args.steps))
    if not args.skip_shards:
        stages.update(shard_stages(parquet, model, work, args.resolution, args.steps, not args.skip_cache_build))
    stages["source_bytes"] = parquet.stat().st_size
    return stages


def stage_time(m: dict) -> str:
    """The time column: first step and steps/s, the read's open and per-row times, or the stage's seconds."""
    if "first_step_s" in m:
        return f"first step {m['first_step_s']:.1f} s, {m['steps_per_s']:.2f} steps/s"
    if "open_s" in m:
        return f"open {m['open_s']:.2f} s, {1000 * m['read_s'] / max(1, m['rows_read']):.3f} ms/row read"
    return f"{m['seconds']:.1f} s"


def stage_row(stage: str, rows: int, m: dict) -> str:
    """One table row: stage, N, peak RSS, seconds per row, bytes per row, and the others' CPU use."""
    per_row = f"{1000 * m['seconds'] / rows:.3f}" if "first_step_s" not in m and "open_s" not in m else "-"
    size = f"{m['bytes'] / rows:.0f}" if "bytes" in m else "-"
    extra = stage_time(m)
    quiet = "" if m["others_cores"] <= MAX_BACKGROUND else " (not quiet)"
    return (f"| {stage} | {rows} | {m['rss_mib']:.0f} | {per_row} | {size} | {extra} | "
            f"{m['others_cores']:.2f}{quiet} |")


def table(results: dict) -> list:
    """The markdown table of every stage at every size."""
    lines = ["| stage | rows | peak RSS MiB | ms/row | bytes/row | time | other processes' cores |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        lines += [stage_row(stage, rows, stages[stage]) for rows, stages in results.items() if stage in stages]
    return lines


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def net_per_row(results: dict, baseline: Optional[tuple], stage: str) -> list:
    """Seconds per row of each size, less the baseline run's seconds (the fixed start-up) when there is one."""
    base_rows, base_s = (baseline[0], baseline[1][stage]["seconds"]) if baseline else (0, 0.0)
    return [(results[n][stage]["seconds"] - base_s) / (n - base_rows) for n in sorted(results)]


def targets(results: dict, index_run: Optional[tuple] = None, baseline: Optional[tuple] = None) -> list:
    """The targets, judged from the smallest to the largest size run (and the image-free run, when there is one);
    seconds per row net of the baseline run's start-up when there is one."""
    sizes = sorted(results)
    small, large = results[sizes[0]], results[sizes[-1]]
    lines = [f"targets ({sizes[0]} -> {sizes[-1]} rows):"]
    present = [stage for stage in STAGES if stage in small]
    for stage in present:
        growth = large[stage]["rss_mib"] - small[stage]["rss_mib"]
        lines.append(f"  {stage}: peak RSS grows {growth:+.0f} MiB (target <= {RSS_GROWTH_MIB:.0f}): "
                     f"{verdict(growth <= RSS_GROWTH_MIB)}")
    for stage in [s for s in present if s in TIMED_STAGES]:
        raw = [results[n][stage]["seconds"] / n for n in sizes]
        per_row = net_per_row(results, baseline, stage)
        growth, slope_growth = per_row_growth(raw), slope_ratio(results, stage)
        ok = growth <= TIME_SPREAD and (slope_growth is None or slope_growth <= TIME_SPREAD)
        slope_text = (f"not judged (the last interval adds < {MEASURABLE_S:g} s)" if slope_growth is None else f"{slope_growth:.2f}x")
        net = f"; net of {baseline[0]}-row start-up spread {max(per_row) / min(per_row):.2f}x" if baseline else ""
        lines.append(f"  {stage}: seconds per row grow {growth:.2f}x, per added row {slope_text} (target <= "
                     f"{TIME_SPREAD}x): {verdict(ok)}; raw spread {max(raw) / min(raw):.2f}x{net}; "
                     f"{marginal(results, stage)}")
    for stage in [s for s in present if s in ("train", "strain")]:
        rates = [results[n][stage]["steps_per_s"] for n in sizes]
        lines.append(f"  {stage}: steps/s spread {max(rates) / min(rates):.2f}x (target <= {TIME_SPREAD}x): "
                     f"{verdict(max(rates) / min(rates) <= TIME_SPREAD)}")
    if index_run is None:
        lines.append("  time to first step at 1M rows < 60 s: not measured (--index_rows 0)")
    else:
        rows, stages = index_run
        first = stages["strain"]["first_step_s"]
        lines.append(f"  time to first step from shards at {rows} rows: {first:.1f} s (target < 60 s): "
                     f"{verdict(first < 60)}")
    busy = [f"{stage} at {n}" for n, stages in results.items() for stage in present
            if stages[stage]["others_cores"] > MAX_BACKGROUND]
    if busy:
        lines.append(f"  NOT QUIET ({', '.join(busy)}): other processes used more than {MAX_BACKGROUND} cores; "
                     "rerun those sizes on an idle machine before trusting the time targets")
    return lines


def per_row_growth(per_row: list) -> float:
    """The largest factor by which seconds per row rise from a smaller size to a larger one (1.0 if they never do)."""
    return max([1.0] + [later / earlier for i, earlier in enumerate(per_row) for later in per_row[i + 1:]])


def slopes(results: dict, stage: str) -> list:
    """(seconds added, seconds per added row) between consecutive sizes."""
    sizes = sorted(results)
    added = [results[b][stage]["seconds"] - results[a][stage]["seconds"] for a, b in zip(sizes, sizes[1:])]
    return [(seconds, seconds / (b - a)) for seconds, a, b in zip(added, sizes, sizes[1:])]


def slope_ratio(results: dict, stage: str) -> Optional[float]:
    """Seconds per added row between the last two sizes over those between the first two; None when the last
    interval adds under MEASURABLE_S seconds (or there are fewer than three sizes)."""
    pairs = slopes(results, stage)
    if len(pairs) < 2 or pairs[-1][0] < MEASURABLE_S:
        return None
    return pairs[-1][1] / pairs[0][1] if pairs[0][1] > 0 else float("inf")


def marginal(results: dict, stage: str) -> str:
    """Seconds per added row between consecutive sizes (the slope, free of fixed start-up costs)."""
    return "ms per added row " + ", ".join(f"{1000 * slope:.3f}" for _, slope in slopes(results, stage))


def figures(measured):
    """A stage's figures without its captured output (a plain value as it is)."""
    return {f: v for f, v in measured.items() if f not in ("stderr", "stdout")} if isinstance(measured, dict) else measured


def load_line() -> str:
    """The machine's load averages and core count."""
    return f"load averages {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every size, print the table and the targets."""
    args = parse_args(argv)
    if not 0 <= args.baseline_rows < min(args.sizes):
        raise UsageError(f"--baseline_rows must be 0 or fewer than the smallest size ({min(args.sizes)}), "
                         f"got {args.baseline_rows}")
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    model = make_model(work / "model")
    print(f"before: {load_line()}", flush=True)
    baseline = None
    if args.baseline_rows:
        baseline = (args.baseline_rows, measure(args.baseline_rows, model, work / "baseline", args))
        print(f"baseline {args.baseline_rows} rows done ({load_line()})", file=sys.stderr, flush=True)
        shutil.rmtree(work / "baseline", ignore_errors=True)
    results = {}
    for rows in sorted(args.sizes):
        results[rows] = measure(rows, model, work / str(rows), args)
        print(f"{rows} rows done ({load_line()})", file=sys.stderr, flush=True)
        for line in table({rows: results[rows]})[2:]:
            print(line, file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work / str(rows), ignore_errors=True)
    index_run = None
    if args.index_rows:
        index_run = (args.index_rows, index_stages(args.index_rows, model, work / "index", args))
        if not args.keep:
            shutil.rmtree(work / "index", ignore_errors=True)
    print(f"after: {load_line()}")
    print(f"tiny model, {args.resolution} px, distinct captions, {args.steps} timed steps of batch 4")
    print("\n".join([*table(results), *(table({index_run[0]: index_run[1]})[2:] if index_run else []),
                     *(table({baseline[0]: baseline[1]})[2:] if baseline else []),
                     *targets(results, index_run, baseline)]))
    runs = {str(n): st for n, st in results.items()}
    if index_run:
        runs[f"index-{index_run[0]}"] = index_run[1]
    if baseline:
        runs[f"baseline-{baseline[0]}"] = baseline[1]
    (work / "results.json").write_text(json.dumps({name: {k: figures(m) for k, m in st.items()}
                                                   for name, st in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
