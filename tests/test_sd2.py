"""SD 2.x bases end to end, as users run them: the tiny SD2-shaped presets (stand_in.tiny_model sd2 = 2.1-base,
sd2_v = the 768 v-prediction model) and an SD2-shaped v-prediction pipeline built here from raw diffusers and
transformers constructors, through create.py → format.py → train_text_to_image.py / train.sh → generate.py →
evaluate.py.

Runs are shared through module fixtures and run two at a time. Every run names its base model folder
(`sd2_bases[name]`), so further modes (LoRA) add a run on the same bases. Random weights cannot show that a model
samples well, so prediction-type plumbing is checked with an ideal velocity predictor put in place of the UNet:
sampled with the scheduler a run exports (or validates with), it must land on its data point.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

import warm
from conftest import REPO_ROOT, run_script_at
from warm import single_thread_env

PROMPT = "a satellite image of a crop field"
BASE_RESOLUTION = 32  # the 2.1-base stand-in trains at 32 px here, as 2.1-base does at 512
V_RESOLUTION = 48  # and the 768 model's stand-in at 1.5x that, as 2.1 does at 768
DATA_ROWS = 8


def run(command: list, **env) -> subprocess.CompletedProcess:
    """Run a command from the repo root, capturing its output."""
    return warm.run([str(c) for c in command], cwd=REPO_ROOT, env={**single_thread_env(), **env}, timeout=600)


def run_two_at_a_time(commands: dict) -> dict:
    """name -> CompletedProcess for name -> (command, env), two processes at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, command, **env) for name, (command, env) in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def succeeded(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """done, after failing the test with its stderr unless it exited 0."""
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def train_command(base: Path, data: Path, output: Path, resolution: int, *extra) -> list:
    """train_text_to_image.py, full fine-tune: 2 steps, one checkpoint, a validation prompt, EMA."""
    return [sys.executable, REPO_ROOT / "train_text_to_image.py", "--pretrained_model_name_or_path", base,
            "--train_data_dir", data, "--output_dir", output, "--resolution", resolution, "--center_crop",
            "--train_batch_size", 1, "--max_train_steps", 2, "--checkpointing_steps", 2, "--learning_rate", "1e-4",
            "--validation_prompt", PROMPT, "--validation_epochs", 1, "--use_ema", "--seed", 0,
            "--dataloader_num_workers", 0, *extra]


def train_sh_command(base: Path, data: Path, output: Path, resolution: int, *extra) -> tuple:
    """train.sh as the README gives it for the 768 model (--resolution), at test sizes, CPU, no Hub push."""
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MODEL_NAME": str(base),
           "DATA_DIR": str(data), "OUTPUT_DIR": str(output), "REPORT_TO": "tensorboard", "PUSH_TO_HUB": "0"}
    return [REPO_ROOT / "train.sh", f"--resolution={resolution}", "--max_train_steps=2", "--mixed_precision=no",
            "--checkpointing_steps=1000", "--validation_epochs=1", "--dataloader_num_workers=0", *extra], env


def write_vocab_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (own vocab.json/merges.txt files) that pads with "!", as SD2's does."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789!,.")
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>",
                                                                                   "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def save_independent_sd2_v(folder: Path) -> Path:
    """An SD2-shaped v-prediction pipeline from raw constructors, unlike our presets in every size: 3 UNet levels,
    heads (1, 2, 2) per level, linear projections, upcast attention, cross-attention 48 from a 5-layer gelu text
    tower, a 3-block VAE (downscale 4), DDIM with v_prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    tokenizer = write_vocab_tokenizer(folder.parent / "vocab")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=192, num_hidden_layers=5,
        num_attention_heads=3, hidden_act="gelu", max_position_embeddings=77, projection_dim=32))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=6, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
        attention_head_dim=(1, 2, 2), use_linear_projection=True, upcast_attention=True)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=16, sample_size=24)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd2_bases(tmp_path_factory) -> dict:
    """Base pipelines by name: the sd2 and sd2_v presets (what `python -m stand_in.tiny_model DIR --preset P`
    writes, saved in this process to spare two interpreter starts), and the independently built v model."""
    from stand_in.tiny_model import save_tiny_pipeline

    root = tmp_path_factory.mktemp("sd2_bases")
    bases = {preset: save_tiny_pipeline(root / preset, preset=preset) for preset in ("sd2", "sd2_v")}
    bases["independent_v"] = save_independent_sd2_v(root / "independent_v")
    return bases


@pytest.fixture(scope="module")
def v_data_dir(tmp_path_factory) -> Path:
    """DATA_DIR for the 768 model's stand-in: create.py --resolution 48 (its 768) → format.py."""
    from diffusion_model.sample_data import make_sample_parquet

    root = tmp_path_factory.mktemp("sd2_v_data")
    parquet = make_sample_parquet(root / "rsicd.parquet", DATA_ROWS, seed=1)
    data_dir = root / "data"
    succeeded(run_script_at("diffusion_model/create.py", ["--parquet_path", parquet, "--output_dir", data_dir,
                                                         "--resolution", V_RESOLUTION]))
    succeeded(run_script_at("diffusion_model/format.py", ["--caption_file", data_dir / "captions.txt",
                                                         "--output_file", data_dir / "metadata.jsonl"]))
    return data_dir


@pytest.fixture(scope="module")
def runs(sd2_bases, tiny_data_dir, v_data_dir, tmp_path_factory) -> dict:
    """name -> (output dir, CompletedProcess): 2.1-base retargeted to v_prediction by flag; the 768 model through
    train.sh (cached latents, gradient checkpointing, EMA); the independent v model."""
    root = tmp_path_factory.mktemp("sd2_runs")
    outputs = {name: root / name for name in ("base_as_v", "v_train_sh", "independent_v", "lora_v")}
    commands = {
        "base_as_v": (train_command(sd2_bases["sd2"], tiny_data_dir, outputs["base_as_v"], BASE_RESOLUTION,
                                    "--prediction_type", "v_prediction"), {}),
        "v_train_sh": train_sh_command(sd2_bases["sd2_v"], v_data_dir, outputs["v_train_sh"], V_RESOLUTION),
        "independent_v": (train_command(sd2_bases["independent_v"], v_data_dir, outputs["independent_v"],
                                        V_RESOLUTION), {}),
        "lora_v": (train_command(sd2_bases["sd2_v"], v_data_dir, outputs["lora_v"], V_RESOLUTION, "--lora_rank", 4,
                                 "--lora_alpha", 8), {}),
    }
    results = run_two_at_a_time(commands)
    return {name: (outputs[name], results[name]) for name in commands}


def generate_in_process(command: list) -> subprocess.CompletedProcess:
    """generate.py's main run in this process (test_generate's generate_here: a process would spend seconds on
    imports), its outcome as a CompletedProcess: exit 0, or 1 with the error."""
    from test_generate import generate_here

    try:
        generate_here([str(c) for c in command[1:]])
    except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure is the test's to report
        return subprocess.CompletedProcess(command, 1, "", f"{type(err).__name__}: {err}")
    return subprocess.CompletedProcess(command, 0, "", "")


# The samplers run in this process (while the others run as processes, two at a time); generate_v keeps generate.py
# itself, run as users run it, on a v model.
IN_PROCESS_SAMPLERS = ("generate_independent", "generate_lora")


@pytest.fixture(scope="module")
def samplers(runs, v_data_dir, stand_in_models, tmp_path_factory) -> dict:
    """generate.py on the 768 stand-in's run (its default size), on the independent model's and on the LoRA run;
    evaluate.py on the 768 stand-in's run with the stand-in metric models."""
    root = tmp_path_factory.mktemp("sd2_samples")
    commands = {
        "generate_v": ([sys.executable, REPO_ROOT / "generate.py", "--model", runs["v_train_sh"][0], "--prompt",
                        PROMPT, "--seed", 3, "--num_inference_steps", 3, "--output_dir", root / "generate_v"], {}),
        "generate_independent": ([sys.executable, REPO_ROOT / "generate.py", "--model", runs["independent_v"][0],
                                  "--prompt", PROMPT, "--seed", 3, "--num_inference_steps", 3, "--height", 32,
                                  "--width", 32, "--output_dir", root / "generate_independent"], {}),
        "generate_lora": ([sys.executable, REPO_ROOT / "generate.py", "--model", runs["lora_v"][0], "--prompt",
                           PROMPT, "--seed", 3, "--num_inference_steps", 3, "--lora_scale", 0.5,
                           "--output_dir", root / "generate_lora"], {}),
        "evaluate_v": ([sys.executable, REPO_ROOT / "evaluate.py", "--model", runs["v_train_sh"][0], "--data_dir",
                        v_data_dir, "--num_samples", 2, "--inception_weights", stand_in_models["inception_weights"],
                        "--clip_model", stand_in_models["clip_model"], "--num_inference_steps", 2,
                        "--resolution", 24, "--metric_batch_size", 2, "--output_dir", root / "evaluate_v"], {}),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, command, **env) for name, (command, env) in commands.items()
                   if name not in IN_PROCESS_SAMPLERS}
        results = {name: generate_in_process(commands[name][0]) for name in IN_PROCESS_SAMPLERS}
        results.update({name: future.result() for name, future in futures.items()})
    return {name: (root / name, results[name]) for name in commands}


def finished(runs, name) -> Path:
    """A run's output folder, after requiring that it succeeded."""
    output, done = runs[name]
    succeeded(done)
    return output


def config(folder: Path, component: str) -> dict:
    """A saved component's config.json (scheduler_config.json for the scheduler)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / component / name).read_text())


SD2_UNET_KEYS = ("use_linear_projection", "attention_head_dim", "upcast_attention", "cross_attention_dim",
                 "block_out_channels", "sample_size")


@pytest.mark.parametrize("name, base", [("base_as_v", "sd2"), ("v_train_sh", "sd2_v"),
                                        ("independent_v", "independent_v")])
def test_runs_export_sd2s_configs_and_checkpoint(runs, sd2_bases, name, base):
    """The final pipeline holds trained UNet weights and keeps the base's SD2 UNet/text-encoder/tokenizer features
    and scheduler class."""
    from safetensors.torch import load_file

    output = finished(runs, name)
    trained, initial = (load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
                        for folder in (output, sd2_bases[base]))
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[key], initial[key]) for key in trained), "training changed no weight"
    for key in SD2_UNET_KEYS:
        assert config(output, "unet")[key] == config(sd2_bases[base], "unet")[key], key
    assert config(output, "text_encoder")["hidden_act"] == "gelu"
    assert config(output, "scheduler")["_class_name"] == config(sd2_bases[base], "scheduler")["_class_name"]
    tokenizer_config = json.loads((output / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == "!"
    assert (output / "validation_grid.png").is_file()
    if name != "v_train_sh":  # train.sh checkpoints every 500 steps
        assert (output / "checkpoint-2" / "unet_ema").is_dir()


@pytest.mark.parametrize("name", ["base_as_v", "v_train_sh", "independent_v"])
def test_exported_scheduler_keeps_v_prediction(runs, name):
    """The 768 model's v_prediction, and --prediction_type v_prediction on the epsilon 2.1-base, reach the export."""
    from diffusers import StableDiffusionPipeline

    output = finished(runs, name)
    assert config(output, "scheduler")["prediction_type"] == "v_prediction"
    assert StableDiffusionPipeline.from_pretrained(output).scheduler.config.prediction_type == "v_prediction"


class IdealVelocity(torch.nn.Module):
    """Stands in for a UNet that learnt a one-point data set perfectly: returns the exact velocity
    sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0 of the target latents x0 for any noisy latents."""

    def __init__(self, unet_config, alphas_cumprod: torch.Tensor, target: torch.Tensor):
        super().__init__()
        self.config, self.alphas_cumprod, self.target = unet_config, alphas_cumprod, target
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the pipeline a device and dtype to read

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False, **kwargs):
        """The velocity of the target at this step (same for every prompt, so guidance changes nothing)."""
        alpha_bar = self.alphas_cumprod[int(timestep)].to(sample.dtype)
        noise = (sample - alpha_bar.sqrt() * self.target) / (1 - alpha_bar).sqrt()
        return (alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * self.target,)


def ideal_sample_error(pipeline, steps: int = 4) -> float:
    """Mean |sampled latents − target| when the pipeline's scheduler samples the ideal velocity predictor."""
    size = pipeline.unet.config.sample_size
    target = torch.linspace(-1.5, 1.5, 4 * size * size).reshape(1, 4, size, size)
    pipeline.unet = IdealVelocity(pipeline.unet.config, pipeline.scheduler.alphas_cumprod, target)
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline(PROMPT, num_inference_steps=steps, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    return float((latents - target).abs().mean())


@pytest.mark.parametrize("name", ["base_as_v", "v_train_sh"])
def test_generate_pipeline_samples_a_v_model_onto_its_data(runs, name):
    """generate.py's loader samples with the exported scheduler: an ideal v-predictor lands on its data point."""
    from inference.pipeline import load_pipeline

    output = finished(runs, name)
    pipeline = load_pipeline(str(output), None, torch.device("cpu"), torch.float32)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert ideal_sample_error(pipeline) < 0.1


def test_ideal_v_predictor_read_as_epsilon_misses_its_data(runs):
    """The control that gives the sampling tests their meaning: with the prediction type lost, DDIM (the 768
    model's sampler) lands far from the data. (PNDM's final low-noise steps happen to pull an ideal predictor back
    onto the data either way, so for PNDM the tests above also check the config.)"""
    from inference.pipeline import load_pipeline

    pipeline = load_pipeline(str(finished(runs, "v_train_sh")), None, torch.device("cpu"), torch.float32)
    pipeline.scheduler.register_to_config(prediction_type="epsilon")
    assert ideal_sample_error(pipeline) > 0.5


def test_every_generate_sampler_keeps_v_prediction(runs):
    """generate.py / evaluate.py --scheduler NAME builds the sampler from the run's config: v_prediction stays."""
    from diffusers import DDIMScheduler

    from inference.schedulers import SCHEDULERS, make_scheduler

    exported = DDIMScheduler.from_pretrained(finished(runs, "v_train_sh"), subfolder="scheduler").config
    for name in SCHEDULERS:
        assert make_scheduler(name, exported).config.prediction_type == "v_prediction", name


@pytest.mark.parametrize("base, prediction_type", [("sd2", "v_prediction"), ("sd2_v", None)])
def test_validation_scheduler_samples_a_v_model_onto_its_data(sd2_bases, base, prediction_type):
    """The scheduler the trainer validates with (the base's class, with --prediction_type applied) samples v."""
    from diffusers import StableDiffusionPipeline

    from trainer.validation import load_inference_scheduler

    scheduler = load_inference_scheduler(str(sd2_bases[base]), None, prediction_type)
    assert scheduler.config.prediction_type == "v_prediction"
    pipeline = StableDiffusionPipeline.from_pretrained(sd2_bases[base], scheduler=scheduler)
    assert ideal_sample_error(pipeline) < 0.1


def test_train_sh_runs_the_768_recipe(runs):
    """train.sh's defaults (cached latents, gradient checkpointing, EMA) on the 768 stand-in at its resolution."""
    output, done = runs["v_train_sh"]
    succeeded(done)
    assert list((output / ".cache" / "latents").glob("*/manifest.json"))
    # Validation draws at the training --resolution (48 here, as 768 for SD 2.1), not the model's default size.
    assert Image.open(output / "validation" / "step-2" / "0.png").size == (V_RESOLUTION, V_RESOLUTION)


def test_generate_writes_images_of_each_v_model(samplers):
    """generate.py on the runs: the 768 stand-in at its default size, the independent model at --height/--width."""
    for name, size in (("generate_v", 24), ("generate_independent", 32)):
        folder, done = samplers[name]
        succeeded(done)
        sidecar = json.loads((folder / "000000.json").read_text())
        assert sidecar["scheduler"] == "DDIMScheduler" and (sidecar["width"], sidecar["height"]) == (size, size)
        assert Image.open(folder / "000000.png").size == (size, size)


def test_evaluate_measures_the_768_stand_in(samplers):
    """evaluate.py on the 768 stand-in's run: two generated images and finite scores."""
    import math

    folder, done = samplers["evaluate_v"]
    succeeded(done)
    report = json.loads((folder / "eval_report.json").read_text())
    assert report["num_samples"] == 2 and math.isfinite(report["fid"]) and math.isfinite(report["clip_score"])
    assert sorted(p.name for p in (folder / "generated").glob("*.png")) == ["000001.png", "000002.png"]


def test_checkpoint_put_into_a_base_of_another_family_is_one_line(sd2_bases, tiny_model_dir, tmp_path, capsys):
    """generate.py with an SD2 checkpoint's UNet and an SD1-shaped --base_model (cross-attention 64 vs text width 32,
    as SD 2.x's 1024 vs SD1.5's 768): exit 2 and one line naming both, not a shape error while denoising."""
    import shutil

    import generate
    from utils.cli import run_main

    checkpoint = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(sd2_bases["sd2"] / "unet", checkpoint / "unet")
    with pytest.raises(SystemExit) as exited:
        run_main(generate.main, ["--model", str(checkpoint), "--base_model", str(tiny_model_dir), "--prompt", PROMPT,
                                 "--num_inference_steps", "1", "--output_dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert str(checkpoint) in lines[0] and str(tiny_model_dir) in lines[0] and "--base_model" in lines[0]


def test_lora_on_the_768_stand_in_trains_adapters_at_its_widths(runs):
    """LoRA (rank 4, alpha 8, EMA) on the 768 stand-in: only adapter files, whose cross-attention adapters read the
    text encoder's wider states (64, not SD1's 32), and a kohya file with SD1's prefixes and alphas."""
    from safetensors.torch import load_file

    from trainer.lora import KOHYA_WEIGHTS_FILENAME, LORA_WEIGHTS_FILENAME

    output, done = runs["lora_v"]
    succeeded(done)
    assert not (output / "unet").exists()
    adapters = load_file(str(output / LORA_WEIGHTS_FILENAME))
    cross_k = [v for k, v in adapters.items() if "attn2.to_k" in k and "lora_A" in k]
    assert cross_k and all(v.shape == (4, 64) for v in cross_k)
    kohya = load_file(str(output / KOHYA_WEIGHTS_FILENAME))
    alphas = [v for k, v in kohya.items() if k.startswith("lora_unet_") and k.endswith(".alpha")]
    assert alphas and all(float(a) == 8.0 for a in alphas)


def test_generate_samples_the_lora_run_on_its_recorded_v_base(samplers):
    """generate.py --model on the LoRA run: its recorded base (the 768 stand-in) and that base's DDIM v-sampler."""
    folder, done = samplers["generate_lora"]
    succeeded(done)
    sidecar = json.loads((folder / "000000.json").read_text())
    assert sidecar["scheduler"] == "DDIMScheduler" and (sidecar["width"], sidecar["height"]) == (24, 24)
