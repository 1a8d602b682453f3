"""Benchmark the trainer with and without --cache_latents, in the seed's configuration, in the same run.

Seed configuration: batch 1, gradient accumulation 4, gradient checkpointing, EMA, constant LR (train.sh's recipe),
--center_crop in both runs so they do the same work. Each run is a real `train_text_to_image.py` subprocess on a
randomly initialised pipeline from stand_in/tiny_model.py and a data folder made by create.py + format.py.

What is timed:
  - steps/s, samples/s: after warm-up, from the first to the last optimizer step as the trainer's tensorboard log
    stamps them (the first step's allocations, cuDNN autotuning and compilation are left out). Each stamp follows
    the step's float(grad_norm), a device sync, so both ends sit at the same point of a step and no queued GPU work
    is cut off;
  - loop: the whole training loop from the trainer's own log line, warm-up included;
  - build: the latent cache build (cached runs only; every image and caption encoded once);
  - loop + build: what a single fresh cached run pays; the build is reused by every later run on the same data.
Peak memory: the run's peak RSS on CPU (bench/peak_rss.py); on GPU the loop's peak CUDA memory, allocated (tensors)
and reserved (the caching allocator's pool, what nvidia-smi and an OOM see).
A run that fails (out of memory or otherwise) is recorded in its cell, and the table goes on.

Configurations:
  CPU  tiny           the test model at 64 px
       vae_realistic  SD1.5's VAE (83.7M parameters, random weights) + a small UNet (23.6M) at 256 px;
                      bar: cached loop >= 1.3x the uncached loop
  GPU  sd15           SD1.5-shaped UNet, VAE and text encoder at 512 px, fp16, through every memory mode
                      (--sd15_rows memory), and the speed rows (--sd15_rows speed): ours uncached and cached,
                      diffusers' own script (--reference PATH, uncached: it has no cache) in the same
                      configuration, and train.sh's THROUGHPUT=1 recipe (bf16, batch --throughput_batch, no
                      accumulation or checkpointing, channels-last, torch.compile, fused AdamW; its first
                      THROUGHPUT_WARMUP steps, where it compiles, are not timed) with its utilisation: samples/s x
                      2.41 TFLOP (SD1.5 UNet forward + backward at 512 px) / the card's dense bf16 peak (989 TFLOP/s
                      on H100/H200). Goals: ours cached >= 1.4x the reference's samples/s at no more peak memory;
                      throughput 130 samples/s (MLPerf v4.0's per-GPU level).
LoRA rows: the same runs with --lora_rank 16 --learning_rate 1e-4 (adapters on the attention projections, EMA of
the adapters), beside the full fine-tune at the same cache setting; bar on vae_realistic: LoRA samples/s >= full.
On CUDA every run goes through bench/cuda_peak.py, so ours and the reference report the same figure: the whole
process's peak CUDA memory (allocated and reserved), cache build and model loading included.
Run: python bench/bench_train.py [--configs tiny vae_realistic] [--max_attempts 3] [--work_dir DIR]
     python bench/bench_train.py --configs sd15 --sd15_rows speed --reference PATH/train_text_to_image.py
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Sequence

from bench.bench_create import cpu_counters
from utils.cli import ArgumentParser, UsageError, run_main

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINER = REPO_ROOT / "train_text_to_image.py"
PEAK_RSS = Path(__file__).resolve().with_name("peak_rss.py")
CUDA_PEAK = Path(__file__).resolve().with_name("cuda_peak.py")
CUDA_PEAK_RE = re.compile(r"cuda_peak allocated ([\d.]+) GiB reserved ([\d.]+) GiB")
SD15_TFLOP_PER_SAMPLE = 2.41  # SD1.5 UNet forward + backward at 512 px
DENSE_BF16_PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense
SPEED_GOAL = 1.4  # ours cached vs the reference, samples/s
THROUGHPUT_GOAL = 130.0  # samples/s per GPU, MLPerf v4.0's SD training level
THROUGHPUT_WARMUP = 3  # untimed steps: compilation, and recompilation on the second and third
THROUGHPUT_FLAGS = ["--mixed_precision", "bf16", "--gradient_accumulation_steps", "1", "--optimizer_impl", "fused",
                    "--foreach_ema", "--channels_last", "--torch_compile", "--use_ema", "--learning_rate", "1e-06",
                    "--max_grad_norm", "1", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                    "--checkpointing_steps", "1000000", "--report_to", "tensorboard", "--center_crop", "--seed", "0"]
BAR_SPEEDUP = 1.3
GRADIENT_ACCUMULATION = 4  # the seed's recipe, batch 1
SEED_FLAGS = ["--train_batch_size", "1", "--gradient_accumulation_steps", str(GRADIENT_ACCUMULATION), "--gradient_checkpointing",
              "--use_ema", "--learning_rate", "1e-06", "--max_grad_norm", "1", "--lr_scheduler", "constant",
              "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000", "--report_to", "tensorboard",
              "--center_crop", "--seed", "0"]
LOOP_RE = re.compile(r"Training loop: (\d+) optimizer steps in ([\d.]+) s: ([\d.]+) steps/s, ([\d.]+) samples/s"
                     r"(?:, peak CUDA memory allocated ([\d.]+) GiB)?(?:, reserved ([\d.]+) GiB)?")
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")
STEP_TAG = "train_loss"  # logged at every optimizer step
BUILD_RE = re.compile(r"Latent cache built in ([\d.]+) s")
LORA_RANK = 16
LORA_FLAGS = ["--lora_rank", str(LORA_RANK), "--learning_rate", "1e-4"]


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: model preset, resolution, data size, run length, precision."""

    preset: str
    resolution: int
    images: int
    steps: int
    mixed_precision: str


CONFIGS = {
    "tiny": Config("tiny", 64, 16, 8, "no"),
    "vae_realistic": Config("vae_realistic", 256, 8, 2, "no"),
    "sd15": Config("sd15", 512, 64, 12, "fp16"),
}
# GPU memory modes: flags added to the seed configuration.
MEMORY_MODES = {
    "AdamW fused (auto)": [],
    "AdamW foreach": ["--optimizer_impl", "foreach"],
    "8-bit AdamW": ["--use_8bit_adam"],
    "offload EMA": ["--offload_ema"],
    "foreach EMA": ["--foreach_ema"],
    "8-bit AdamW + offload EMA": ["--use_8bit_adam", "--offload_ema"],
}


@dataclass
class RunResult:
    """What one trainer run measured (peak CUDA: the loop's for ours, the process's when cuda_peak.py wrapped it)."""

    steps_per_s: float
    samples_per_s: float
    loop_s: float
    build_s: Optional[float]
    peak_rss_mib: float
    peak_cuda_gib: Optional[float]
    peak_reserved_gib: Optional[float]
    others_cores: float
    process_peak_gib: Optional[float] = None
    process_reserved_gib: Optional[float] = None


@dataclass(frozen=True)
class Timing:
    """How to read a run's throughput: samples per optimizer step, untimed first steps, and whether the script
    prints our trainer's loop line (diffusers' reference does not)."""

    samples_per_step: int = GRADIENT_ACCUMULATION
    warmup: int = 1
    loop_line: bool = True


class RunFailed(RuntimeError):
    """A trainer run that did not finish: the short text its table cell shows, and the log's tail."""

    def __init__(self, cell: str, tail: str):
        super().__init__(f"{cell}: {tail}")
        self.cell = cell


def parse_args(argv: Optional[Sequence[str]]):
    """Command line."""
    import torch

    default = ["sd15"] if torch.cuda.is_available() else ["tiny", "vae_realistic"]
    parser = ArgumentParser(description="Time the trainer with and without --cache_latents.")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=default,
                        help=f"Configurations to run (default here: {' '.join(default)}).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Optimizer steps per run (default: the configuration's own: tiny 8, vae_realistic 2, "
                             "sd15 12).")
    parser.add_argument("--max_background", type=float, default=0.3,
                        help="Cores other processes may use during a run for it to count as quiet (default 0.3).")
    parser.add_argument("--max_attempts", type=int, default=2,
                        help="Runs of each pair before giving up waiting for a quiet one (default 2).")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "bench_train"),
                        help="Scratch folder for models, data and outputs, deleted and recreated (default: "
                             "$TMPDIR/bench_train).")
    parser.add_argument("--sd15_rows", choices=("speed", "memory", "all"), default="all",
                        help="sd15 table rows: 'speed' (ours uncached and cached, the reference, the throughput "
                             "recipe), 'memory' (every memory mode and LoRA), or 'all' (default).")
    parser.add_argument("--reference", default=None,
                        help="Path to a copy of diffusers' examples/text_to_image/train_text_to_image.py, run in the "
                             "same configuration beside ours (sd15 speed rows; the project does not ship it).")
    parser.add_argument("--throughput_batch", type=int, default=32,
                        help="Batch of the throughput row (default 32, train.sh's THROUGHPUT_BATCH).")
    parser.add_argument("--throughput_steps", type=int, default=20,
                        help=f"Optimizer steps of the throughput row, the first {THROUGHPUT_WARMUP} untimed "
                             "(default 20).")
    parser.add_argument("--model", default=None,
                        help="A saved pipeline to use instead of building the configuration's random one (one "
                             "configuration only), e.g. the GPU check's SD1.5-shaped model.")
    return parser.parse_args(argv)


def make_model(preset: str, folder: Path) -> Path:
    """Save the preset's random pipeline (in a subprocess, so this process stays small)."""
    subprocess.run([sys.executable, "-m", "stand_in.tiny_model", str(folder), "--preset", preset], cwd=REPO_ROOT,
                   check=True, capture_output=True)
    return folder


def make_data(images: int, resolution: int, folder: Path) -> Path:
    """DATA_DIR as users build it: a sample RSICD Parquet → create.py → format.py."""
    from diffusion_model.sample_data import make_sample_parquet

    parquet = make_sample_parquet(folder / "rsicd.parquet", images, seed=0)
    data = folder / "data"
    for script, args in (("create.py", ["--parquet_path", parquet, "--output_dir", data, "--resolution", resolution]),
                         ("format.py", ["--caption_file", data / "captions.txt", "--output_file",
                                        data / "metadata.jsonl"])):
        subprocess.run([sys.executable, str(REPO_ROOT / "diffusion_model" / script), *map(str, args)], check=True,
                       capture_output=True)
    return data


def wrapped(script: Path) -> list:
    """The command prefix that runs a training script under peak_rss.py, and on CUDA under cuda_peak.py too."""
    import torch

    inner = [sys.executable, str(CUDA_PEAK)] if torch.cuda.is_available() else [sys.executable]
    return [sys.executable, str(PEAK_RSS), *inner, str(script)]


def trainer_command(model: Path, data: Path, config: Config, steps: int, output: Path, extra: Sequence[str],
                    script: Path = TRAINER) -> list:
    """A training script (ours unless given) in the seed configuration."""
    return [*wrapped(script), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(output), "--resolution", str(config.resolution), "--max_train_steps", str(steps),
            "--mixed_precision", config.mixed_precision, *SEED_FLAGS, *extra]


def throughput_command(model: Path, data: Path, config: Config, steps: int, batch: int, output: Path) -> list:
    """Our trainer in train.sh's THROUGHPUT=1 recipe, on cached latents."""
    return [*wrapped(TRAINER), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(output), "--resolution", str(config.resolution), "--max_train_steps", str(steps),
            "--train_batch_size", str(batch), *THROUGHPUT_FLAGS, "--cache_latents", "--latents_cache_dir",
            str(output.parent / "cache")]


def step_times(output: Path) -> List[float]:
    """Wall-clock stamps of the run's optimizer steps, in step order, from its tensorboard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stamps = {}
    for events in output.rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if STEP_TAG in accumulator.Tags()["scalars"]:
            stamps.update({event.step: event.wall_time for event in accumulator.Scalars(STEP_TAG)})
    return [stamps[step] for step in sorted(stamps)]


def after_warmup(stamps: Sequence[float], fallback_steps: int, fallback_s: float, warmup: int = 1) -> tuple:
    """(optimizer steps, seconds) from the stamp of step `warmup` to the last; the whole loop if too few stamps."""
    if len(stamps) < warmup + 1:
        return fallback_steps, fallback_s
    return len(stamps) - warmup, stamps[-1] - stamps[warmup - 1]


def failure_cell(returncode: int, stderr: str) -> str:
    """What a failed run's cell says: OOM, or its exit code."""
    if any(marker in stderr for marker in OOM_MARKERS):
        return "OOM"
    return f"failed (exit {returncode})"


def run_trainer(command: list, output: Path, timing: Timing = Timing()) -> RunResult:
    """Run one training, parse its throughput, and measure what other processes used meanwhile; RunFailed if not."""
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    (busy_before, _), started = cpu_counters(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    (busy_after, _), seconds = cpu_counters(), time.perf_counter() - started
    loop, stamps = LOOP_RE.search(done.stderr), step_times(output)
    if done.returncode != 0 or (loop is None if timing.loop_line else len(stamps) < timing.warmup + 1):
        raise RunFailed(failure_cell(done.returncode, done.stderr), done.stderr.strip()[-2000:])
    build, process = BUILD_RE.search(done.stderr), CUDA_PEAK_RE.search(done.stderr)
    fields = done.stdout.strip().splitlines()[-1].split()
    rss_mib, cpu_s = float(fields[1]), float(fields[3])
    loop_steps, loop_s = (int(loop.group(1)), float(loop.group(2))) if loop else (len(stamps), seconds)
    steps, timed_s = after_warmup(stamps, loop_steps, loop_s, timing.warmup)
    return RunResult(steps_per_s=steps / timed_s, samples_per_s=steps * timing.samples_per_step / timed_s,
                     loop_s=loop_s, build_s=float(build.group(1)) if build else None,
                     peak_rss_mib=rss_mib, peak_cuda_gib=float(loop.group(5)) if loop and loop.group(5) else None,
                     peak_reserved_gib=float(loop.group(6)) if loop and loop.group(6) else None,
                     others_cores=max(0.0, busy_after - busy_before - cpu_s) / seconds,
                     process_peak_gib=float(process.group(1)) if process else None,
                     process_reserved_gib=float(process.group(2)) if process else None)


def quiet_pair(make_command, output: Path, args, extra: Sequence[str] = ()) -> tuple:
    """(uncached, cached) results, repeating the pair until both runs were quiet or attempts run out."""
    pairs = []
    for _ in range(args.max_attempts):
        uncached = run_trainer(make_command(output / "uncached", [*extra]), output / "uncached")
        shutil.rmtree(output / "cache", ignore_errors=True)  # the cached run pays for its build every time
        cached = run_trainer(make_command(output / "cached", [*extra, "--cache_latents", "--latents_cache_dir",
                                                              str(output / "cache")]), output / "cached")
        pairs.append((uncached, cached))
        if max(uncached.others_cores, cached.others_cores) <= args.max_background:
            break
    return min(pairs, key=lambda pair: pair[0].others_cores + pair[1].others_cores)


def describe(name: str, result: RunResult) -> str:
    """One results line of a run."""
    memory = (f"peak CUDA {result.peak_cuda_gib:.2f} GiB" if result.peak_cuda_gib is not None
              else f"peak RSS {result.peak_rss_mib:.0f} MiB")
    build = f", cache build {result.build_s:.1f} s" if result.build_s is not None else ""
    return (f"    {name:<9} loop {result.loop_s:7.1f} s: {result.steps_per_s:.4f} opt-steps/s, "
            f"{result.samples_per_s:.3f} samples/s{build}; {memory}; others used {result.others_cores:.2f} cores")


def cpu_report(name: str, config: Config, steps: int, uncached: RunResult, cached: RunResult,
               max_background: float) -> List[str]:
    """The results block of one CPU configuration, with the ratios and the bar."""
    ratio = cached.samples_per_s / uncached.samples_per_s
    with_build = uncached.loop_s / (cached.loop_s + (cached.build_s or 0.0))
    samples = steps * GRADIENT_ACCUMULATION
    lines = [f"  {name}: {config.resolution} px, {config.images} images, {steps} optimizer steps "
             f"({samples} samples, {samples / config.images:.1f} epochs)",
             describe("uncached", uncached), describe("cached", cached),
             f"    ratio cached/uncached, loop only: {ratio:.2f}x; loop + one cache build: {with_build:.2f}x; "
             f"frozen-encoder share of an uncached step: {1 - 1 / ratio:.0%}"]
    if name == "vae_realistic":
        lines.append(f"    bar: loop ratio >= {BAR_SPEEDUP}x: {'PASS' if ratio >= BAR_SPEEDUP else 'FAIL'}")
    if max(uncached.others_cores, cached.others_cores) > max_background:
        lines.append(f"    NOT QUIET: other processes used more than {max_background} cores during a run; the ratio "
                     "is not trustworthy, rerun on an idle machine")
    return lines


def attempt(command: list, output: Path, timing: Timing = Timing()):
    """The run's RunResult, or its failure's cell text (OOM, exit code) so the table goes on."""
    try:
        result = run_trainer(command, output, timing)
        print(describe(output.name, result), file=sys.stderr, flush=True)  # seen even if the bench is stopped
        return result
    except RunFailed as failure:
        print(f"bench_train: {output.name}: {failure}", file=sys.stderr)
        return failure.cell


def gib(value: Optional[float]) -> str:
    """A memory figure for the table, '-' when not measured."""
    return "-" if value is None else f"{value:.2f}"


def gpu_row(mode: str, cache: str, result) -> str:
    """One table row: throughput and peak memory, or the failure in every cell."""
    if isinstance(result, str):
        return f"    | {mode} | {cache} | {result} | - | - | - | - |"
    return (f"    | {mode} | {cache} | {result.samples_per_s:.2f} | {result.steps_per_s:.3f} | "
            f"{gib(result.peak_cuda_gib)} | {gib(result.peak_reserved_gib)} | {gib(result.process_reserved_gib)} |")


def lora_report(name: str, full: tuple, lora: tuple, max_background: float) -> List[str]:
    """LoRA rows beside the full fine-tune's, per cache setting, with the vae_realistic bar."""
    lines = [describe(f"LoRA r{LORA_RANK} uncached", lora[0]), describe(f"LoRA r{LORA_RANK} cached", lora[1])]
    ratios = [lora_run.samples_per_s / full_run.samples_per_s for full_run, lora_run in zip(full, lora)]
    lines.append(f"    ratio LoRA/full samples/s: uncached {ratios[0]:.2f}x, cached {ratios[1]:.2f}x")
    if name == "vae_realistic":
        lines.append(f"    bar: LoRA samples/s >= full fine-tune's: {'PASS' if min(ratios) >= 1 else 'FAIL'}")
    if max(run.others_cores for run in lora) > max_background:
        lines.append(f"    NOT QUIET (LoRA runs): other processes used more than {max_background} cores")
    return lines


def memory_rows(command, cache: List[str], work: Path) -> List[tuple]:
    """Every other memory mode, and LoRA, with the cache."""
    rows = []
    for mode, flags in list(MEMORY_MODES.items())[1:]:
        rows.append((mode, "yes", attempt(command(work / "mode", [*flags, *cache]), work / "mode")))
    for label, flags in ((f"LoRA r{LORA_RANK}", LORA_FLAGS),
                         (f"LoRA r{LORA_RANK} + 8-bit AdamW", [*LORA_FLAGS, "--use_8bit_adam"])):
        rows.append((label, "yes", attempt(command(work / "lora", [*flags, *cache]), work / "lora")))
    return rows


def reference_row(config: Config, steps: int, model: Path, data: Path, work: Path, reference: Optional[str]):
    """diffusers' script in the seed configuration (uncached), or why it did not run."""
    import importlib.util

    if reference is None:
        return "not run (no --reference)"
    if importlib.util.find_spec("torchvision") is None:  # the reference's transforms need it
        return "not run (needs torchvision)"
    command = trainer_command(model, data, config, steps, work / "reference", [], script=Path(reference))
    return attempt(command, work / "reference", Timing(loop_line=False))


def speed_rows(config: Config, steps: int, model: Path, data: Path, work: Path, args) -> List[tuple]:
    """The reference beside ours, and the throughput recipe."""
    label = f"THROUGHPUT=1: bf16, batch {args.throughput_batch}, compiled, channels-last"
    throughput = attempt(throughput_command(model, data, config, args.throughput_steps, args.throughput_batch,
                                            work / "throughput" / "run"), work / "throughput" / "run",
                         Timing(samples_per_step=args.throughput_batch, warmup=THROUGHPUT_WARMUP))
    return [("diffusers' train_text_to_image.py", "no",
             reference_row(config, steps, model, data, work, args.reference)), (label, "yes", throughput)]


def speed_lines(uncached, cached, reference, throughput) -> List[str]:
    """The ratios and goals under the table, for the runs that finished."""
    lines = []
    if not isinstance(uncached, str) and not isinstance(cached, str):
        lines.append(f"    caching: {cached.samples_per_s / uncached.samples_per_s:.2f}x samples/s")
    if not isinstance(reference, str) and not isinstance(cached, str):
        ratio = cached.samples_per_s / reference.samples_per_s
        memory_ok = (cached.process_reserved_gib or 0) <= (reference.process_reserved_gib or 0)
        lines.append(f"    ours cached / reference: {ratio:.2f}x samples/s (goal >= {SPEED_GOAL}x: "
                     f"{'PASS' if ratio >= SPEED_GOAL else 'FAIL'}); process peak reserved "
                     f"{gib(cached.process_reserved_gib)} vs {gib(reference.process_reserved_gib)} GiB (goal: no "
                     f"more: {'PASS' if memory_ok else 'FAIL'})")
    if not isinstance(throughput, str):
        utilisation = throughput.samples_per_s * SD15_TFLOP_PER_SAMPLE / DENSE_BF16_PEAK_TFLOPS
        lines.append(f"    throughput: {throughput.samples_per_s:.1f} samples/s, utilisation {utilisation:.1%} of "
                     f"{DENSE_BF16_PEAK_TFLOPS:.0f} TFLOP/s (goal {THROUGHPUT_GOAL:.0f} samples/s: "
                     f"{'PASS' if throughput.samples_per_s >= THROUGHPUT_GOAL else 'FAIL'})")
    return lines


def gpu_report(config: Config, steps: int, model: Path, data: Path, work: Path, args) -> List[str]:
    """Ours uncached and cached at 512 px fp16, then the memory modes and/or the speed rows: one table."""
    command = partial(trainer_command, model, data, config, steps)
    cache = ["--cache_latents", "--latents_cache_dir", str(work / "cache")]
    uncached = attempt(command(work / "uncached", []), work / "uncached")
    shutil.rmtree(work / "cache", ignore_errors=True)  # the first cached run pays for its build
    rows = [("AdamW fused (auto)", "no", uncached),
            ("AdamW fused (auto)", "yes", attempt(command(work / "cached", cache), work / "cached"))]
    if args.sd15_rows in ("memory", "all"):
        rows += memory_rows(command, cache, work)
    speed = speed_rows(config, steps, model, data, work, args) if args.sd15_rows in ("speed", "all") else []
    cached = rows[1][2]
    build = f"; cache build {cached.build_s:.1f} s" if not isinstance(cached, str) else ""
    lines = [f"  sd15: {config.resolution} px fp16, {steps} optimizer steps (timed after the first){build}",
             "    | mode | cache | samples/s | opt-steps/s | loop peak allocated (GiB) | loop peak reserved (GiB) | "
             "process peak reserved (GiB) |", "    |---|---|---|---|---|---|---|",
             *(gpu_row(*row) for row in rows + speed)]
    return lines + speed_lines(uncached, cached, *(row[2] for row in speed or [("", "", "-")] * 2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build each configuration's model and data, run the pairs, print the results block."""
    args = parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.reference is not None and not Path(args.reference).is_file():
        raise UsageError(f"--reference '{args.reference}' is not a file: give the path of your copy of diffusers' "
                         "examples/text_to_image/train_text_to_image.py")
    if args.throughput_steps <= THROUGHPUT_WARMUP or args.throughput_batch < 1:
        raise UsageError(f"--throughput_steps must be over {THROUGHPUT_WARMUP} and --throughput_batch at least 1, "
                         f"got {args.throughput_steps} and {args.throughput_batch}")
    if args.model is not None and (len(args.configs) != 1 or not Path(args.model, "model_index.json").is_file()):
        raise UsageError(f"--model '{args.model}' needs one configuration and a saved pipeline folder")
    root = Path(args.work_dir)
    shutil.rmtree(root, ignore_errors=True)
    lines = [f"cores available: {len(os.sched_getaffinity(0))}; seed configuration: batch 1, GA 4, gradient "
             "checkpointing, EMA, centre crop"]
    for name in args.configs:
        config, work = CONFIGS[name], root / name
        steps = args.steps or config.steps
        model = Path(args.model) if args.model else make_model(config.preset, work / "model")
        data = make_data(config.images, config.resolution, work)
        if config.mixed_precision == "fp16":
            lines += gpu_report(config, steps, model, data, work, args)
            continue
        make_command = partial(trainer_command, model, data, config, steps)
        try:
            full = quiet_pair(make_command, work, args)
            lora = quiet_pair(make_command, work / "lora", args, LORA_FLAGS)
        except RunFailed as failure:
            print(f"bench_train: {name}: {failure}", file=sys.stderr)
            lines.append(f"  {name}: {failure.cell}")
            continue
        lines += cpu_report(name, config, steps, *full, args.max_background)
        lines += lora_report(name, full, lora, args.max_background)
    print("\n".join(["----- bench_train results -----", *lines, "-" * 31]))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
