"""train_controlnet.sh: the recipe's flags, the validation pair from DATA_DIR's first row, env overrides, one-line
usage errors (its own, and the trainer's through utils/launch.py)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from trainer.controlnet_args import parse_args

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_controlnet.sh"
ENTRY = REPO_ROOT / "train_controlnet.py"
FAKE_ACCELERATE = '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGV_FILE"\n'
ISOLATED_VARS = ("HF_HOME", "XDG_CACHE_HOME", "ACCELERATE_CONFIG_FILE", "MODEL_NAME", "DATA_DIR", "OUTPUT_DIR",
                 "REPORT_TO", "PUSH_TO_HUB", "ACCELERATE", "HF_TOKEN", "CACHE_LATENTS", "LAUNCH_ARGS",
                 "VALIDATION_PROMPT", "VALIDATION_IMAGE")
CAPTION = 'fields "north" of a river'


@pytest.fixture()
def sandbox(tmp_path) -> dict:
    """A fake `accelerate`, an empty HOME, and a mask data folder (one row) as create.py + format.py write it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(FAKE_ACCELERATE)
    (bin_dir / "accelerate").chmod(0o755)
    data = tmp_path / "data"
    for sub in ("rsicd_images", "conditioning_images"):
        (data / sub).mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(data / "rsicd_images" / "image_000001.png")
    Image.new("L", (64, 64)).save(data / "conditioning_images" / "image_000001.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "rsicd_images/image_000001.png", "text": CAPTION,
                                                     "conditioning_image": "conditioning_images/image_000001.png"})
                                         + "\n")
    (data / "conditioning.json").write_text(json.dumps({"type": "mask", "classes": 3, "channels": 1}))
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ISOLATED_VARS}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(tmp_path / "home"),
               ARGV_FILE=str(tmp_path / "argv.txt"), DATA_DIR=str(data), ACCELERATE=str(bin_dir / "accelerate"))
    return {"env": env, "tmp": tmp_path, "data": data, "argv_file": tmp_path / "argv.txt"}


def run_sh(sandbox, *args, **env):
    """Run train_controlnet.sh from a foreign cwd; return (CompletedProcess, argv given to accelerate or None)."""
    full_env = {**sandbox["env"], **{k: str(v) for k, v in env.items()}}
    done = subprocess.run([str(SCRIPT), *args], cwd=sandbox["tmp"], env=full_env, capture_output=True, text=True,
                          timeout=120)
    argv_file = sandbox["argv_file"]
    return done, (argv_file.read_text().splitlines() if argv_file.exists() else None)


def script_args(argv) -> list:
    """The arguments after the entry script in accelerate's argv."""
    assert str(ENTRY) in argv, argv
    return argv[argv.index(str(ENTRY)) + 1:]


def test_recipe_flags_and_first_row_validation(sandbox):
    """fp16, gradient checkpointing, EMA, cache, checkpoints, validation on the first row (its caption, quotes
    included, and its conditioning file), single-process fp16 launch; they parse as train_controlnet.py's."""
    done, argv = run_sh(sandbox)
    assert done.returncode == 0, done.stderr
    assert argv[:10] == ["launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
                         "--mixed_precision", "fp16", str(ENTRY)]
    args = parse_args(script_args(argv))
    assert args.mixed_precision == "fp16" and args.gradient_checkpointing and args.use_ema and args.cache_latents
    assert args.random_flip and args.checkpointing_steps == 500 and args.push_to_hub
    assert args.train_data_dir == str(sandbox["data"]) and args.output_dir == "controlnet-rs-model"
    assert args.validation_prompt == [CAPTION]
    assert args.validation_image == [f"{sandbox['data']}/conditioning_images/image_000001.png"]


def test_overrides_and_last_extra_args_win(sandbox):
    """Environment settings replace the defaults; extra arguments come last and win."""
    image = sandbox["data"] / "conditioning_images" / "image_000001.png"
    done, argv = run_sh(sandbox, "--max_train_steps=7", "--mixed_precision=bf16", PUSH_TO_HUB=0, CACHE_LATENTS=0,
                        OUTPUT_DIR="out", VALIDATION_PROMPT="a prompt", VALIDATION_IMAGE=image)
    assert done.returncode == 0, done.stderr
    assert "bf16" in argv[:10]
    args = parse_args(script_args(argv))
    assert args.max_train_steps == 7 and not args.push_to_hub and not args.cache_latents
    assert args.output_dir == "out" and args.validation_prompt == ["a prompt"]


@pytest.mark.parametrize("env, fragment", [
    ({"PUSH_TO_HUB": "2"}, "PUSH_TO_HUB '2' must be 1 or 0."),
    ({"VALIDATION_PROMPT": "only a prompt"}, "set both VALIDATION_PROMPT and VALIDATION_IMAGE"),
    ({"VALIDATION_PROMPT": "p", "VALIDATION_IMAGE": "/no/such.png"}, "VALIDATION_IMAGE '/no/such.png' does not"),
    ({"MODEL_NAME": "/no/such/model"}, "MODEL_NAME '/no/such/model' does not exist."),
])
def test_bad_settings_are_one_line_exit_2(sandbox, env, fragment):
    """Each bad setting: one line on stderr naming it, exit 2, nothing launched."""
    done, argv = run_sh(sandbox, **env)
    assert done.returncode == 2 and argv is None
    assert done.stderr.strip() == f"train_controlnet.sh: error: {done.stderr.split('error: ', 1)[1].strip()}"
    assert fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_data_without_conditioning_is_refused(sandbox):
    """A text-to-image folder (no conditioning_image) is one line, exit 2."""
    (sandbox["data"] / "metadata.jsonl").write_text('{"file_name": "rsicd_images/image_000001.png", "text": "x"}\n')
    done, argv = run_sh(sandbox)
    assert done.returncode == 2 and argv is None and "names no conditioning_image" in done.stderr


def test_trainer_usage_error_is_one_line_through_the_launcher(sandbox, tiny_model_dir):
    """Through utils/launch.py (no ACCELERATE): the trainer's own check, once, one line, exit 2, no traceback."""
    env = {k: v for k, v in sandbox["env"].items() if k != "ACCELERATE"}
    done = subprocess.run([str(SCRIPT), "--mixed_precision=no", "--conditioning_channels=7"], cwd=sandbox["tmp"],
                          env={**env, "MODEL_NAME": str(tiny_model_dir), "PUSH_TO_HUB": "0",
                               "REPORT_TO": "tensorboard", "PYTHON": str(Path(os.sys.executable))},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: --conditioning_channels 7 does not match the conditioning: mask gives 3 channels."]
