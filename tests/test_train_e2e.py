"""train_text_to_image.py end to end, run as users run it: the reference's example tests as behaviour, and more.

Each run costs ~10 s (imports, tiny model, a few 64 px steps), so runs are shared through module fixtures
and finished output folders are copied to test resuming.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_text_to_image.py"
PROMPT = "A satellite image of a crop field"


def trainer_env() -> dict:
    """Offline environment: wandb without login, no Hub; one thread, since two spin badly on a busy 2-core box."""
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def trainer_command(model, data, output, *extra) -> list:
    """The reference's example-test flags: tiny model, 64 px, bs1, GA1, lr 5e-4 --scale_lr, constant LR."""
    return [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(output), "--resolution", "64",
            "--center_crop", "--random_flip", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
            "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--seed", "0", *[str(e) for e in extra]]


def train(model, data, output, *extra, timeout=180) -> subprocess.CompletedProcess:
    """Run the trainer; fail the test with its stderr if it does not exit 0."""
    done = subprocess.run(trainer_command(model, data, output, *extra), capture_output=True, text=True,
                          env=trainer_env(), timeout=timeout, cwd=REPO_ROOT)
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


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "ema"])
def run4(request, tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """4 steps, a checkpoint every 2, one validation prompt: (output dir, use_ema)."""
    output = tmp_path_factory.mktemp("run4") / "out"
    train(tiny_model_dir, tiny_data_dir, output, "--max_train_steps", 4, "--checkpointing_steps", 2,
          "--validation_prompt", PROMPT, "--validation_epochs", 1, *ema_flags(request.param))
    return output, request.param


def test_run_writes_unet_scheduler_and_exactly_two_checkpoints(run4):
    """The reference's 2-step and 4-step tests: safetensors UNet, scheduler config, {checkpoint-2, checkpoint-4}."""
    output, use_ema = run4
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "scheduler" / "scheduler_config.json").is_file()
    assert not list(output.rglob("*.bin")) or all("checkpoint-" in str(p) for p in output.rglob("*.bin"))
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
    assert (output / "validation" / "step-4" / "0.png").is_file()
    assert (output / "validation_grid.png").is_file()
    events = sorted((output / "logs").rglob("events.out.tfevents.*"))
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags().get("scalars", []))
        if "train_loss" in accumulator.Tags().get("scalars", []):
            assert [e.step for e in accumulator.Scalars("train_loss")] == [1, 2, 3, 4]
    assert {"train_loss", "lr", "grad_norm"} <= tags


def test_resume_of_a_finished_run_trains_no_more_but_writes_the_pipeline(run4, tiny_model_dir, tiny_data_dir,
                                                                       tmp_path):
    """Resuming at max_train_steps: no new checkpoint, final pipeline rewritten from checkpoint-4's weights."""
    source, use_ema = run4
    output = tmp_path / "out"
    shutil.copytree(source, output)
    shutil.rmtree(output / "unet")
    (output / "model_index.json").unlink()
    done = train(tiny_model_dir, tiny_data_dir, output, "--max_train_steps", 4, "--checkpointing_steps", 2,
                 "--resume_from_checkpoint", "checkpoint-4", *ema_flags(use_ema))
    assert "starting at step 4" in done.stderr
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}
    assert (output / "model_index.json").is_file()
    assert_same_weights(load_weights(output / "unet"), load_weights(source / "unet"))


def test_total_limit_keeps_the_newest_two(run4, tiny_model_dir, tiny_data_dir, tmp_path):
    """6 steps, a checkpoint every 2, limit 2: exactly {checkpoint-4, checkpoint-6}.

    Run with --resume_from_checkpoint=latest on an empty folder: the reference's notice and a fresh start.
    """
    _, use_ema = run4
    output = tmp_path / "out"
    done = train(tiny_model_dir, tiny_data_dir, output, "--max_train_steps", 6, "--checkpointing_steps", 2,
                 "--checkpoints_total_limit", 2, "--resume_from_checkpoint", "latest", *ema_flags(use_ema))
    assert "no checkpoint" in done.stderr and "starting at step 0" in done.stderr
    assert checkpoints(output) == {"checkpoint-4", "checkpoint-6"}


def test_resume_with_limit_continues_to_eight(run4, tiny_model_dir, tiny_data_dir, tmp_path):
    """From {2, 4}, resume at checkpoint-4 up to 8 steps with limit 2: exactly {checkpoint-6, checkpoint-8}."""
    source, use_ema = run4
    output = tmp_path / "out"
    shutil.copytree(source, output)
    done = train(tiny_model_dir, tiny_data_dir, output, "--max_train_steps", 8, "--checkpointing_steps", 2,
                 "--checkpoints_total_limit", 2, "--resume_from_checkpoint", "checkpoint-4", *ema_flags(use_ema))
    assert "starting at step 4" in done.stderr
    assert checkpoints(output) == {"checkpoint-6", "checkpoint-8"}
    if use_ema:
        config = json.loads((output / "checkpoint-8" / "unet_ema" / "config.json").read_text())
        assert config["optimization_step"] == 8, "EMA step count not restored on resume"


def test_kill_minus_9_then_resume_latest_matches_an_uninterrupted_run(tiny_model_dir, tiny_data_dir, tmp_path):
    """SIGKILL after the first checkpoint, plus a half-written save; resume latest ends at the same set."""
    output = tmp_path / "out"
    flags = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--gradient_accumulation_steps", 2, "--use_ema"]
    process = subprocess.Popen(trainer_command(tiny_model_dir, tiny_data_dir, output, *flags),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=trainer_env(),
                               cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    while not (output / "checkpoint-2").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert "checkpoint-4" not in checkpoints(output)
    # What a kill in the middle of a save leaves: a temp folder that "latest" must ignore and resume must clear.
    (output / ".checkpoint-99.partial" / "unet").mkdir(parents=True)
    done = train(tiny_model_dir, tiny_data_dir, output, *flags, "--resume_from_checkpoint", "latest")
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


def test_caption_lists_v_prediction_wandb_offline(caption_list_dataset, tiny_model_dir, tmp_path):
    """A caption-list saved dataset trains with v_prediction + min-SNR + offsets; wandb runs offline."""
    from diffusers import StableDiffusionPipeline

    output = tmp_path / "out"
    command = trainer_command(tiny_model_dir, "unused", output, "--max_train_steps", 2,
                              "--checkpointing_steps", 10, "--prediction_type", "v_prediction", "--snr_gamma", 5,
                              "--noise_offset", 0.1, "--input_perturbation", 0.1, "--report_to", "wandb",
                              "--validation_prompts", PROMPT, "a river", "--caption_column", "captions")
    data_at = command.index("--train_data_dir")
    command[data_at:data_at + 2] = ["--dataset_name", str(caption_list_dataset)]
    done = subprocess.run(command, capture_output=True, text=True, env=trainer_env(), timeout=180, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    config = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert StableDiffusionPipeline.from_pretrained(output).scheduler.config.prediction_type == "v_prediction"
    assert sorted(p.name for p in (output / "validation" / "step-2").iterdir()) == ["0.png", "1.png"]
    assert list((output / "logs").rglob("wandb/offline-run-*")), "no offline wandb run under logs/"


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    """An absurd LR blows the weights up: the run stops with a clear message, exit 1, no later checkpoint."""
    output = tmp_path / "out"
    command = trainer_command(tiny_model_dir, tiny_data_dir, output, "--max_train_steps", 8,
                              "--checkpointing_steps", 1, "--max_grad_norm", "1e38")
    command[command.index("5.0e-04")] = "1e35"
    done = subprocess.run(command, capture_output=True, text=True, env=trainer_env(), timeout=180, cwd=REPO_ROOT)
    assert done.returncode == 1, done.stderr[-4000:]
    assert "loss is nan" in done.stderr.lower() or "loss is inf" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert not (output / "model_index.json").exists()
    for name in checkpoints(output):
        weights = load_weights(output / name / "unet")
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{name} holds non-finite weights"


def test_two_processes_with_torchrun(tiny_model_dir, tiny_data_dir, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo): same artefacts as one process."""
    output = tmp_path / "out"
    command = trainer_command(tiny_model_dir, tiny_data_dir, output, "--max_train_steps", 4,
                              "--checkpointing_steps", 2, "--use_ema")
    command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(SCRIPT)]
    done = subprocess.run(command, capture_output=True, text=True, env={**trainer_env(), "ACCELERATE_USE_CPU": "1"},
                          timeout=240, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stderr
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}
    assert (output / "checkpoint-4" / "random_states_1.pkl").is_file()
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "model_index.json").is_file()
