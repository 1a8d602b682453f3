"""generate.py end to end on a 2-step training run of the tiny pipeline (with EMA and one checkpoint): run folder
and checkpoint inputs, prompts, seeds, outputs, schedulers, defaults and refusals.

Each generate.py process costs ~4 s of imports, so the runs are made once per module and the tests read their
folders: the main ones as users run them (subprocesses, one thread each), the variations on them and most refusals
through generate.main in this process, and two refusals again through the real script.
"""

import contextlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import warm
from conftest import REPO_ROOT
from warm import single_thread_env
from inference.args import build_parser
from inference.schedulers import SCHEDULERS
from utils import grids
from utils.cli import run_main
from utils.constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
from utils.logger import LOGGER_NAME

PROMPTS = ["a satellite image of a crop field", "a river through a forest"]
FILE_PROMPTS = ["an airport with two runways", "a harbour full of boats"]
NEGATIVE = "clouds"
SEED = 11
HEIGHT, WIDTH = 32, 48
STEPS = 2
GUIDANCE = 5.0
PER_PROMPT = 2


def run(command) -> subprocess.CompletedProcess:
    """A repo script as users run it from the repo root: offline, one thread, wandb without login."""
    return warm.run([sys.executable, *map(str, command)], cwd=REPO_ROOT, env=single_thread_env(), timeout=300)


def run_two_at_a_time(commands: dict) -> dict:
    """name -> CompletedProcess for name -> command, two processes at a time (the box has 2 cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def generate_command(model, output_dir, *extra) -> list:
    """generate.py with the shared quick settings; P0 with NEGATIVE and SEED is every run's comparable image."""
    return ["generate.py", "--model", model, "--output_dir", output_dir, "--height", HEIGHT, "--width", WIDTH,
            "--num_inference_steps", STEPS, "--guidance_scale", GUIDANCE, "--negative_prompt", NEGATIVE, *extra]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sidecar(folder, index: int = 0) -> dict:
    return json.loads((folder / f"{index:06d}.json").read_text())


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """OUTPUT_DIR of a 2-step EMA run at 32 px: the final pipeline plus checkpoint-2/{unet,unet_ema}."""
    output = tmp_path_factory.mktemp("generate_run") / "run"
    done = run(["train_text_to_image.py", "--pretrained_model_name_or_path", tiny_model_dir,
                "--train_data_dir", tiny_data_dir, "--output_dir", output, "--resolution", 32, "--center_crop",
                "--train_batch_size", 1, "--max_train_steps", 2, "--checkpointing_steps", 2, "--use_ema",
                "--learning_rate", "5e-4", "--lr_scheduler", "constant", "--seed", 0])
    assert done.returncode == 0, done.stderr[-4000:]
    assert (output / "model_index.json").is_file() and (output / "checkpoint-2" / "unet_ema").is_dir()
    return output


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Another random tiny pipeline: other VAE and text encoder than the run's, same UNet shape."""
    from stand_in.tiny_model import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("other_base") / "pipeline", seed=1)


@contextlib.contextmanager
def restored_process_state():
    """Put back what generate.main changes process-wide: torch threads, library verbosity and bars, our logger."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    logger = logging.getLogger(LOGGER_NAME)
    saved_logger = (list(logger.handlers), logger.level, logger.propagate)
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for lib, (verbosity, bars) in zip(libraries, saved):
            lib.set_verbosity(verbosity)
            lib.enable_progress_bar() if bars else lib.disable_progress_bar()
        logger.handlers[:] = saved_logger[0]
        logger.setLevel(saved_logger[1])
        logger.propagate = saved_logger[2]


def generate_here(command) -> None:
    """generate.py's main in this process, one thread like the subprocesses: the variations on a run would each
    cost seconds of imports as processes, and main is everything the script runs but the exit."""
    import generate

    with restored_process_state():
        torch.set_num_threads(1)
        assert generate.main([str(a) for a in command[1:]]) == 0


METADATA = "gsd=0.5,lat=37.77,lon=-122.42,date=20210701"
METADATA_RECORD = {"gsd": 0.5, "lat": 37.77, "lon": -122.42, "date": "2021-07-01"}


@pytest.fixture(scope="module")
def runs(trained_run, other_base, metadata_model_dir, lora_metadata_run_dir, tmp_path_factory):
    """Every successful generate.py run: name -> (output folder, stdout or None when run in process)."""
    root = tmp_path_factory.mktemp("generated")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text(f"{FILE_PROMPTS[0]}\n\n   \n{FILE_PROMPTS[1]}\n", encoding="utf-8")
    # A previous run's leftovers that --overwrite must remove, and a file of the user's that it must keep.
    stale = root / "next_seed"
    stale.mkdir()
    for name in ("000005.png", "000005.json", "grid.png", "notes.txt"):
        (stale / name).write_bytes(b"old")
    checkpoint = trained_run / "checkpoint-2"
    one = ["--prompt", PROMPTS[0], "--seed", SEED]
    scripts = {
        "pipeline": generate_command(trained_run, root / "pipeline", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                                     "--prompts_file", prompts_file, "--num_images_per_prompt", PER_PROMPT,
                                     "--seed", SEED),
        "checkpoint_auto": generate_command(checkpoint, root / "checkpoint_auto", *one),
        # Defaults everywhere but the sampler, which no other run changes.
        "defaults": ["generate.py", "--model", trained_run, "--prompt", PROMPTS[0], "--output_dir",
                     root / "defaults", "--scheduler", "dpm++"],
    }
    in_process = {
        "same_seed": generate_command(trained_run, root / "same_seed", "--prompt", PROMPTS[0],
                                      "--num_images_per_prompt", PER_PROMPT, "--seed", SEED),
        "next_seed": generate_command(trained_run, stale, "--prompt", PROMPTS[0], "--seed", SEED + 1, "--overwrite"),
        "no_negative": [arg for arg in generate_command(trained_run, root / "no_negative", *one)
                        if arg not in ("--negative_prompt", NEGATIVE)],
        "checkpoint_unet": generate_command(checkpoint, root / "checkpoint_unet", *one, "--weights", "unet"),
        "checkpoint_base": generate_command(checkpoint, root / "checkpoint_base", *one, "--weights", "ema",
                                            "--base_model", other_base),
        "bf16": generate_command(trained_run, root / "bf16", *one, "--dtype", "bf16"),
        # A model whose UNet takes metadata: with them (guided), with them unguided, and without any.
        "metadata": generate_command(metadata_model_dir, root / "metadata", *one, "--metadata", METADATA,
                                     "--metadata_guidance_scale", 2),
        "metadata_unguided": generate_command(metadata_model_dir, root / "metadata_unguided", *one,
                                              "--metadata", METADATA),
        "metadata_absent": generate_command(metadata_model_dir, root / "metadata_absent", *one),
        # A LoRA run trained with --metadata_fields, sampled directly: its embedding goes into the base with the LoRA.
        "lora_metadata": generate_command(lora_metadata_run_dir, root / "lora_metadata", *one, "--metadata", METADATA),
        "lora_metadata_absent": generate_command(lora_metadata_run_dir, root / "lora_metadata_absent", *one),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, command) for name, command in scripts.items()}
        for command in in_process.values():
            generate_here(command)
        results = {name: future.result() for name, future in futures.items()}
    for name, done in results.items():
        assert done.returncode == 0, f"{name}:\n{done.stderr[-4000:]}"
    return {**{name: (root / name, done.stdout) for name, done in results.items()},
            **{name: (root / name, None) for name in in_process}}


def folder_of(runs, name):
    return runs[name][0]


# --- the command line


def test_default_steps_and_guidance_are_the_shared_constants():
    args = build_parser().parse_args(["--model", "m"])
    assert args.num_inference_steps == DEFAULT_NUM_INFERENCE_STEPS == 100
    assert args.guidance_scale == DEFAULT_GUIDANCE_SCALE == 7.5
    assert (args.weights, args.scheduler, args.seed, args.prompt) == ("auto", None, None, None)


def test_help_lists_every_scheduler_and_the_defaults():
    text = " ".join(build_parser().format_help().split())
    assert all(name in text for name in SCHEDULERS)
    assert "(default: 100)" in text and "(default: 7.5)" in text


# --- a run's OUTPUT_DIR


def test_one_png_and_sidecar_per_image_plus_grid(runs):
    folder, stdout = runs["pipeline"]
    count = (len(PROMPTS) + len(FILE_PROMPTS)) * PER_PROMPT
    expected = {f"{i:06d}{suffix}" for i in range(count) for suffix in (".png", ".json")} | {"grid.png"}
    assert {p.name for p in folder.iterdir()} == expected
    assert stdout.strip().splitlines()[-1] == str(folder / "grid.png")


def test_flag_prompts_then_file_prompts_each_repeated_with_seed_plus_index(runs):
    folder = folder_of(runs, "pipeline")
    records = [sidecar(folder, i) for i in range(8)]
    expected_prompts = [p for p in PROMPTS + FILE_PROMPTS for _ in range(PER_PROMPT)]
    assert [r["prompt"] for r in records] == expected_prompts
    assert [r["seed"] for r in records] == list(range(SEED, SEED + 8))
    assert [r["index"] for r in records] == list(range(8))


def test_sidecar_records_the_flags(runs, trained_run):
    record = sidecar(folder_of(runs, "pipeline"), 3)
    assert record["file_name"] == "000003.png"
    assert record["negative_prompt"] == NEGATIVE and record["num_inference_steps"] == STEPS
    assert record["guidance_scale"] == GUIDANCE and record["scheduler"] == "DDPMScheduler"
    assert record["model"] == record["pipeline"] == str(trained_run)
    assert record["unet"] is None and record["weights"] == "pipeline"
    assert (record["width"], record["height"]) == (WIDTH, HEIGHT)
    assert (record["device"], record["dtype"]) == ("cpu", "float32")
    assert record["metadata"] == {} and record["metadata_guidance_scale"] == 1.0


def test_negative_prompt_reaches_the_sampler(runs):
    without = folder_of(runs, "no_negative")
    assert sidecar(without)["negative_prompt"] is None
    assert not np.array_equal(pixels(without / "000000.png"), pixels(folder_of(runs, "pipeline") / "000000.png"))


def test_height_and_width_are_respected_and_grid_is_a_row_per_prompt(runs):
    folder = folder_of(runs, "pipeline")
    images = [pixels(folder / f"{i:06d}.png") for i in range(8)]
    assert all(image.shape == (HEIGHT, WIDTH, 3) for image in images)
    # Tiles enlarged 4x (short side 32 -> 128 px), each prompt's row labelled with it and its seeds.
    font = grids.label_font()
    labels = [f"{prompt} (seeds {SEED + PER_PROMPT * row}-{SEED + PER_PROMPT * row + 1})"
              for row, prompt in enumerate(PROMPTS + FILE_PROMPTS)]
    layout = grids.grid_layout((4 * WIDTH, 4 * HEIGHT), 4, PER_PROMPT, grids.row_label_width(labels, font),
                               grids.line_height(font))
    grid = pixels(folder / "grid.png")
    assert grid.shape == (layout.size[1], layout.size[0], 3)
    # Image 5 is the second image of the third prompt: row 2, column 1.
    x, y = layout.origin(2, 1)
    assert np.array_equal(grid[y:y + 4 * HEIGHT, x:x + 4 * WIDTH], images[5].repeat(4, axis=0).repeat(4, axis=1))


def test_same_seed_gives_the_same_pixels(runs):
    # The rerun asks only for the first prompt's images: the first run's images 0 and 1.
    first, again = folder_of(runs, "pipeline"), folder_of(runs, "same_seed")
    for i in range(PER_PROMPT):
        assert np.array_equal(pixels(first / f"{i:06d}.png"), pixels(again / f"{i:06d}.png")), i


def test_dtype_bf16_samples_in_bf16_close_to_fp32(runs):
    """--dtype bf16 on CPU: recorded, and the same draw as fp32 within bf16's rounding (not the same bytes)."""
    bf16, fp32 = folder_of(runs, "bf16"), folder_of(runs, "pipeline")
    assert sidecar(bf16)["dtype"] == "bfloat16" and sidecar(fp32)["dtype"] == "float32"
    difference = np.abs(pixels(bf16 / "000000.png").astype(int) - pixels(fp32 / "000000.png").astype(int))
    assert 0 < difference.mean() < 8, difference.mean()


def test_other_seed_gives_other_pixels_and_seed_plus_i_redraws_image_i(runs):
    first, other = folder_of(runs, "pipeline"), folder_of(runs, "next_seed")
    redrawn = pixels(other / "000000.png")
    assert not np.array_equal(redrawn, pixels(first / "000000.png"))
    # Image 1 of the first run is the same prompt drawn with SEED + 1.
    assert np.array_equal(redrawn, pixels(first / "000001.png"))


def test_overwrite_replaces_previous_images_and_keeps_other_files(runs):
    folder = folder_of(runs, "next_seed")
    assert {p.name for p in folder.iterdir()} == {"000000.png", "000000.json", "grid.png", "notes.txt"}
    assert (folder / "notes.txt").read_bytes() == b"old" and (folder / "grid.png").read_bytes() != b"old"


def test_defaults_are_100_steps_guidance_7_5_the_models_size_and_a_recorded_seed(runs, trained_run):
    record = sidecar(folder_of(runs, "defaults"))
    assert record["num_inference_steps"] == DEFAULT_NUM_INFERENCE_STEPS
    assert record["guidance_scale"] == DEFAULT_GUIDANCE_SCALE and record["negative_prompt"] is None
    assert isinstance(record["seed"], int) and 0 <= record["seed"] < 2**31
    unet = json.loads((trained_run / "unet" / "config.json").read_text())
    vae = json.loads((trained_run / "vae" / "config.json").read_text())
    side = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert (record["width"], record["height"]) == (side, side)


def test_scheduler_flag_samples_with_that_scheduler(runs):
    folder = folder_of(runs, "defaults")
    assert sidecar(folder)["scheduler"] == SCHEDULERS["dpm++"]
    assert pixels(folder / "000000.png").std() > 0


# --- a model trained with metadata


def test_metadata_are_recorded_normalised_and_change_the_image(runs):
    guided, unguided, absent = (folder_of(runs, name) for name in ("metadata", "metadata_unguided", "metadata_absent"))
    assert sidecar(guided)["metadata"] == sidecar(unguided)["metadata"] == METADATA_RECORD
    assert sidecar(guided)["metadata_guidance_scale"] == 2.0 and sidecar(unguided)["metadata_guidance_scale"] == 1.0
    assert sidecar(absent)["metadata"] == {}
    images = [pixels(folder / "000000.png") for folder in (guided, unguided, absent)]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_metadata_model_without_metadata_samples_all_absent(runs, metadata_model_dir):
    from inference.metadata_pipeline import MetadataStableDiffusionPipeline

    pipeline = MetadataStableDiffusionPipeline.from_pretrained(metadata_model_dir, safety_checker=None,
                                                               requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(SEED)
    with restored_process_state():
        torch.set_num_threads(1)
        image = pipeline(PROMPTS[0], negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, generator=generator,
                         num_inference_steps=STEPS, guidance_scale=GUIDANCE, metadata={}).images[0]
    assert np.array_equal(pixels(folder_of(runs, "metadata_absent") / "000000.png"), np.asarray(image))


def test_lora_run_with_metadata_samples_directly(runs, lora_metadata_run_dir):
    """generate.py --metadata on a LoRA + metadata run: recorded normalised, and the image follows the metadata."""
    given, absent = folder_of(runs, "lora_metadata"), folder_of(runs, "lora_metadata_absent")
    assert sidecar(given)["metadata"] == METADATA_RECORD and sidecar(absent)["metadata"] == {}
    assert sidecar(given)["lora"] == str(lora_metadata_run_dir)
    assert not np.array_equal(pixels(given / "000000.png"), pixels(absent / "000000.png"))


# --- a checkpoint-N folder


def test_checkpoint_auto_puts_unet_ema_into_the_runs_own_pipeline(runs, trained_run):
    folder = folder_of(runs, "checkpoint_auto")
    record = sidecar(folder)
    assert record["model"] == str(trained_run / "checkpoint-2") and record["pipeline"] == str(trained_run)
    assert record["unet"] == str(trained_run / "checkpoint-2" / "unet_ema") and record["weights"] == "ema"
    # The final pipeline of an EMA run ships the EMA UNet of the last step: the same pixels.
    assert np.array_equal(pixels(folder / "000000.png"), pixels(folder_of(runs, "pipeline") / "000000.png"))


def test_checkpoint_weights_unet_samples_the_raw_unet(runs, trained_run):
    folder = folder_of(runs, "checkpoint_unet")
    record = sidecar(folder)
    assert record["unet"] == str(trained_run / "checkpoint-2" / "unet") and record["weights"] == "unet"
    assert not np.array_equal(pixels(folder / "000000.png"), pixels(folder_of(runs, "checkpoint_auto") / "000000.png"))


def test_checkpoint_with_base_model_takes_the_other_pieces_from_it(runs, other_base, trained_run):
    folder = folder_of(runs, "checkpoint_base")
    record = sidecar(folder)
    assert record["pipeline"] == str(other_base)
    assert record["unet"] == str(trained_run / "checkpoint-2" / "unet_ema")
    assert not np.array_equal(pixels(folder / "000000.png"), pixels(folder_of(runs, "checkpoint_auto") / "000000.png"))


# --- refusals: one line on stderr naming the bad value, exit code 2, nothing deleted

PREVIOUS = ("000000.png", "000000.json", "grid.png")


def with_previous_images(folder):
    folder.mkdir()
    for name in PREVIOUS:
        (folder / name).write_bytes(b"old")
    return folder


def kept_previous_images(folder) -> bool:
    return sorted(p.name for p in folder.iterdir()) == sorted(PREVIOUS) and all(
        (folder / name).read_bytes() == b"old" for name in PREVIOUS)


@pytest.fixture
def paths(tmp_path, tiny_model_dir, trained_run, metadata_model_dir, control_inputs) -> dict:
    """The pieces bad command lines are made of; 'kept' holds a previous run's images."""
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    np.save(tmp_path / "three_bands.npy", np.ones((3, 8, 8), np.float32))
    # A checkpoint of a run that has not finished: no pipeline beside it.
    shutil.copytree(trained_run / "checkpoint-2" / "unet", tmp_path / "unfinished" / "checkpoint-2" / "unet")
    return {"model": tiny_model_dir, "out": tmp_path / "out", "missing": tmp_path / "no-run",
            "blank": tmp_path / "blank.txt", "kept": with_previous_images(tmp_path / "kept"),
            "unfinished": tmp_path / "unfinished" / "checkpoint-2", "metadata_model": metadata_model_dir,
            "three_bands": tmp_path / "three_bands.npy", **{key: control_inputs[key] for key in
                                                             ("controlnet", "bands_controlnet", "masks", "m0",
                                                              "wide_controlnet")}}


# name -> (argv, text the one stderr line must hold), with {placeholders} filled from the paths fixture.
REFUSALS = {
    "missing_model": (["--model", "{missing}", "--prompt", "a", "--output_dir", "{out}"],
                      "--model '{missing}' does not exist"),
    "height": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}", "--height", "30"],
               "--height 30 must be a positive multiple of 8"),
    "empty_prompts_file": (["--model", "{model}", "--prompts_file", "{blank}", "--output_dir", "{out}"],
                           "--prompts_file '{blank}' holds no prompt (only blank lines)"),
    "unknown_scheduler": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}", "--scheduler", "lms"],
                          "argument --scheduler: invalid choice: 'lms'"),
    "no_prompt": (["--model", "{model}", "--output_dir", "{out}"], "no prompt: pass --prompt TEXT"),
    "no_model": (["--prompt", "a", "--output_dir", "{out}"], "the following arguments are required: --model"),
    "zero_steps": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}", "--num_inference_steps", "0"],
                   "--num_inference_steps 0 must be at least 1"),
    "nan_guidance": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}", "--guidance_scale", "nan"],
                     "--guidance_scale nan must be a finite number"),
    "seed_past_torchs_limit": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}",
                                "--seed", str(2**64 - 1), "--num_images_per_prompt", "2"],
                               f"--seed {2**64 - 1} is too large"),
    "fp16_on_cpu": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}", "--dtype", "fp16",
                     "--device", "cpu"], "--dtype fp16 needs a CUDA device and this run is on cpu: use --dtype bf16"),
    "previous_images": (["--model", "{model}", "--prompt", "a", "--output_dir", "{kept}"],
                        "--output_dir '{kept}' already holds generated images (000000"),
    "overwrite_with_missing_model": (["--model", "{missing}", "--prompt", "a", "--output_dir", "{kept}",
                                      "--overwrite"], "--model '{missing}' does not exist"),
    "overwrite_with_zero_batch": (["--model", "{model}", "--prompt", "a", "--output_dir", "{kept}", "--overwrite",
                                   "--batch_size", "0"], "--batch_size 0 must be at least 1"),
    "unfinished_checkpoint_offline": (["--model", "{unfinished}", "--prompt", "a", "--output_dir", "{out}"],
                                      "checkpoint '{unfinished}' is not a pipeline and its run folder holds none "
                                      "yet; pass the pipeline it was trained from as --base_model"),
    "metadata_bad_value": (["--model", "{metadata_model}", "--prompt", "a", "--output_dir", "{out}",
                            "--metadata", "gsd=0.5,lat=91,lon=0"], "argument --metadata: lat=91: outside [-90, 90]"),
    "metadata_unknown_field": (["--model", "{metadata_model}", "--prompt", "a", "--output_dir", "{out}",
                                "--metadata", "scale=2"], "unknown field 'scale' (known: gsd, lat, lon, date"),
    "metadata_untrained_field": (["--model", "{metadata_model}", "--prompt", "a", "--output_dir", "{kept}",
                                  "--overwrite", "--metadata", "sensor=naip"],
                                 "--metadata: metadata field 'sensor' is not one the model was trained on"),
    "metadata_without_spec": (["--model", "{model}", "--prompt", "a", "--output_dir", "{kept}", "--overwrite",
                               "--metadata", "gsd=1"], "--metadata: metadata ['gsd'] given, but the model's UNet "
                                                       "has no metadata_spec.json"),
    "metadata_guidance_without_spec": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}",
                                        "--metadata_guidance_scale", "3"],
                                       "--metadata_guidance_scale 3.0 needs a model trained with --metadata_fields"),
    # ControlNet flags: pairings, description and control files checked before anything loads.
    "control_image_without_controlnet": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}",
                                          "--control_image", "{m0}"],
                                         "--control_image '{m0}' needs --controlnet DIR"),
    "controlnet_without_control_image": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}",
                                          "--controlnet", "{controlnet}"],
                                         "--controlnet '{controlnet}' needs --control_image"),
    "scale_without_controlnet": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}",
                                  "--controlnet_conditioning_scale", "0.5"],
                                 "--controlnet_conditioning_scale 0.5 applies with --controlnet only"),
    "controlnet_with_metadata": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}", "--controlnet",
                                  "{controlnet}", "--control_image", "{m0}", "--metadata", "gsd=1"],
                                 "--metadata and --metadata_guidance_scale cannot be combined with --controlnet"),
    "band_count_mismatch": (["--model", "{model}", "--prompt", "a", "--output_dir", "{kept}", "--overwrite",
                             "--controlnet", "{bands_controlnet}", "--control_image", "{three_bands}"],
                            "--control_image: {three_bands}: 3 bands, the ControlNet was trained on 2"),
    "prompts_and_control_images_do_not_pair": (["--model", "{model}", "--prompt", "a", "--prompt", "b", "--prompt",
                                                "c", "--output_dir", "{out}", "--controlnet", "{controlnet}",
                                                "--control_image", "{masks}"],
                                               "3 prompts and 2 control images: give one prompt, one control image"),
    "missing_control_image": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}", "--controlnet",
                               "{controlnet}", "--control_image", "{missing}"],
                              "--control_image '{missing}' does not exist"),
    "controlnet_is_not_a_controlnet": (["--model", "{model}", "--prompt", "a", "--output_dir", "{out}",
                                        "--controlnet", "{model}/unet", "--control_image", "{m0}"],
                                       "holds a UNet2DConditionModel model, not a ControlNetModel"),
    "controlnet_channels_disagree_with_description": (["--model", "{model}", "--prompt", "a", "--output_dir",
                                                       "{out}", "--controlnet", "{wide_controlnet}",
                                                       "--control_image", "{m0}"],
                                                      "takes 5 conditioning channel(s), but its description"),
}


def refusal(case: str, paths: dict) -> tuple:
    """(argv, expected text) of a REFUSALS case for these paths."""
    argv, expected = REFUSALS[case]
    return [arg.format(**paths) for arg in argv], expected.format(**paths)


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """generate.main in this process (a subprocess per case costs seconds of imports), offline with an empty Hub
    cache so the machine's cache cannot decide the outcome."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    with restored_process_state():
        yield


def refuse(argv, capsys) -> tuple:
    """(exit code, stderr lines) of generate.py's main run as the script runs it."""
    import generate

    with pytest.raises(SystemExit) as exited:
        run_main(generate.main, argv)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_one_stderr_line_naming_it_with_exit_code_2(case, paths, in_process, capsys):
    argv, expected = refusal(case, paths)
    code, lines = refuse(argv, capsys)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


@pytest.mark.parametrize("case", ["previous_images", "overwrite_with_missing_model", "overwrite_with_zero_batch",
                                  "metadata_untrained_field", "metadata_without_spec", "band_count_mismatch"])
def test_refused_run_leaves_previous_images_in_place(case, paths, in_process, capsys):
    # --overwrite must not delete a previous run's images when the command is refused anyway.
    refuse(refusal(case, paths)[0], capsys)
    assert kept_previous_images(paths["kept"])


@pytest.fixture(scope="module")
def script_refusals(tmp_path_factory, tiny_model_dir) -> dict:
    """The real script on two refusals, one from argparse and one from main: name -> CompletedProcess, and
    'kept', the previous images the second must not delete."""
    kept = with_previous_images(tmp_path_factory.mktemp("script_refusals") / "kept")
    commands = {
        "unknown_scheduler": ["generate.py", "--model", tiny_model_dir, "--prompt", "a", "--output_dir",
                              kept.parent / "out", "--scheduler", "lms"],
        "overwrite_with_missing_model": ["generate.py", "--model", kept.parent / "no-run", "--prompt", "a",
                                         "--output_dir", kept, "--overwrite"],
    }
    return {"kept": kept, **run_two_at_a_time(commands)}


@pytest.mark.parametrize("case, expected", [("unknown_scheduler", "generate.py: error: argument --scheduler"),
                                            ("overwrite_with_missing_model", "error: --model '")])
def test_script_refusal_is_one_line_exit_2_and_no_traceback(script_refusals, case, expected):
    done = script_refusals[case]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr


def test_script_refusal_with_overwrite_deletes_nothing(script_refusals):
    assert kept_previous_images(script_refusals["kept"])


# --- a ControlNet (--controlnet, --control_image, --controlnet_conditioning_scale)


def write_mask(path, split: int) -> None:
    """A 40x48 class mask: class 1 left of column split, class 3 right of it (not the 32x48 image size: resized)."""
    mask = np.ones((40, 48), np.uint8)
    mask[:, split:] = 3
    Image.fromarray(mask, mode="L").save(path)


@pytest.fixture(scope="module")
def control_inputs(tiny_model_dir, mask_controlnet_dir, tmp_path_factory) -> dict:
    """The mask ControlNet, a 2-band one, one whose conditioning.json disagrees with its weights, and a folder of
    two masks that differ (m0.png, m1.png)."""
    from conftest import save_test_controlnet

    root = tmp_path_factory.mktemp("control_inputs")
    masks = root / "masks"
    masks.mkdir()
    write_mask(masks / "m0.png", 8)
    write_mask(masks / "m1.png", 40)
    (masks / "notes.txt").write_text("not a control image")
    bands = {"type": "bands", "bands": [1, 2], "normalisation": {"offset": [0.0, 0.0], "scale": [1.0, 1.0]}}
    wide = shutil.copytree(mask_controlnet_dir, root / "wide")
    (wide / "conditioning.json").write_text(json.dumps({"type": "mask", "classes": 6}))
    return {"controlnet": mask_controlnet_dir, "masks": masks, "m0": masks / "m0.png", "m1": masks / "m1.png",
            "bands_controlnet": save_test_controlnet(tiny_model_dir, root / "bands", bands), "wide_controlnet": wide}


@pytest.fixture(scope="module")
def control_runs(runs, trained_run, control_inputs, tmp_path_factory) -> dict:
    """generate.py with the mask ControlNet, in this process: a folder of 2 masks for one prompt; the same at scale
    0; one mask file for two prompts. All with the "pipeline" run's first prompt, negative prompt and SEED."""
    root = tmp_path_factory.mktemp("control_generated")
    control = ["--controlnet", control_inputs["controlnet"], "--seed", SEED]
    commands = {
        "control": generate_command(trained_run, root / "control", "--prompt", PROMPTS[0], *control,
                                    "--control_image", control_inputs["masks"]),
        "control_zero": generate_command(trained_run, root / "control_zero", "--prompt", PROMPTS[0], *control,
                                         "--control_image", control_inputs["masks"],
                                         "--controlnet_conditioning_scale", 0),
        "control_one_file": generate_command(trained_run, root / "control_one_file", "--prompt", PROMPTS[0],
                                             "--prompt", PROMPTS[1], *control, "--control_image",
                                             control_inputs["m1"]),
    }
    for command in commands.values():
        generate_here(command)
    return {name: root / name for name in commands}


def test_pairing_follows_diffusers_validation():
    from inference.control import pair_prompts
    from utils.cli import UsageError

    a, b = Path("a.png"), Path("b.png")
    assert pair_prompts(["p"], [a, b]) == [("p", a), ("p", b)]
    assert pair_prompts(["p", "q"], [a]) == [("p", a), ("q", a)]
    assert pair_prompts(["p", "q"], [a, b]) == [("p", a), ("q", b)]
    with pytest.raises(UsageError, match="2 prompts and 3 control images"):
        pair_prompts(["p", "q"], [a, b, a])


def test_control_view_is_the_training_view_for_a_square_and_centre_crops_otherwise():
    """Sampling prepares a control image exactly as training does (shorter side, centre crop, one-hot)."""
    from trainer.controlnet_data import conditioning_view
    from utils.control_input import ControlSpec, control_view

    spec = ControlSpec(type="mask", num_classes=6)
    raw = np.random.default_rng(0).integers(0, 6, (30, 50))
    assert np.array_equal(control_view(raw, spec, 20, 20), conditioning_view(raw, spec, 20, False).numpy())
    wide = control_view(raw, spec, 50, 10)  # width kept, the 30 rows cropped to the middle 10, no resampling
    assert np.array_equal(wide.argmax(0), raw[10:20])


def test_control_folder_pairs_the_prompt_with_each_file_and_sidecars_record_them(control_runs, control_inputs):
    folder = control_runs["control"]
    records = [sidecar(folder, i) for i in range(2)]
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "grid.png"]
    assert [r["control_image"] for r in records] == [str(control_inputs["m0"]), str(control_inputs["m1"])]
    assert [r["seed"] for r in records] == [SEED, SEED + 1] and {r["prompt"] for r in records} == {PROMPTS[0]}
    assert records[0]["controlnet"] == str(control_inputs["controlnet"])
    assert records[0]["controlnet_conditioning_scale"] == 1.0 and records[0]["conditioning_type"] == "mask"
    assert all(pixels(folder / f"{i:06d}.png").shape == (HEIGHT, WIDTH, 3) for i in range(2))
    assert sidecar(control_runs["control_zero"])["controlnet_conditioning_scale"] == 0.0


def test_the_control_image_steers_and_scale_zero_draws_the_base_image(runs, control_runs):
    plain = pixels(folder_of(runs, "pipeline") / "000000.png")  # same base, prompt, negative prompt and seed
    with_m0 = pixels(control_runs["control"] / "000000.png")
    with_m1 = pixels(control_runs["control_one_file"] / "000000.png")
    # a control image the ControlNet ignored would give the very same pixels (seen: 0.0 before its embedding counted)
    assert np.abs(with_m0.astype(int) - plain).mean() > 2 and np.abs(with_m0.astype(int) - with_m1).mean() > 0.2
    assert np.abs(pixels(control_runs["control_zero"] / "000000.png").astype(int) - plain).max() <= 1


def test_one_control_file_serves_every_prompt_and_the_grid_shows_it(control_runs, control_inputs):
    from utils.control_input import ControlSpec, control_array, false_colour

    folder = control_runs["control_one_file"]
    assert [sidecar(folder, i)["prompt"] for i in range(2)] == PROMPTS[:2]
    assert {sidecar(folder, i)["control_image"] for i in range(2)} == {str(control_inputs["m1"])}
    # Grid: a "control" column first (the mask in false colour, centre-cropped to 32x48), then the image.
    font = grids.label_font()
    labels = [f"{prompt} (seed {SEED + row})" for row, prompt in enumerate(PROMPTS[:2])]
    layout = grids.grid_layout((4 * WIDTH, 4 * HEIGHT), 2, 2, grids.row_label_width(labels, font),
                               grids.line_height(font))
    grid = pixels(folder / "grid.png")
    assert grid.shape == (layout.size[1], layout.size[0], 3)
    spec = ControlSpec(type="mask", num_classes=5)
    shown = np.asarray(false_colour(control_array(control_inputs["m1"], spec)[:, 4:36], spec))
    x, y = layout.origin(1, 0)
    assert np.array_equal(grid[y:y + 4 * HEIGHT, x:x + 4 * WIDTH], shown.repeat(4, axis=0).repeat(4, axis=1))


def test_each_image_of_a_batch_gets_its_own_control_image_and_the_scale():
    from inference.control import control_batches

    views = [np.full((4, 2, 2), value, np.float32) for value in range(3)]
    extra = control_batches(views, 0.25)(range(1, 3))
    assert extra["controlnet_conditioning_scale"] == 0.25
    assert extra["image"].shape == (2, 4, 2, 2) and extra["image"][:, 0, 0, 0].tolist() == [1.0, 2.0]
