"""train.sh: the seed's flags, env overrides, last-wins extra args, accelerate config detection, checks, end to end."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.args import parse_args

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO_ROOT / "train.sh"
ENTRY = REPO_ROOT / "train_text_to_image.py"
SEED_FLAGS = [
    "--resolution=512", "--train_batch_size=1", "--gradient_accumulation_steps=4", "--gradient_checkpointing",
    "--mixed_precision=fp16", "--use_ema", "--max_train_steps=3500", "--learning_rate=1e-06", "--max_grad_norm=1",
    "--lr_scheduler=constant", "--lr_warmup_steps=0", "--checkpointing_steps=500",
    "--validation_prompt=A satellite image of a crop field", "--validation_epochs=10",
]
# Writes each argument on its own line, so the test sees exactly what train.sh passed.
FAKE_ACCELERATE = '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGV_FILE"\n'
ISOLATED_VARS = ("HF_HOME", "XDG_CACHE_HOME", "ACCELERATE_CONFIG_FILE", "MODEL_NAME", "DATA_DIR", "OUTPUT_DIR",
                 "REPORT_TO", "PUSH_TO_HUB", "ACCELERATE", "HF_TOKEN", "CACHE_LATENTS", "LORA_RANK", "THROUGHPUT",
                 "THROUGHPUT_BATCH", "LAUNCH_ARGS")


@pytest.fixture()
def sandbox(tmp_path) -> dict:
    """A fake `accelerate` (ACCELERATE, first on PATH), an empty HOME, and a data dir holding metadata.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(FAKE_ACCELERATE)
    (bin_dir / "accelerate").chmod(0o755)
    data = tmp_path / "data"
    (data / "rsicd_images").mkdir(parents=True)
    (data / "metadata.jsonl").write_text('{"file_name": "rsicd_images/a.jpg", "text": "x"}\n')
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ISOLATED_VARS}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(tmp_path / "home"),
               ARGV_FILE=str(tmp_path / "argv.txt"), DATA_DIR=str(data), ACCELERATE=str(bin_dir / "accelerate"))
    return {"env": env, "tmp": tmp_path, "data": data, "argv_file": tmp_path / "argv.txt"}


def run_train_sh(sandbox, *args, **env):
    """Run train.sh from a foreign cwd; return (CompletedProcess, argv given to accelerate or None)."""
    full_env = {**sandbox["env"], **{k: str(v) for k, v in env.items()}}
    done = subprocess.run([str(TRAIN_SH), *args], cwd=sandbox["tmp"], env=full_env, capture_output=True,
                          text=True, timeout=60)
    argv_file = sandbox["argv_file"]
    return done, (argv_file.read_text().splitlines() if argv_file.exists() else None)


def script_args(argv) -> list:
    """The arguments after the entry script in accelerate's argv."""
    assert str(ENTRY) in argv, argv
    return argv[argv.index(str(ENTRY)) + 1:]


def test_default_flags(sandbox):
    """Without overrides: the seed's flags, wandb, push, and a single-process launch with fp16 from the flags."""
    done, argv = run_train_sh(sandbox)
    assert done.returncode == 0, done.stderr
    assert argv[:10] == ["launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
                         "--mixed_precision", "fp16", str(ENTRY)]
    passed = script_args(argv)
    assert passed == [
        "--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5",
        f"--train_data_dir={sandbox['data']}", "--output_dir=sd-rsicd-model", *SEED_FLAGS, "--report_to=wandb",
        "--push_to_hub", "--center_crop", "--cache_latents",
    ]
    args = parse_args(passed)
    assert args.validation_prompts == ["A satellite image of a crop field"] and args.push_to_hub
    assert args.cache_latents and args.center_crop


def test_cache_latents_off(sandbox):
    """CACHE_LATENTS=0: neither the cache nor the centre crop (random crops, as the reference)."""
    done, argv = run_train_sh(sandbox, CACHE_LATENTS=0)
    assert done.returncode == 0, done.stderr
    passed = script_args(argv)
    assert "--cache_latents" not in passed and "--center_crop" not in passed


def test_throughput_recipe(sandbox):
    """THROUGHPUT=1: bf16 (launch and trainer), a large batch without accumulation or checkpointing, fused AdamW,
    foreach EMA, channels-last and torch.compile, on the cache; THROUGHPUT_BATCH sets the batch."""
    done, argv = run_train_sh(sandbox, THROUGHPUT=1, THROUGHPUT_BATCH=48)
    assert done.returncode == 0, done.stderr
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"
    args = parse_args(script_args(argv))
    assert (args.train_batch_size, args.gradient_accumulation_steps, args.mixed_precision) == (48, 1, "bf16")
    assert not args.gradient_checkpointing and args.optimizer_impl == "fused" and args.foreach_ema and args.use_ema
    assert args.channels_last and args.torch_compile and args.cache_latents and args.center_crop
    default, _ = run_train_sh(sandbox, THROUGHPUT=1)
    assert parse_args(script_args(sandbox["argv_file"].read_text().splitlines())).train_batch_size == 32, default


def test_report_to_and_push_overrides(sandbox):
    """REPORT_TO and PUSH_TO_HUB=0 come from the environment."""
    done, argv = run_train_sh(sandbox, REPORT_TO="tensorboard", PUSH_TO_HUB=0, MODEL_NAME="org/model",
                              OUTPUT_DIR="out")
    assert done.returncode == 0, done.stderr
    passed = script_args(argv)
    assert "--report_to=tensorboard" in passed and "--push_to_hub" not in passed
    assert "--pretrained_model_name_or_path=org/model" in passed and "--output_dir=out" in passed


def test_extra_args_last_and_win(sandbox):
    """Extra arguments are appended after the defaults, so argparse's last-wins applies to them."""
    done, argv = run_train_sh(sandbox, "--max_train_steps=10", "--resolution=64", "--mixed_precision", "no")
    assert done.returncode == 0, done.stderr
    passed = script_args(argv)
    assert passed[-4:] == ["--max_train_steps=10", "--resolution=64", "--mixed_precision", "no"]
    args = parse_args(passed)
    assert (args.max_train_steps, args.resolution, args.mixed_precision) == (10, 64, "no")
    assert argv[argv.index("--mixed_precision") + 1] == "no"


@pytest.mark.parametrize("where", ["home", "hf_home", "explicit"])
def test_uses_accelerate_config_when_present(sandbox, where):
    """A config from `accelerate config` (HOME or HF_HOME) or ACCELERATE_CONFIG_FILE replaces the default launch."""
    env = {}
    if where == "home":
        config = sandbox["tmp"] / "home" / ".cache" / "huggingface" / "accelerate" / "default_config.yaml"
    elif where == "hf_home":
        config = sandbox["tmp"] / "hf" / "accelerate" / "default_config.yaml"
        env["HF_HOME"] = sandbox["tmp"] / "hf"
    else:
        config = sandbox["tmp"] / "my_config.yaml"
        env["ACCELERATE_CONFIG_FILE"] = config
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("compute_environment: LOCAL_MACHINE\n")
    done, argv = run_train_sh(sandbox, **env)
    assert done.returncode == 0, done.stderr
    assert argv[:4] == ["launch", "--config_file", str(config), str(ENTRY)]


def assert_usage_error(done, argv, *fragments):
    """Exit 2, one stderr line with the fragments, accelerate never started."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert argv is None


def test_missing_data_dir(sandbox):
    """A DATA_DIR that does not exist stops before launching."""
    done, argv = run_train_sh(sandbox, DATA_DIR=sandbox["tmp"] / "nope")
    assert_usage_error(done, argv, "DATA_DIR", "does not exist")


def test_images_folder_hint(sandbox):
    """DATA_DIR=rsicd_images/ names the parent to use instead."""
    done, argv = run_train_sh(sandbox, DATA_DIR=sandbox["data"] / "rsicd_images")
    assert_usage_error(done, argv, "set DATA_DIR to its parent", str(sandbox["data"]))


def test_folder_without_metadata(sandbox):
    """A folder with no metadata.jsonl (and none above it) says to run format.py."""
    (sandbox["tmp"] / "empty").mkdir()
    done, argv = run_train_sh(sandbox, DATA_DIR=sandbox["tmp"] / "empty")
    assert_usage_error(done, argv, "holds no metadata.jsonl", "format.py")


def test_sharded_folder_is_a_data_dir(sandbox):
    """A sharded folder (create.py --output_format webdataset: shards_index.parquet, no metadata.jsonl) is passed on
    to the trainer as --train_data_dir."""
    shards = sandbox["tmp"] / "shards"
    shards.mkdir()
    (shards / "shards_index.parquet").write_bytes(b"")
    done, argv = run_train_sh(sandbox, DATA_DIR=shards)
    assert done.returncode == 0, done.stderr
    assert f"--train_data_dir={shards}" in script_args(argv)


@pytest.mark.parametrize("env,fragment", [({"PUSH_TO_HUB": "yes"}, "PUSH_TO_HUB 'yes'"),
                                          ({"CACHE_LATENTS": "on"}, "CACHE_LATENTS 'on'"),
                                          ({"THROUGHPUT": "yes"}, "THROUGHPUT 'yes'"),
                                          ({"THROUGHPUT": "1", "THROUGHPUT_BATCH": "0"}, "THROUGHPUT_BATCH '0'"),
                                          ({"THROUGHPUT": "1", "CACHE_LATENTS": "0"}, "CACHE_LATENTS=0"),
                                          ({"ACCELERATE_CONFIG_FILE": "/no/such.yaml"}, "ACCELERATE_CONFIG_FILE"),
                                          ({"ACCELERATE": "/no/such/accelerate"}, "not found"),
                                          ({"MODEL_NAME": "./no/such/model"}, "MODEL_NAME")])
def test_bad_settings(sandbox, env, fragment):
    """Each bad setting is one line, exit 2."""
    done, argv = run_train_sh(sandbox, **env)
    assert_usage_error(done, argv, fragment)


def test_hub_token_argument_refused(sandbox):
    """A token must not travel on a command line; the message does not echo it."""
    done, argv = run_train_sh(sandbox, "--hub_token=hf_SECRETvalue123")
    assert_usage_error(done, argv, "HF_TOKEN")
    assert "hf_SECRETvalue123" not in done.stderr


def real_env(tmp_path, model_dir, data_dir, **env) -> dict:
    """The environment of a real train.sh run: this venv's Python first on PATH, an empty HOME, offline."""
    full = {k: v for k, v in os.environ.items() if k not in ISOLATED_VARS}
    full.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{full['PATH']}", HOME=str(tmp_path),
                MODEL_NAME=str(model_dir), DATA_DIR=str(data_dir), OUTPUT_DIR=str(tmp_path / "out"),
                REPORT_TO="tensorboard", PUSH_TO_HUB="0", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                OMP_NUM_THREADS="1")
    full.update({k: str(v) for k, v in env.items()})
    return full


def run_real(folder: Path, model_dir, data_dir, flags, **env) -> subprocess.CompletedProcess:
    """The real train.sh in folder (its HOME and cwd; OUTPUT_DIR folder/out), capturing its output."""
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(TRAIN_SH), *flags], cwd=folder, env=real_env(folder, model_dir, data_dir, **env),
                          capture_output=True, text=True, timeout=900)


USAGE_ERRORS = [
    (["--resolution=63"], {}, "--resolution 63"),
    (["--push_to_hub"], {"HF_HUB_OFFLINE": "0"}, "needs a Hugging Face login"),  # HOME holds no login, no HF_TOKEN
    (["--push_to_hub"], {}, "HF_HUB_OFFLINE is set"),
    (["--enable_xformers_memory_efficient_attention"], {}, "needs xformers"),
]


def nan_model(model_dir: Path, folder: Path) -> Path:
    """A copy of the tiny pipeline whose UNet outputs NaN, so the first training loss is NaN."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v * float("nan") if k.startswith("conv_out.") else v for k, v in state.items()}, weights)
    return folder


@pytest.fixture(scope="module")
def real_runs(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """Every run of the real accelerate and trainer, two at a time (each trainer is single-threaded):
    name -> (its folder, CompletedProcess)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("real_train_sh")
    jobs = {
        "end_to_end": (tiny_model_dir, ["--max_train_steps=2", "--resolution=64", "--mixed_precision=no",
                                        "--checkpointing_steps=1000", "--validation_epochs=1000",
                                        "--dataloader_num_workers=0"], {}),
        "diverged": (nan_model(tiny_model_dir, root / "nan_model"),
                     ["--max_train_steps=2", "--resolution=32", "--mixed_precision=no",
                      "--gradient_accumulation_steps=1", "--validation_epochs=1000", "--dataloader_num_workers=0"],
                     {"CACHE_LATENTS": 0}),
        **{f"usage-{i}": (tiny_model_dir, ["--mixed_precision=no", *flags], env)
           for i, (flags, env, _) in enumerate(USAGE_ERRORS)},
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_real, root / name, model, tiny_data_dir, flags, **env)
                   for name, (model, flags, env) in jobs.items()}
        return {name: (root / name, future.result()) for name, future in futures.items()}


def test_real_run_end_to_end(real_runs):
    """The real accelerate and trainer: the tiny model for 2 steps at 64 px gives a loadable pipeline and a card,
    and no datasets progress bars."""
    folder, done = real_runs["end_to_end"]
    out = folder / "out"
    assert done.returncode == 0, done.stderr[-4000:]
    # HOME is empty, so datasets reads the folder into a fresh cache, which is when its bars would show.
    assert "Generating train split" not in done.stderr and "Downloading data" not in done.stderr, done.stderr[-4000:]
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("checkpoint-*"))
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["pipeline_tag"] == "text-to-image"
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert list((out / ".cache" / "latents").glob("*/manifest.json"))  # train.sh caches by default


@pytest.mark.parametrize("index", range(len(USAGE_ERRORS)), ids=[fragment for _, _, fragment in USAGE_ERRORS])
def test_trainer_usage_error_is_one_line_through_train_sh(real_runs, index):
    """The real launcher: the trainer's one line, exit 2, no accelerate traceback (the checks run before launch)."""
    fragment = USAGE_ERRORS[index][2]
    if fragment == "needs xformers" and importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    _, done = real_runs[f"usage-{index}"]
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr[-3000:]
    assert fragment in done.stderr and "Traceback" not in done.stderr


def test_diverged_run_exits_1_without_launcher_traceback(real_runs):
    """A NaN loss: the trainer's message, exit 1 (not accelerate's CalledProcessError), nothing saved."""
    folder, done = real_runs["diverged"]
    assert done.returncode == 1, done.stderr[-3000:]
    assert "loss is nan" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "CalledProcessError" not in done.stderr
    assert not (folder / "out" / "model_index.json").exists()
