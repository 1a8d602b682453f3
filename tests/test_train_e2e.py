"""train_text_to_image.py end to end, run as users run it: the reference's example tests as behaviour, and more.

Each run costs ~10 s (imports, tiny model, a few 64 px steps), so runs are shared through module fixtures
and finished output folders are copied to test resuming.
"""

import functools
import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import warm
from warm import single_thread_env
from utils import grids

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_text_to_image.py"
PROMPT = "A satellite image of a crop field"


def trainer_command(model, data, output, *extra) -> list:
    """The reference's example-test flags: tiny model, 64 px, bs1, GA1, lr 5e-4 --scale_lr, constant LR."""
    return [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(output), "--resolution", "64",
            "--center_crop", "--random_flip", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--seed", "0", *[str(e) for e in extra]]


def run_command(command: list, timeout=300, cold=False) -> subprocess.CompletedProcess:
    """Run one trainer command line, capturing its output; from the warm zygote unless cold (tests/warm.py)."""
    return warm.run(command, cwd=REPO_ROOT, env=single_thread_env(), timeout=timeout, cold=cold)


def run_parallel(commands: dict) -> dict:
    """Run independent trainer commands two at a time (each is single-threaded; the box has 2 cores). A value may
    also be a function of no arguments that runs its own trainer and returns a CompletedProcess."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(command) if callable(command) else pool.submit(run_command, command)
                   for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def succeeded(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """done, after failing the test with the trainer's stderr unless it exited 0."""
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def checkpoints(output: Path) -> set:
    """Names of the published checkpoints (temp folders excluded by their leading dot)."""
    return {p.name for p in Path(output).iterdir() if p.name.startswith("checkpoint-")}


def ema_flags(use_ema: bool) -> list:
    """--use_ema, or nothing."""
    return ["--use_ema"] if use_ema else []


def load_weights(folder: Path) -> dict:
    """A diffusers model folder's safetensors weights."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    """Every tensor equal, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


MODES = {"plain": False, "ema": True}
# The run killed with SIGKILL once checkpoint-2 exists, then resumed from "latest".
KILL_FLAGS = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--gradient_accumulation_steps", 2, "--use_ema"]


def kill_at_first_checkpoint(command: list, output: Path) -> subprocess.CompletedProcess:
    """Start a trainer run and SIGKILL it as soon as output/checkpoint-2 exists (or it ends, or 5 minutes pass)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=single_thread_env(),
                               cwd=REPO_ROOT)
    deadline = time.monotonic() + 300
    while not (output / "checkpoint-2").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return subprocess.CompletedProcess(command, process.returncode)


@pytest.fixture(scope="module")
def fresh_runs(tiny_model_dir, tiny_data_dir, caption_list_dataset, tmp_path_factory) -> dict:
    """Every run that starts from nothing, two at a time: name → (output dir, CompletedProcess)."""
    root = tmp_path_factory.mktemp("fresh")
    commands, outputs = {}, {}
    for mode, use_ema in MODES.items():
        outputs[f"run4-{mode}"] = root / f"run4-{mode}"
        commands[f"run4-{mode}"] = trainer_command(
            tiny_model_dir, tiny_data_dir, outputs[f"run4-{mode}"], "--max_train_steps", 4,
            "--checkpointing_steps", 2, "--validation_prompt", PROMPT, "--validation_epochs", 1, *ema_flags(use_ema))
        # --resume_from_checkpoint=latest on an empty folder: the reference's notice and a fresh start.
        outputs[f"limit-{mode}"] = root / f"limit-{mode}"
        commands[f"limit-{mode}"] = trainer_command(
            tiny_model_dir, tiny_data_dir, outputs[f"limit-{mode}"], "--max_train_steps", 6, "--checkpointing_steps",
            2, "--checkpoints_total_limit", 2, "--resume_from_checkpoint", "latest", *ema_flags(use_ema))
    outputs["captions"] = root / "captions"
    commands["captions"] = caption_list_command(tiny_model_dir, caption_list_dataset, outputs["captions"])
    outputs["nan"] = root / "nan"
    commands["nan"] = nan_command(tiny_model_dir, tiny_data_dir, outputs["nan"])
    outputs["killed"] = root / "killed"
    commands["killed"] = functools.partial(
        kill_at_first_checkpoint, trainer_command(tiny_model_dir, tiny_data_dir, outputs["killed"], *KILL_FLAGS),
        outputs["killed"])
    results = run_parallel(commands)
    return {name: (outputs[name], results[name]) for name in commands}


@pytest.fixture(scope="module")
def resumed_runs(fresh_runs, tiny_model_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """Copies of the 4-step runs, resumed from checkpoint-4: to the same 4 steps, and to 8 with limit 2."""
    root = tmp_path_factory.mktemp("resumed")
    commands, outputs = {}, {}
    for mode, use_ema in MODES.items():
        source, done = fresh_runs[f"run4-{mode}"]
        succeeded(done)
        finished = outputs[f"finished-{mode}"] = root / f"finished-{mode}"
        shutil.copytree(source, finished)
        shutil.rmtree(finished / "unet")
        (finished / "model_index.json").unlink()
        commands[f"finished-{mode}"] = trainer_command(
            tiny_model_dir, tiny_data_dir, finished, "--max_train_steps", 4, "--checkpointing_steps", 2,
            "--resume_from_checkpoint", "checkpoint-4", *ema_flags(use_ema))
        to8 = outputs[f"to8-{mode}"] = root / f"to8-{mode}"
        shutil.copytree(source, to8)
        commands[f"to8-{mode}"] = trainer_command(
            tiny_model_dir, tiny_data_dir, to8, "--max_train_steps", 8, "--checkpointing_steps", 2,
            "--checkpoints_total_limit", 2, "--resume_from_checkpoint", "checkpoint-4", *ema_flags(use_ema))
    # The killed run (a copy; the original stays as the kill left it), plus what a kill in the middle of a save
    # leaves: a temp folder that "latest" must ignore and resume must clear.
    killed = outputs["killed"] = root / "killed"
    shutil.copytree(fresh_runs["killed"][0], killed)
    (killed / ".checkpoint-99.partial" / "unet").mkdir(parents=True)
    commands["killed"] = trainer_command(tiny_model_dir, tiny_data_dir, killed, *KILL_FLAGS,
                                         "--resume_from_checkpoint", "latest")
    results = run_parallel(commands)
    return {name: (outputs[name], results[name]) for name in commands}


@pytest.fixture(params=list(MODES))
def run4(request, fresh_runs):
    """The 4-step run (a checkpoint every 2, one validation prompt) of one mode: (output dir, use_ema)."""
    output, done = fresh_runs[f"run4-{request.param}"]
    succeeded(done)
    return output, MODES[request.param]


def test_run_writes_unet_scheduler_and_exactly_two_checkpoints(run4):
    """The reference's 2-step and 4-step tests: safetensors UNet, scheduler config, {checkpoint-2, checkpoint-4}."""
    output, use_ema = run4
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "scheduler" / "scheduler_config.json").is_file()
    assert (output / "README.md").read_text().startswith("---")
    pickled = [p for p in output.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
               and not p.relative_to(output).parts[0].startswith("checkpoint-")]
    assert not pickled, f"the final pipeline must be safetensors only: {pickled}"
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}
    assert (output / "checkpoint-2" / "unet_ema").is_dir() == use_ema
    assert not [p for p in output.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_final_unet_is_the_ema_one_with_ema(run4):
    """With --use_ema the shipped UNet is the EMA UNet of the last checkpoint; without, the trained one."""
    output, use_ema = run4
    source = output / "checkpoint-4" / ("unet_ema" if use_ema else "unet")
    assert_same_weights(load_weights(output / "unet"), load_weights(source))


def test_pipeline_and_checkpoint_unet_load_and_generate(run4, tiny_model_dir):
    """OUTPUT_DIR loads as a pipeline and generates; checkpoint-2/unet runs inside the base pipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    output, _ = run4
    pipeline = StableDiffusionPipeline.from_pretrained(output)
    assert pipeline.safety_checker is None
    image = pipeline("a field", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(image.std()) > 0
    unet = UNet2DConditionModel.from_pretrained(output / "checkpoint-2" / "unet")
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, unet=unet)
    assert base("a field", num_inference_steps=2, output_type="np").images[0].shape[-1] == 3


def test_validation_images_grid_and_tensorboard_loss(run4):
    """Validation PNGs under validation/step-N, the grid, and train_loss/lr/grad_norm in the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = run4
    with Image.open(output / "validation" / "step-4" / "0.png") as drawn:
        native = np.asarray(drawn.convert("RGB"))
    assert native.shape == (64, 64, 3)  # the PNG stays as drawn; the grid enlarges it 2x to 128 px, labelled
    font = grids.label_font()
    layout = grids.grid_layout((128, 128), 1, 1, grids.row_label_width([PROMPT], font), grids.line_height(font))
    with Image.open(output / "validation_grid.png") as grid:
        assert grid.size == layout.size
        x, y = layout.origin(0, 0)
        tile = np.asarray(grid.convert("RGB"))[y:y + 128, x:x + 128]
    assert np.array_equal(tile, native.repeat(2, axis=0).repeat(2, axis=1))
    events = sorted((output / "logs").rglob("events.out.tfevents.*"))
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags().get("scalars", []))
        if "train_loss" in accumulator.Tags().get("scalars", []):
            assert [e.step for e in accumulator.Scalars("train_loss")] == [1, 2, 3, 4]
    assert {"train_loss", "lr", "grad_norm"} <= tags


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_of_a_finished_run_trains_no_more_but_writes_the_pipeline(mode, resumed_runs, fresh_runs):
    """Resuming at max_train_steps: no new checkpoint, final pipeline rewritten from checkpoint-4's weights."""
    output, done = resumed_runs[f"finished-{mode}"]
    succeeded(done)
    assert "starting at step 4" in done.stderr
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}
    assert (output / "model_index.json").is_file()
    source, _ = fresh_runs[f"run4-{mode}"]
    assert_same_weights(load_weights(output / "unet"), load_weights(source / "unet"))


@pytest.mark.parametrize("mode", list(MODES))
def test_total_limit_keeps_the_newest_two(mode, fresh_runs):
    """6 steps, a checkpoint every 2, limit 2: exactly {checkpoint-4, checkpoint-6}; "latest" with none is fresh."""
    output, done = fresh_runs[f"limit-{mode}"]
    succeeded(done)
    assert "no checkpoint" in done.stderr and "starting at step 0" in done.stderr
    assert checkpoints(output) == {"checkpoint-4", "checkpoint-6"}


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_with_limit_continues_to_eight(mode, resumed_runs, fresh_runs):
    """From {2, 4}, resume at checkpoint-4 up to 8 steps with limit 2: exactly {checkpoint-6, checkpoint-8}.

    The resumed run's step 6 is bit-identical to the uninterrupted 6-step run's: optimizer, LR schedule, EMA
    and RNG state came back, and the batches of the resumed epoch already seen were skipped, not replayed.
    """
    output, done = resumed_runs[f"to8-{mode}"]
    succeeded(done)
    assert "starting at step 4" in done.stderr
    assert checkpoints(output) == {"checkpoint-6", "checkpoint-8"}
    uninterrupted, _ = fresh_runs[f"limit-{mode}"]
    for model in ("unet", "unet_ema") if MODES[mode] else ("unet",):
        assert_same_weights(load_weights(output / "checkpoint-6" / model),
                            load_weights(uninterrupted / "checkpoint-6" / model))
    if MODES[mode]:
        config = json.loads((output / "checkpoint-8" / "unet_ema" / "config.json").read_text())
        assert config["optimization_step"] == 8, "EMA step count not restored on resume"
    # The loss log was cut back to step 4 on resume: every step once, and the replayed steps match.
    from trainer.loss_log import loss_log_path, read_loss_log

    resumed_log = read_loss_log(loss_log_path(output))
    assert [row[0] for row in resumed_log] == list(range(1, 9))
    assert resumed_log[:6] == read_loss_log(loss_log_path(uninterrupted))


def test_kill_minus_9_then_resume_latest_matches_an_uninterrupted_run(fresh_runs, resumed_runs):
    """SIGKILL after the first checkpoint, plus a half-written save; resume latest ends at the same set."""
    output, killed = fresh_runs["killed"]
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert "checkpoint-4" not in checkpoints(output)
    output, done = resumed_runs["killed"]
    succeeded(done)
    assert "starting at step 0" not in done.stderr
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}  # what run4 leaves uninterrupted
    assert not (output / ".checkpoint-99.partial").exists()
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.fixture(scope="module")
def caption_list_dataset(tiny_data_dir, tmp_path_factory) -> Path:
    """A saved datasets folder whose caption column holds lists of captions."""
    import datasets

    rows = [json.loads(line) for line in (tiny_data_dir / "metadata.jsonl").read_text().splitlines() if line]
    table = datasets.Dataset.from_dict({
        "image": [str(tiny_data_dir / row["file_name"]) for row in rows],
        "captions": [[row["text"], "an aerial photograph", "a satellite view"] for row in rows],
    }).cast_column("image", datasets.Image())
    path = tmp_path_factory.mktemp("caption_lists") / "dataset"
    table.save_to_disk(str(path))
    return path


def caption_list_command(model, dataset, output) -> list:
    """Caption lists, 2 of the rows (2 steps per epoch), v_prediction + min-SNR + offsets, EMA, wandb, 2 prompts."""
    command = trainer_command(model, "unused", output, "--max_train_steps", 3, "--checkpointing_steps", 10,
                              "--max_train_samples", 2, "--validation_epochs", 1, "--use_ema",
                              "--prediction_type", "v_prediction", "--snr_gamma", 5, "--noise_offset", 0.1,
                              "--input_perturbation", 0.1, "--report_to", "wandb", "--validation_prompts", PROMPT,
                              "a river", "--caption_column", "captions")
    data_at = command.index("--train_data_dir")
    command[data_at:data_at + 2] = ["--dataset_name", str(dataset)]
    return command


def test_caption_lists_v_prediction_wandb_offline(fresh_runs):
    """A caption-list dataset trains; v_prediction persists; validation after epoch 0 and at the end; wandb offline."""
    from diffusers import StableDiffusionPipeline

    output, done = fresh_runs["captions"]
    succeeded(done)
    config = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert StableDiffusionPipeline.from_pretrained(output).scheduler.config.prediction_type == "v_prediction"
    for step in (2, 3):
        assert sorted(p.name for p in (output / "validation" / f"step-{step}").iterdir()) == ["0.png", "1.png"]
    assert list((output / "logs").rglob("wandb/offline-run-*")), "no offline wandb run under logs/"


def nan_command(model, data, output) -> list:
    """An absurd LR (and no clipping) that blows the weights up within a couple of steps."""
    command = trainer_command(model, data, output, "--max_train_steps", 8, "--checkpointing_steps", 1,
                              "--max_grad_norm", "1e38")
    command[command.index("5.0e-04")] = "1e35"
    return command


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(fresh_runs):
    """The run stops with a clear message, exit 1, no final pipeline, and only finite checkpoints."""
    output, done = fresh_runs["nan"]
    assert done.returncode == 1, done.stderr[-4000:]
    assert "loss is nan" in done.stderr.lower() or "loss is inf" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert not (output / "model_index.json").exists()
    for name in checkpoints(output):
        weights = load_weights(output / name / "unet")
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{name} holds non-finite weights"


def free_port() -> int:
    """A TCP port nobody listens on right now, for torchrun's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_torch_rng_states(checkpoint: Path) -> list:
    """The CPU torch RNG state each process saved in a checkpoint (random_states_<rank>.pkl)."""
    return [torch.load(path, weights_only=False)["torch_manual_seed"]
            for path in sorted(checkpoint.glob("random_states_*.pkl"))]


# The run two_process_run (conftest) makes, shared with test_multinode.py's two-node run, which must equal it.
# 8 rows over 2 processes: 4 steps per epoch, so validation after epoch 0 and checkpoints at 2 and 4 come before
# steps 5-6 and the check at checkpoint-6.
TWO_PROCESS_FLAGS = ["--max_train_steps", 6, "--checkpointing_steps", 2, "--use_ema", "--cache_latents",
                     "--validation_prompt", PROMPT, "--validation_epochs", 1, "--cache_chunk_rows", 4]


def run_two_processes_with_torchrun(model, data, output) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node 2 of the trainer with TWO_PROCESS_FLAGS on the CPU (gloo)."""
    command = trainer_command(model, data, output, *TWO_PROCESS_FLAGS)
    command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    str(SCRIPT)]
    return subprocess.run(command, capture_output=True, text=True, env={**single_thread_env(), "ACCELERATE_USE_CPU": "1"},
                          timeout=400, cwd=REPO_ROOT)


def test_two_processes_with_torchrun(two_process_run):
    """torchrun --nproc_per_node 2 on CPU (gloo): same artefacts as one process; the latent cache's two 4-row chunks
    are built (one per rank); each rank draws its own noise; after a validation and checkpoints the ranks still hold
    the same weights (the trainer checks that at every checkpoint and stops otherwise)."""
    output, done = two_process_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stderr
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert (output / "validation" / "step-4" / "0.png").is_file()
    # At step 2 both ranks have run the same code (validation, on rank 0 only, comes later).
    states = rank_torch_rng_states(output / "checkpoint-2")
    assert len(states) == 2 and not torch.equal(*states), "both ranks drew the same noise and timesteps"
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "model_index.json").is_file()
    (cache,) = (output / ".cache" / "latents").iterdir()
    assert sorted(p.name for p in cache.glob("latents-*")) == ["latents-0000000-0000004.safetensors",
                                                               "latents-0000004-0000008.safetensors"]
