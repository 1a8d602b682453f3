"""Every path that only a GPU runs, as a PASS/FAIL table with time and peak memory per row (run by gpu_check.sh).

Each row is a function decorated with @row: it runs the project's scripts as users do (train.sh, generate.py,
evaluate.py) on tiny random models, then checks what they wrote; it raises CheckFailed (or anything) to fail and
returns a short note to pass. Rows share what earlier rows made through Check (the recipe run's output folder, the
models, the data), built on first use. To add a row, write one more @row function; the order of definition is the
order of the table.

GPU_CHECK_DEVICE=cpu runs the same rows at CPU sizes with bf16 in place of fp16, and reports the CUDA-only rows
SKIP: a smoke test of this script where no GPU exists. GPU_CHECK_ROWS=name,name runs only those rows.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

REPO = Path(__file__).resolve().parents[1]
PEAK_RSS = REPO / "bench" / "peak_rss.py"
# README's "16 GB" row (--use_8bit_adam --offload_ema): a 16 GB card has about 14.9 GiB, less the CUDA context.
CARD_16GB_LIMIT_GIB = 14.0
# README's "8 GB" LoRA row (LORA_RANK=16 with gradient checkpointing): an 8 GB card has about 7.4 GiB usable.
CARD_8GB_LIMIT_GIB = 7.0
LOOP_PEAK_RE = re.compile(r"peak CUDA memory allocated ([\d.]+) GiB(?:, reserved ([\d.]+) GiB)?")
PROMPT = "A satellite image of a crop field"
BLACK_MEAN = 8  # a validation/sample image darker than this on average is "black" (the fp16 VAE NaN failure)
# Rows at once on a GPU machine: each process spends most of its first minute importing and loading, little of it
# on the GPU, and the tiny rows use under 1 GiB each; the H200 machine has 16 cores.
DEFAULT_CUDA_JOBS = 6


class CheckFailed(Exception):
    """A row's check did not hold; the message is the row's note."""


@dataclass
class Row:
    """One table row: its name, whether it needs CUDA, the function that runs it, the rows whose output it reads
    (it starts after they end), and whether it must run alone (a measurement that other rows would disturb)."""

    name: str
    cuda_only: bool
    run: Callable[["Check"], Optional[str]]
    needs: tuple = ()
    alone: bool = False

    @property
    def key(self) -> str:
        """The name GPU_CHECK_ROWS and needs use: the function's."""
        return self.run.__name__


ROWS: List[Row] = []


def row(name: str, cuda_only: bool = False, needs: tuple = (), alone: bool = False):
    """Register the decorated function as the next table row."""

    def register(function):
        ROWS.append(Row(name, cuda_only, function, tuple(needs), alone))
        return function

    return register


def expect(condition: bool, message: str) -> None:
    """Fail the row with message unless condition holds."""
    if not condition:
        raise CheckFailed(message)


class MemoryWatch:
    """Peak GPU memory in use (nvidia-smi, every 0.2 s) over the check; what the card, not torch, sees."""

    def __init__(self):
        self.peak_mib = 0.0
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi: the rows still run, their memory column says so
            self._process = None
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        """Keep the largest reading."""
        for line in self._process.stdout:
            try:
                self.peak_mib = max(self.peak_mib, float(line.split(",")[0]))
            except ValueError:
                continue

    def stop(self) -> str:
        """Stop polling; the peak as the table's text."""
        if self._process is None:
            return "no nvidia-smi"
        self._process.terminate()
        self._process.wait()
        self._thread.join(timeout=2)
        return f"{self.peak_mib:.0f} MiB GPU"


class Check:
    """The run's settings, the logs, and what rows share, each made on first use."""

    def __init__(self, work: Path, device: str, log):
        self.work, self.log = work, log
        self.cuda = device == "cuda"
        # fp16 is the recipe's precision on a GPU; on CPU bf16 takes its place (fp16 is refused there).
        self.precision = "fp16" if self.cuda else "bf16"
        self.resolution = 64 if self.cuda else 32
        self.recipe: Optional[Path] = None  # the recipe row's output folder, once it passed
        self._made, self._locks, self._lock = {}, {}, threading.Lock()
        self._row = threading.local()  # rows run in threads: each keeps its own peaks

    def start_row(self) -> None:
        """Reset this thread's row peaks."""
        self._row.rss_mib, self._row.reserved_gib = 0.0, 0.0

    def row_peak(self) -> str:
        """This thread's row peak: the trainers' own peak CUDA reserved on a GPU, else the processes' peak RSS."""
        if self.cuda and getattr(self._row, "reserved_gib", 0.0):
            return f"{self._row.reserved_gib:.2f} GiB reserved"
        rss = getattr(self._row, "rss_mib", 0.0)
        return f"{rss:.0f} MiB RSS" if rss else "-"  # "-": no process ran

    def once(self, key: str, make: Callable[[], object]):
        """make() the first time key is asked for, then the same value; a thread asking meanwhile waits for it."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]

    def env(self, **extra) -> dict:
        """Offline, no tracker login, this Python for train.sh's launcher."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, command: list, env: Optional[dict] = None) -> str:
        """Run command under peak_rss.py from the repo root; its output, each line stamped with the seconds since
        the start (where startup time goes), goes to the log as one block and is returned."""
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, str(PEAK_RSS), *map(str, command)], cwd=REPO,
                                   env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [(time.monotonic() - started, line.rstrip("\n")) for line in process.stdout]
        process.wait()
        output = "\n".join(line for _, line in lines)
        with self._lock:
            self.log.write(f"\n$ {' '.join(map(str, command))}\n")
            self.log.write("".join(f"[{seconds:7.2f} s] {line}\n" for seconds, line in lines))
            self.log.write(f"[{time.monotonic() - started:7.2f} s] exit {process.returncode}\n")
            self.log.flush()
        self._note_peaks(output)
        if process.returncode != 0:
            tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
            raise CheckFailed(f"exit {process.returncode}: {' | '.join(tail)[-300:]}")
        return output

    def _note_peaks(self, output: str) -> None:
        """Keep the row's largest peak RSS (peak_rss.py's last line) and trainer peak CUDA reserved."""
        last = output.strip().splitlines()[-1:] or [""]
        match = re.match(r"peak_rss_mib ([\d.]+)", last[0])
        if match:
            self._row.rss_mib = max(getattr(self._row, "rss_mib", 0.0), float(match.group(1)))
        for peak in LOOP_PEAK_RE.finditer(output):
            if peak.group(2):
                self._row.reserved_gib = max(getattr(self._row, "reserved_gib", 0.0), float(peak.group(2)))

    def python(self, *args, **kwargs) -> str:
        """A repo script or module with this Python."""
        return self.run([sys.executable, *args], **kwargs)

    def tiny_model(self) -> Path:
        """The tiny random pipeline."""
        return self.once("tiny_model", lambda: self._model("tiny"))

    def _model(self, preset: str) -> Path:
        """A random pipeline of stand_in/tiny_model.py's preset."""
        folder = self.work / f"model_{preset}"
        self.python("-m", "stand_in.tiny_model", folder, "--preset", preset)
        return folder

    def data(self, resolution: int, rows: int = 8) -> Path:
        """DATA_DIR as users make it: sample Parquet -> create.py -> format.py, at this resolution."""
        def make():
            root = self.work / f"data_{resolution}"
            parquet = root / "rsicd.parquet"
            self.python("diffusion_model/sample_data.py", "--output", parquet, "--num_rows", rows, "--seed", 0)
            self.python("diffusion_model/create.py", "--parquet_path", parquet, "--output_dir", root / "data",
                        "--resolution", resolution)
            self.python("diffusion_model/format.py", "--caption_file", root / "data" / "captions.txt",
                        "--output_file", root / "data" / "metadata.jsonl")
            return root / "data"
        return self.once(f"data_{resolution}", make)

    def train(self, name: str, *flags, model: Optional[Path] = None, cache: bool = True, resolution=None,
              output: Optional[Path] = None) -> tuple:
        """./train.sh (its recipe: batch 1, accumulation 4, EMA, checkpointing) with the row's flags last."""
        resolution = resolution or self.resolution
        output = output or self.work / name
        env = self.env(MODEL_NAME=model or self.tiny_model(), DATA_DIR=self.data(resolution), OUTPUT_DIR=output,
                       REPORT_TO="tensorboard", PUSH_TO_HUB=0, CACHE_LATENTS=int(cache))
        log = self.run(["./train.sh", f"--resolution={resolution}", f"--mixed_precision={self.precision}",
                        "--checkpointing_steps=1000", "--validation_epochs=1000", *flags], env=env)
        return output, log


# --- helpers of the checks


def load_weights(folder: Path) -> dict:
    """A diffusers model folder's safetensors weights."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    expect(bool(weights), f"no weights in {folder}")
    return weights


def image_stats(path: Path) -> tuple:
    """(mean, standard deviation) of an image's pixels."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return float(pixels.mean()), float(pixels.std())


def expect_not_black(paths: List[Path], what: str) -> None:
    """Every image has light and varies (a NaN through the VAE saves as black)."""
    expect(bool(paths), f"no {what}")
    for path in paths:
        mean, std = image_stats(path)
        expect(mean > BLACK_MEAN and std > 1, f"{path.name} is black or flat (mean {mean:.1f}, std {std:.1f})")


def recipe_output(check: Check) -> Path:
    """The recipe row's output folder (rows that read it declare needs=("recipe",...), so it has run)."""
    expect(check.recipe is not None, "needs the recipe row, which failed")
    return check.recipe


def loop_peak(log: str) -> str:
    """The trainer's own peak CUDA memory line, as a note."""
    match = LOOP_PEAK_RE.search(log)
    return f"loop peak {match.group(1)} GiB alloc, {match.group(2)} GiB reserved" if match else ""


def sd15_fits(check: Check, name: str, limit_gib: float, *flags) -> str:
    """Two 512 px steps of the SD1.5-shaped model with flags; the loop's peak reserved memory must be within limit."""
    model = check.once("sd15_model", lambda: check._model("sd15"))
    _, log = check.train(name, "--max_train_steps=2", *flags, model=model, resolution=512)
    match = LOOP_PEAK_RE.search(log)
    expect(match is not None and match.group(2) is not None, "no peak memory line in the trainer's log")
    reserved = float(match.group(2))
    expect(reserved <= limit_gib, f"reserved {reserved} GiB > {limit_gib} GiB")
    return f"{loop_peak(log)} (limit {limit_gib} GiB)"


def skipped_note(log: str) -> str:
    """The trainer's skipped-update count, when it printed one."""
    match = re.search(r"skipped (\d+) update", log)
    return f"{match.group(1)} fp16 update(s) skipped" if match else ""


# What one trainer process imports before its first step, then the CUDA start-up it pays (where there is CUDA).
STARTUP_PROBE = '''
import time
started = time.perf_counter()
import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from trainer import data, export, latent_cache, lora, loop, models
from trainer.validation import load_inference_scheduler
imported = time.perf_counter()
if torch.cuda.is_available():
    torch.cuda.init()
    torch.zeros(1, device="cuda").sum().item()
print(f"STARTUP imports {imported - started:.2f} s, CUDA init {time.perf_counter() - imported:.2f} s")
'''
# What train.sh's launcher process (utils/launch.py) imports before it starts the trainer's process.
LAUNCHER_PROBE = '''
import time
started = time.perf_counter()
from accelerate.commands.launch import launch_command
import train_text_to_image
print(f"LAUNCHER imports {time.perf_counter() - started:.2f} s")
'''
IMPORTTIME_RE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\S+)$", re.M)  # top level: not indented


def top_imports(output: str, count: int = 4) -> str:
    """The slowest top-level imports of a `python -X importtime` run, cumulative seconds each."""
    found = [(int(micros) / 1e6, name) for micros, name in IMPORTTIME_RE.findall(output)]
    return ", ".join(f"{name} {seconds:.1f}" for seconds, name in sorted(found, reverse=True)[:count])


# --- the rows, in table order


@row("start-up: a trainer process's imports and CUDA initialisation", alone=True)
def startup(check: Check) -> str:
    cold = check.python("-X", "importtime", "-c", STARTUP_PROBE)
    warm = check.python("-c", STARTUP_PROBE)  # the same again: files now in the page cache, bytecode compiled
    launcher = re.search(r"LAUNCHER (.*)", check.python("-c", LAUNCHER_PROBE)).group(1)
    figures = [re.search(r"STARTUP (.*)", out).group(1) for out in (cold, warm)]
    return f"trainer, first: {figures[0]} ({top_imports(cold)}); again: {figures[1]}; train.sh's launcher: {launcher}"



@row("train.sh recipe: cache, EMA, checkpoints, validation, fp32 export")
def recipe(check: Check) -> str:
    output, log = check.train("recipe", "--max_train_steps=4", "--checkpointing_steps=2", "--validation_epochs=1")
    for step in (2, 4):
        expect((output / f"checkpoint-{step}" / "unet_ema").is_dir(), f"checkpoint-{step}/unet_ema missing")
    expect((output / "model_index.json").is_file(), "no final pipeline")
    dtypes = {str(t.dtype) for t in load_weights(output / "unet").values()}
    expect(dtypes == {"torch.float32"}, f"exported UNet is {sorted(dtypes)}, not fp32")
    check.recipe = output
    return "; ".join(filter(None, [loop_peak(log), skipped_note(log)]))


@row("train.sh recipe: resume from the latest checkpoint", needs=("recipe",))
def recipe_resume(check: Check) -> str:
    output = recipe_output(check)
    _, log = check.train("recipe", "--max_train_steps=6", "--checkpointing_steps=2", "--validation_epochs=1",
                         "--resume_from_checkpoint=latest", output=output)
    expect("starting at step 4" in log, "did not resume at step 4")
    expect((output / "checkpoint-6").is_dir(), "no checkpoint-6 after the resume")
    return ""


@row("EMA weights shipped = last checkpoint's unet_ema", needs=("recipe_resume",))
def ema_shipped(check: Check) -> str:
    output = recipe_output(check)
    steps = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    shipped, ema = load_weights(output / "unet"), load_weights(output / f"checkpoint-{steps[-1]}" / "unet_ema")
    expect(shipped.keys() == ema.keys(), "different parameter names")
    differing = [k for k in shipped if not shipped[k].float().equal(ema[k].float())]
    expect(not differing, f"{len(differing)} tensors differ, e.g. {differing[:1]}")
    return f"checkpoint-{steps[-1]}, {len(shipped)} tensors"


@row("validation PNGs not black", needs=("recipe_resume",))
def validation_not_black(check: Check) -> str:
    output = recipe_output(check)
    images = sorted((output / "validation").rglob("*.png"))
    expect_not_black(images, "validation PNGs")
    return f"{len(images)} images"


@row("--offload_ema --foreach_ema --use_8bit_adam, then resume")
def offload_8bit(check: Check) -> str:
    flags = ["--offload_ema", "--foreach_ema", "--use_8bit_adam", "--checkpointing_steps=2"]
    output, log = check.train("offload_8bit", "--max_train_steps=2", *flags)
    _, resumed = check.train("offload_8bit", "--max_train_steps=4", *flags, "--resume_from_checkpoint=latest",
                             output=output)
    expect("starting at step 2" in resumed, "did not resume at step 2")
    expect((output / "checkpoint-4" / "unet_ema").is_dir(), "no checkpoint-4/unet_ema")
    return loop_peak(resumed)


@row("AdamW foreach")
def adamw_foreach(check: Check) -> str:
    return loop_peak(check.train("adamw_foreach", "--max_train_steps=2", "--optimizer_impl=foreach")[1])


@row("AdamW loop")
def adamw_loop(check: Check) -> str:
    return loop_peak(check.train("adamw_loop", "--max_train_steps=2", "--optimizer_impl=loop")[1])


@row("bf16 without the cache, --random_flip --allow_tf32")
def bf16_uncached(check: Check) -> str:
    output, log = check.train("bf16_uncached", "--max_train_steps=2", "--mixed_precision=bf16", "--random_flip",
                              "--allow_tf32", cache=False)
    expect(not (output / ".cache" / "latents").exists(), "a latent cache was built")
    return loop_peak(log)


@row("DREAM + min-SNR")
def dream_min_snr(check: Check) -> str:
    return loop_peak(check.train("dream", "--max_train_steps=2", "--dream_training", "--snr_gamma=5")[1])


@row("v-prediction + min-SNR")
def v_prediction(check: Check) -> str:
    return loop_peak(check.train("v_prediction", "--max_train_steps=2", "--prediction_type=v_prediction",
                                 "--snr_gamma=5")[1])


# An overflowing fp16 step on a fused AdamW, then a finite one: the first must leave the LR schedule where it was.
SKIPPED_STEP_PROBE = '''
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from trainer.loop import optimizer_update

accelerator = Accelerator(mixed_precision="fp16")
model = torch.nn.Linear(8, 8).cuda()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=4, num_training_steps=10)
model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
x = torch.randn(4, 8, device="cuda")
lrs, skips = [schedule.get_last_lr()[0]], []
for factor in (float("inf"), 1.0):
    with accelerator.autocast():
        loss = model(x).float().pow(2).mean() * factor
    accelerator.backward(loss)
    skips.append(bool(optimizer_update(accelerator, optimizer, schedule)))
    lrs.append(schedule.get_last_lr()[0])
print("PROBE", skips, lrs)
assert skips == [True, False], skips
assert lrs[1] == lrs[0] and lrs[2] > lrs[1], lrs
'''


@row("fp16 skipped step holds the LR (fused AdamW)", cuda_only=True)
def skipped_step_holds_lr(check: Check) -> str:
    out = check.python("-c", SKIPPED_STEP_PROBE)
    return next((line for line in out.splitlines() if line.startswith("PROBE")), "")


@row("generate.py from a checkpoint, batch 1 and 2", needs=("recipe_resume",))
def generate_batches(check: Check) -> str:
    import numpy as np
    from PIL import Image

    output = recipe_output(check)
    checkpoint = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    folders = {}
    for batch in (1, 2):
        folders[batch] = check.work / f"generated_{batch}"
        check.python("generate.py", "--model", checkpoint, "--prompt", PROMPT, "--prompt", "A river",
                     "--seed", 0, "--num_inference_steps", 4, "--height", check.resolution, "--width",
                     check.resolution, "--batch_size", batch, "--dtype", check.precision, "--output_dir",
                     folders[batch], "--overwrite")
    images = {b: sorted(f.glob("0*.png")) for b, f in folders.items()}
    expect(len(images[1]) == len(images[2]) == 2, f"images: {len(images[1])}, {len(images[2])}")
    expect_not_black(images[1] + images[2], "generated images")
    sidecar = json.loads(images[2][0].with_suffix(".json").read_text())
    expect(sidecar["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[check.precision], f"dtype {sidecar['dtype']}")
    worst = max(float(np.abs(np.asarray(Image.open(a), np.float32) - np.asarray(Image.open(b), np.float32)).mean())
                for a, b in zip(images[1], images[2]))
    expect(worst < 8, f"batch 1 and batch 2 images differ by {worst:.1f} on average")
    return f"{checkpoint.name}; batch 1 vs 2 mean abs diff {worst:.2f}"


@row("evaluate.py: FID, CLIP score, scene accuracy", needs=("recipe_resume",))
def evaluate(check: Check) -> str:
    output = recipe_output(check)
    stand_ins = check.work / "eval_models"
    check.python("-m", "evaluation.stand_ins", stand_ins)
    parquet = check.work / "eval.parquet"
    # 10 rows: the sample names rows by its 5 classes in turn, so each class has 2 and the scene figure has a ceiling
    check.python("diffusion_model/sample_data.py", "--output", parquet, "--num_rows", 10, "--seed", 1)
    eval_dir = check.work / "eval"
    check.python("evaluate.py", "--model", output, "--parquet_path", parquet, "--num_samples", 10,
                 "--inception_weights", stand_ins / "inception_random.pth", "--clip_model", stand_ins / "clip_tiny",
                 "--output_dir", eval_dir, "--num_inference_steps", 4, "--resolution", check.resolution,
                 "--batch_size", 2, "--dtype", check.precision, "--overwrite")
    report = json.loads((eval_dir / "eval_report.json").read_text())
    expect(math.isfinite(report["fid"]) and math.isfinite(report["clip_score"]), "FID or CLIP score not finite")
    expect(report["settings"]["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[check.precision],
           f"settings dtype {report['settings'].get('dtype')}")
    expect_not_black(sorted((eval_dir / "generated").glob("*.png")), "evaluated images")
    scene = {key: report.get(key) for key in ("scene_accuracy", "scene_accuracy_real", "chance", "num_classes")}
    expect(None not in scene.values() and scene["num_classes"] >= 2, f"scene figures missing: {scene}")
    return (f"{report['settings']['device']}, FID {report['fid']:.1f}; scene accuracy {scene['scene_accuracy']:.2f} "
            f"(ceiling {scene['scene_accuracy_real']:.2f}, chance {scene['chance']:.2f}, {scene['num_classes']} "
            f"classes, N={report['scene_num_samples']})")


@row("SD1.5-shaped 512 px, --use_8bit_adam --offload_ema: fits the README's 16 GB row", cuda_only=True)
def sd15_16gb(check: Check) -> str:
    return sd15_fits(check, "sd15", CARD_16GB_LIMIT_GIB, "--use_8bit_adam", "--offload_ema")


@row("LoRA rank 16: fp32 adapters, EMA, adapter-only checkpoints, resume, diffusers + kohya files")
def lora(check: Check) -> str:
    from safetensors import safe_open

    flags = ["--lora_rank=16", "--learning_rate=1e-4", "--checkpointing_steps=2", "--validation_epochs=1"]
    output, _ = check.train("lora", "--max_train_steps=2", *flags)
    _, log = check.train("lora", "--max_train_steps=4", *flags, "--resume_from_checkpoint=latest", output=output)
    expect("starting at step 2" in log, "did not resume at step 2")
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        expect((output / name).is_file(), f"no {name}")
    with safe_open(str(output / "pytorch_lora_weights.safetensors"), "pt") as weights:
        dtypes = {str(weights.get_tensor(key).dtype) for key in weights.keys()}
    expect(dtypes == {"torch.float32"}, f"LoRA weights are {sorted(dtypes)}, not fp32")
    expect(not list((output / "checkpoint-4").rglob("diffusion_pytorch_model*")), "checkpoint-4 holds a whole UNet")
    expect_not_black(sorted((output / "validation").rglob("*.png")), "LoRA validation PNGs")
    return "; ".join(filter(None, [loop_peak(log), skipped_note(log)]))


@row("SD1.5-shaped 512 px LoRA rank 16: fits the README's 8 GB row", cuda_only=True)
def sd15_lora_8gb(check: Check) -> str:
    return sd15_fits(check, "sd15_lora", CARD_8GB_LIMIT_GIB, "--lora_rank=16", "--learning_rate=1e-4")


def mask_data(check: Check, resolution: int, rows: int = 8) -> Path:
    """A ControlNet DATA_DIR: sample_data --masks -> create.py (mask conditioning, 5 classes) -> format.py."""
    def make():
        root = check.work / f"mask_data_{resolution}"
        parquet = root / "masks.parquet"
        check.python("diffusion_model/sample_data.py", "--output", parquet, "--num_rows", rows, "--seed", 0, "--masks")
        check.python("diffusion_model/create.py", "--input", parquet, "--conditioning_column", "mask",
                     "--conditioning_type", "mask", "--num_classes", 5, "--output_dir", root / "data",
                     "--resolution", resolution)
        check.python("diffusion_model/format.py", "--caption_file", root / "data" / "captions.txt",
                     "--output_file", root / "data" / "metadata.jsonl")
        return root / "data"
    return check.once(f"mask_data_{resolution}", make)


@row("ControlNet, SD1.5-shaped 512 px, train_controlnet.sh (fp16, cache, EMA, checkpointing): a mask ControlNet "
     "trains, resumes, loads, validates", cuda_only=True)
def controlnet_sd15(check: Check) -> str:
    from diffusers import ControlNetModel

    model = check.once("sd15_model", lambda: check._model("sd15"))
    output = check.work / "controlnet_sd15"
    env = check.env(MODEL_NAME=model, DATA_DIR=mask_data(check, 512), OUTPUT_DIR=output, REPORT_TO="tensorboard",
                    PUSH_TO_HUB=0)
    flags = ["--train_batch_size=2", "--checkpointing_steps=2", "--validation_steps=1000", "--num_validation_images=1"]
    check.run(["./train_controlnet.sh", "--max_train_steps=2", *flags], env=env)
    log = check.run(["./train_controlnet.sh", "--max_train_steps=4", "--resume_from_checkpoint=latest", *flags],
                    env=env)
    expect("starting at step 2" in log, "did not resume at step 2")
    expect(ControlNetModel.from_pretrained(output).config.conditioning_channels == 5, "not a 5-channel ControlNet")
    expect_not_black(sorted((output / "validation").rglob("*.png")), "ControlNet validation PNGs")
    return "; ".join(filter(None, [loop_peak(log), skipped_note(log)]))


# --- the table


def selected_rows(names: set) -> List[Row]:
    """The rows GPU_CHECK_ROWS names (all when empty) plus, transitively, the rows they need, in table order."""
    by_key = {entry.key: entry for entry in ROWS}
    wanted = {entry.key for entry in ROWS if not names or entry.name in names or entry.key in names}
    pending = list(wanted)
    while pending:
        for need in by_key[pending.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                pending.append(need)
    return [entry for entry in ROWS if entry.key in wanted]


def run_row(check: Check, entry: Row, failed_needs: List[str]) -> tuple:
    """Run one row in this thread: (name, result, seconds, peak memory text, note); a failing row is recorded."""
    if entry.cuda_only and not check.cuda:
        return entry.name, "SKIP", 0.0, "", "needs CUDA"
    if failed_needs:
        return entry.name, "FAIL", 0.0, "", f"not run: needs {', '.join(failed_needs)}, which did not pass"
    check.start_row()
    started = time.monotonic()
    try:
        note, result = entry.run(check) or "", "PASS"
    except Exception as err:  # noqa: BLE001 - a failing row is recorded, and the table goes on
        note, result = (str(err).splitlines() or [type(err).__name__])[0][:300], "FAIL"
        if not isinstance(err, CheckFailed):
            check.log.write(traceback.format_exc())
    seconds = time.monotonic() - started
    print(f"{result:4} {seconds:6.1f} s  {check.row_peak():>18}  {entry.name}  {note}", flush=True)
    return entry.name, result, seconds, check.row_peak(), note


def run_rows(check: Check, rows: List[Row], jobs: int) -> Iterator[tuple]:
    """Run the rows, `alone` ones first and one at a time, the others up to `jobs` at once, each as soon as the
    rows it needs have ended; yield each row's result as it ends."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    results = {}
    for entry in [entry for entry in rows if entry.alone]:
        results[entry.key] = run_row(check, entry, [])
        yield results[entry.key]
    waiting, running = [entry for entry in rows if not entry.alone], {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while waiting or running:
            for entry in [e for e in waiting if all(need in results for need in e.needs)][:jobs - len(running)]:
                failed = [need for need in entry.needs if results[need][1] != "PASS"]
                running[pool.submit(run_row, check, entry, failed)] = entry
                waiting.remove(entry)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                entry = running.pop(future)
                results[entry.key] = future.result()
                yield results[entry.key]


def table(results: List[tuple], device: str, total_s: float, jobs: int, card_peak: str) -> str:
    """The results as a Markdown table with a header line."""
    import torch

    what = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke mode: bf16 for fp16, tiny sizes)"
    lines = [f"GPU check on {what}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"total {total_s:.0f} s, {jobs} row(s) at once; peak memory of the card over the whole check: "
             f"{card_peak}. A row's peak memory is its trainers' own peak CUDA reserved (GPU) or its processes' "
             "peak RSS (CPU); its time includes waiting for the cores that rows running beside it use.",
             "", "| row | result | time (s) | peak memory | note |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {result} | {seconds:.1f} | {peak} | {note.replace('|', '/')} |"
              for name, result, seconds, peak, note in results]
    passed = sum(r[1] == "PASS" for r in results)
    failed = sum(r[1] == "FAIL" for r in results)
    lines += ["", f"{passed} passed, {failed} failed, {len(results) - passed - failed} skipped"]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the rows in a scratch folder; print the table (and write it to $OUT); 1 if any row failed."""
    import torch

    device = os.environ.get("GPU_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: error: GPU_CHECK_DEVICE=cuda but torch sees no CUDA device\n")
        return 2
    names = set(filter(None, os.environ.get("GPU_CHECK_ROWS", "").split(",")))
    unknown = names - {entry.name for entry in ROWS} - {entry.key for entry in ROWS}
    if unknown:
        sys.stderr.write(f"gpu_check: error: GPU_CHECK_ROWS names no row {', '.join(sorted(unknown))}; rows: "
                         f"{', '.join(entry.key for entry in ROWS)}\n")
        return 2
    jobs_text = os.environ.get("GPU_CHECK_JOBS") or (str(DEFAULT_CUDA_JOBS) if device == "cuda" else "1")
    if not jobs_text.isdigit() or int(jobs_text) < 1:
        sys.stderr.write(f"gpu_check: error: GPU_CHECK_JOBS must be a whole number of at least 1, got {jobs_text}\n")
        return 2
    work = Path(os.environ.get("GPU_CHECK_WORK") or "/tmp/gpu_check")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log_path = (out or work) / "gpu_check.log"
    rows, jobs = selected_rows(names), int(jobs_text)
    started, results = time.monotonic(), []
    watch = MemoryWatch() if device == "cuda" else None
    text = table(results, device, 0.0, jobs, "-")
    with open(log_path, "w", encoding="utf-8") as log:
        for result in run_rows(Check(work, device, log), rows, jobs):
            results.append(result)
            results.sort(key=lambda done: [entry.name for entry in rows].index(done[0]))  # table order
            card_peak = f"{watch.peak_mib:.0f} MiB (nvidia-smi)" if watch else "-"
            text = table(results, device, time.monotonic() - started, jobs, card_peak)
            if out is not None:  # after every row: a run stopped at the device's time limit still returns its rows
                (out / "gpu_check.md").write_text(text, encoding="utf-8")
    if watch:
        watch.stop()
    print("\n" + text + f"(log: {log_path})")
    return 1 if any(r[1] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
