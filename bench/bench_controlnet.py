"""Benchmark ControlNet training with and without --cache_latents, in the same run (issue 17's speed rows).

The ControlNet rows of bench_train.py's configurations: train_controlnet.py on a mask-conditioned folder made as users
make it (sample_data.py --masks -> create.py --conditioning_type mask -> format.py), in bench_train's seed recipe
(batch 1, gradient accumulation 4, gradient checkpointing, EMA, constant LR). With --cache_latents the target latents
and caption states come from the cache; the conditioning is still read every step.

  CPU  vae_realistic  SD1.5's VAE (random weights) + a small UNet at 256 px (the default here);
                      goal: the cached loop >= 3x the uncached one, at no more peak memory
       tiny           the test model at 64 px
  GPU  sd15           SD1.5-shaped models at 512 px, fp16 (the default on CUDA); with --reference PATH, diffusers'
                      examples/controlnet/train_controlnet.py in the same recipe, from the same rows as a local
                      dataset with an RGB view of each mask (it reads RGB conditioning only)
Timing and peak memory as in bench_train.py (steps after the first, from the tensorboard stamps; peak RSS on CPU,
peak CUDA memory on GPU). Not a timed test: run it on a quiet machine.
Run: python bench/bench_controlnet.py [--configs vae_realistic] [--steps 2] [--max_attempts 2] [--vae_batch_size N]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shutil
import subprocess
import tempfile
from functools import partial
from typing import List, Optional, Sequence

from bench.bench_train import (CONFIGS, GRADIENT_ACCUMULATION, SEED_FLAGS, Config, RunFailed, Timing, attempt,
                               describe, gib, make_model, quiet_pair, wrapped)
from utils.cli import ArgumentParser, UsageError, run_main

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINER = REPO_ROOT / "train_controlnet.py"
NUM_CLASSES = 5  # sample_data.py --masks draws 5 land-cover classes
GOAL_SPEEDUP = 3.0
# bench_train's recipe less --center_crop, which the ControlNet scripts do not have (they always centre-crop).
CONTROLNET_FLAGS = [flag for flag in SEED_FLAGS if flag != "--center_crop"]


def parse_args(argv: Optional[Sequence[str]]):
    """Command line."""
    import torch

    default = ["sd15"] if torch.cuda.is_available() else ["vae_realistic"]
    parser = ArgumentParser(description="Time ControlNet training with and without --cache_latents.")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=default,
                        help=f"Configurations to run (default here: {' '.join(default)}).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Optimizer steps per run (default: the configuration's own, as bench_train.py).")
    parser.add_argument("--max_background", type=float, default=0.3,
                        help="Cores other processes may use during a run for it to count as quiet (default 0.3).")
    parser.add_argument("--max_attempts", type=int, default=2,
                        help="Runs of each pair before giving up waiting for a quiet one (default 2).")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "bench_controlnet"),
                        help="Scratch folder, deleted and recreated (default: $TMPDIR/bench_controlnet).")
    parser.add_argument("--vae_batch_size", type=int, default=None,
                        help="The trainers' --vae_batch_size (default: theirs, the training batch size). The cache "
                             "build encodes this many images at once.")
    parser.add_argument("--reference", default=None,
                        help="Path to a copy of diffusers' examples/controlnet/train_controlnet.py (sd15 only).")
    parser.add_argument("--model", default=None,
                        help="A saved pipeline to use instead of the configuration's random one (one configuration).")
    return parser.parse_args(argv)


def make_mask_data(images: int, resolution: int, folder: Path) -> Path:
    """A ControlNet DATA_DIR as users build it: sample scenes with masks -> create.py -> format.py."""
    from diffusion_model.sample_data import make_sample_parquet

    parquet = make_sample_parquet(folder / "masks.parquet", images, seed=0, masks=True)
    data = folder / "data"
    steps = (("create.py", ["--parquet_path", parquet, "--output_dir", data, "--resolution", resolution,
                            "--conditioning_column", "mask", "--conditioning_type", "mask", "--num_classes",
                            NUM_CLASSES]),
             ("format.py", ["--caption_file", data / "captions.txt", "--output_file", data / "metadata.jsonl"]))
    for script, args in steps:
        subprocess.run([sys.executable, str(REPO_ROOT / "diffusion_model" / script), *map(str, args)], check=True,
                       capture_output=True)
    return data


def controlnet_command(model: Path, data: Path, config: Config, steps: int, output: Path, extra: Sequence[str]) -> list:
    """train_controlnet.py in the seed recipe."""
    return [*wrapped(TRAINER), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--output_dir", str(output), "--resolution", str(config.resolution), "--max_train_steps", str(steps),
            "--mixed_precision", config.mixed_precision, *CONTROLNET_FLAGS, *extra]


def reference_dataset(data: Path, folder: Path) -> Path:
    """The rows of a create.py folder as a local dataset diffusers' script loads: image, RGB conditioning, text."""
    import json

    import datasets
    from PIL import Image

    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    table = {"image": [str(data / row["file_name"]) for row in rows],
             "conditioning_image": [], "text": [row["text"] if isinstance(row["text"], str) else row["text"][0]
                                                for row in rows]}
    for number, row in enumerate(rows):
        rgb = folder / "rgb_conditioning" / f"{number:06d}.png"
        rgb.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(data / row["conditioning_image"]) as mask:
            mask.convert("RGB").save(rgb)
        table["conditioning_image"].append(str(rgb))
    features = datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                  "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(table, features=features)
    out = folder / "reference_dataset"
    dataset.to_parquet(str(out / "train.parquet"))
    return out


def reference_run(config: Config, steps: int, model: Path, data: Path, work: Path, reference: Optional[str]):
    """diffusers' ControlNet script in the seed recipe (it has no cache), or why it did not run."""
    import importlib.util

    if reference is None:
        return "not run (no --reference)"
    if importlib.util.find_spec("torchvision") is None:  # its transforms need it
        return "not run (needs torchvision)"
    dataset = reference_dataset(data, work)
    flags = [flag for flag in CONTROLNET_FLAGS if flag not in ("--use_ema",)]  # it has no EMA
    command = [*wrapped(Path(reference)), "--pretrained_model_name_or_path", str(model), "--dataset_name",
               str(dataset), "--output_dir", str(work / "reference"), "--resolution", str(config.resolution),
               "--max_train_steps", str(steps), "--mixed_precision", config.mixed_precision, *flags]
    return attempt(command, work / "reference", Timing(loop_line=False))


def report(name: str, config: Config, steps: int, uncached, cached, reference, max_background: float) -> List[str]:
    """The results block of one configuration: both runs, the ratio against the goal, the reference if it ran."""
    lines = [f"  {name}: {config.resolution} px {config.mixed_precision}, {config.images} images, {steps} optimizer "
             f"steps of {GRADIENT_ACCUMULATION} samples (timed after the first)"]
    if isinstance(uncached, str) or isinstance(cached, str):
        return lines + [f"    uncached: {uncached if isinstance(uncached, str) else 'ok'}; cached: "
                        f"{cached if isinstance(cached, str) else 'ok'}"]
    lines += [describe("uncached", uncached), describe("cached", cached)]
    ratio = cached.samples_per_s / uncached.samples_per_s
    memory = [(run.peak_cuda_gib if run.peak_cuda_gib is not None else run.peak_rss_mib) for run in (uncached, cached)]
    lines.append(f"    ratio cached/uncached: {ratio:.2f}x samples/s (goal >= {GOAL_SPEEDUP}x: "
                 f"{'PASS' if ratio >= GOAL_SPEEDUP else 'FAIL'}); peak memory cached {memory[1]:.2f} vs uncached "
                 f"{memory[0]:.2f} (goal: no more: {'PASS' if memory[1] <= memory[0] else 'FAIL'})")
    if not isinstance(reference, str):
        lines.append(describe("reference", reference))
        lines.append(f"    ours cached / diffusers' script: {cached.samples_per_s / reference.samples_per_s:.2f}x "
                     f"samples/s; process peak reserved {gib(cached.process_reserved_gib)} vs "
                     f"{gib(reference.process_reserved_gib)} GiB")
    elif reference:
        lines.append(f"    diffusers' script: {reference}")
    if max(uncached.others_cores, cached.others_cores) > max_background:
        lines.append(f"    NOT QUIET: other processes used more than {max_background} cores during a run")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build each configuration's model and mask data, run the pair (and the reference), print the results."""
    args = parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.reference is not None and not Path(args.reference).is_file():
        raise UsageError(f"--reference '{args.reference}' is not a file: give the path of your copy of diffusers' "
                         "examples/controlnet/train_controlnet.py")
    if args.model is not None and (len(args.configs) != 1 or not Path(args.model, "model_index.json").is_file()):
        raise UsageError(f"--model '{args.model}' needs one configuration and a saved pipeline folder")
    root = Path(args.work_dir)
    shutil.rmtree(root, ignore_errors=True)
    lines = []
    for name in args.configs:
        config, work = CONFIGS[name], root / name
        steps = args.steps or config.steps
        model = Path(args.model) if args.model else make_model(config.preset, work / "model")
        data = make_mask_data(config.images, config.resolution, work)
        try:
            encoder_batch = [] if args.vae_batch_size is None else ["--vae_batch_size", str(args.vae_batch_size)]
            uncached, cached = quiet_pair(partial(controlnet_command, model, data, config, steps), work, args,
                                          encoder_batch)
        except RunFailed as failure:
            print(f"bench_controlnet: {name}: {failure}", file=sys.stderr)
            lines.append(f"  {name}: {failure.cell}")
            continue
        reference = reference_run(config, steps, model, data, work, args.reference) if name == "sd15" else ""
        lines += report(name, config, steps, uncached, cached, reference, args.max_background)
    print("\n".join(["----- bench_controlnet results -----", *lines, "-" * 36]))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
