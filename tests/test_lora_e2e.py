"""LoRA end to end, run as users run it: diffusers' LoRA command line on train_text_to_image_lora.py, our LoRA
flags on train_text_to_image.py, then the files loaded by diffusers, by generate.py and as kohya keys.

The base is a tiny pipeline built here with diffusers/transformers classes, independently of stand_in.tiny_model
(other tokenizer, PNDM scheduler). Runs are shared through module fixtures; BASES names the base-model builders
the fixtures run on: adding a preset (e.g. SD2's) is one line there.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_e2e import checkpoints, free_port, run_command, succeeded, trainer_command
from warm import single_thread_env
from trainer.lora import EMA_LORA_DIRNAME, KOHYA_WEIGHTS_FILENAME, LORA_RUN_FILENAME, LORA_WEIGHTS_FILENAME

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA_SCRIPT = REPO_ROOT / "train_text_to_image_lora.py"
PROMPT = "A satellite image of a crop field"


def build_independent_pipeline(path: Path) -> Path:
    """A tiny SD pipeline shaped like diffusers' own test models: letter-level CLIP tokenizer, PNDM scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(1)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in letters + [f"{c}</w>" for c in letters] + ["th", "the</w>"]:
        vocab[symbol] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


# name → builder(path) of a base pipeline folder. SD2, once stand_in/tiny_model.py has the preset:
#   "sd2": lambda path: save_tiny_pipeline(path, preset="sd2"),
BASES = {
    "independent": build_independent_pipeline,
}


@pytest.fixture(scope="module", params=list(BASES))
def base_model(request, tmp_path_factory) -> Path:
    """The base pipeline folder the LoRA runs train on."""
    return BASES[request.param](tmp_path_factory.mktemp(f"base-{request.param}") / "pipeline")


def reference_command(model, data, output, *extra) -> list:
    """diffusers' LoRA example-test command line, unchanged, on train_text_to_image_lora.py."""
    return [sys.executable, str(LORA_SCRIPT), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--resolution", "64", "--center_crop", "--random_flip",
            "--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--learning_rate", "5.0e-04",
            "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--output_dir", str(output),
            "--checkpointing_steps=2", "--checkpoints_total_limit=2", "--seed=0", "--num_validation_images=0",
            *[str(e) for e in extra]]


def lora_command(model, data, output, *extra) -> list:
    """Our trainer in LoRA mode (rank 4), with the full trainer's test flags."""
    return trainer_command(model, data, output, "--lora_rank", 4, *extra)


# Every LoRA feature at once; 4 rows = one epoch, so a resume from checkpoint-2 skips half of it; validation once,
# on the final weights.
FEATURES = ["--lora_alpha", 8, "--lora_dropout", 0.1, "--lora_target_modules", "all_linear", "--use_ema",
            "--cache_latents", "--use_8bit_adam", "--snr_gamma", 5, "--prediction_type", "v_prediction",
            "--max_train_samples", 4, "--validation_prompt", PROMPT, "--checkpointing_steps", 2,
            "--learning_rate", "2e-3"]
RUN_TIMEOUT_S = 900  # a tiny run takes ~20 s alone; the margin is for a machine shared with other work


def run_all(commands: dict, cold=()) -> dict:
    """Run trainer commands two at a time (each single-threaded), those named in cold without the warm zygote
    (tests/warm.py): name → CompletedProcess."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_command, command, RUN_TIMEOUT_S, name in cold)
                   for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


# Refused LoRA command lines: text-encoder LoRA with cached latents, a target list matching nothing.
USAGE_ERRORS = [(["--train_text_encoder_lora", "--cache_latents"], "--cache_latents"),
                (["--lora_target_modules", "to_nothing"], "'to_nothing'")]
# Text-encoder LoRA in DoRA form, under bf16 autocast.
TEXT_ENCODER = ["--train_text_encoder_lora", "--use_dora", "--mixed_precision", "bf16", "--lora_alpha", 2,
                "--max_train_steps", 2, "--checkpointing_steps", 2]


@pytest.fixture(scope="module")
def runs(base_model, tiny_data_dir, metadata_dir, tmp_path_factory) -> dict:
    """The fresh runs, two at a time: name → (output dir, CompletedProcess)."""
    root = tmp_path_factory.mktemp("lora")
    data = tiny_data_dir
    commands = {
        "ref4": reference_command(base_model, data, root / "ref4", "--max_train_steps", 4),
        "ref6": reference_command(base_model, data, root / "ref6", "--max_train_steps", 6),
        "features": lora_command(base_model, data, root / "features", "--max_train_steps", 4, *FEATURES),
        # With a metadata embedding (gsd) too: it trains in fp32 under the bf16 autocast.
        "text_encoder": lora_command(base_model, metadata_dir, root / "text_encoder", *TEXT_ENCODER,
                                     "--metadata_fields", "gsd"),
        "nan": lora_command(base_model, data, root / "nan", "--max_train_steps", 8, "--checkpointing_steps", 1,
                            "--max_grad_norm", "1e38", "--learning_rate", "1e35"),
        # The refused command lines, each exiting early.
        **{f"usage-{i}": lora_command(base_model, data, root / f"usage-{i}", "--max_train_steps", 1, *extra)
           for i, (extra, _) in enumerate(USAGE_ERRORS)},
    }
    results = run_all(commands, cold={"ref6"})  # the LoRA script once as users start it, imports and all
    return {name: (root / name, results[name]) for name in commands}


@pytest.fixture(scope="module")
def resumed(runs, base_model, tiny_data_dir, tmp_path_factory) -> dict:
    """ref4 resumed (latest) to 6 steps; the features run resumed from its checkpoint-2 to 4."""
    root = tmp_path_factory.mktemp("lora-resumed")
    for name in ("ref4", "features"):
        succeeded(runs[name][1])
        shutil.copytree(runs[name][0], root / name)
    shutil.rmtree(root / "features" / "checkpoint-4")
    commands = {
        "ref4": reference_command(base_model, tiny_data_dir, root / "ref4", "--max_train_steps", 6,
                                  "--resume_from_checkpoint", "latest"),
        "features": lora_command(base_model, tiny_data_dir, root / "features", "--max_train_steps", 4, *FEATURES,
                                 "--resume_from_checkpoint", "checkpoint-2"),
    }
    results = run_all(commands)
    return {name: (root / name, results[name]) for name in commands}


def ok(runs: dict, name: str) -> Path:
    """The output folder of a run that must have succeeded."""
    output, done = runs[name]
    succeeded(done)
    return output


def tensors(path: Path) -> dict:
    """A safetensors file's tensors."""
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same(a: dict, b: dict) -> None:
    """Same keys, every tensor bit-identical."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def folder_bytes(folder: Path) -> int:
    """Total size of the files under folder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def sample(pipeline, steps=2, seed=0, **kwargs):
    """One seeded image as a float array."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **kwargs).images[0]


def test_reference_command_line_checkpoints_are_small_and_adapter_only(runs, base_model):
    """diffusers' LoRA test line: {checkpoint-2, checkpoint-4}, each under 10% of the UNet, no UNet copy inside."""
    output = ok(runs, "ref4")
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}
    unet_bytes = (base_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    for name in checkpoints(output):
        assert folder_bytes(output / name) < 0.1 * unet_bytes, name
        assert (output / name / LORA_WEIGHTS_FILENAME).is_file()
        assert not (output / name / "unet").exists() and not list((output / name).glob("model*.safetensors"))
    assert not (output / "model_index.json").exists() and not (output / "unet").exists()
    assert (output / "README.md").read_text().count("lora") >= 1
    assert json.loads((output / LORA_RUN_FILENAME).read_text())["base_model"] == str(base_model.resolve())


def test_load_lora_weights_changes_the_base_and_matches_generate_py(runs, base_model, tmp_path):
    """diffusers' load_lora_weights(OUTPUT_DIR) changes the base's output; generate.py draws the same pixels."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from test_generate import generate_here

    output = ok(runs, "ref4")
    pipeline = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None)
    before = sample(pipeline, height=32, width=32)
    pipeline.load_lora_weights(output)
    after = sample(pipeline, height=32, width=32)
    assert abs(after - before).max() > 1e-3
    # generate.py's main in this process (asserting exit 0): a process would spend seconds on imports.
    generate_here(["generate.py", "--model", output, "--prompt", PROMPT, "--seed", 0, "--num_inference_steps", 2,
                   "--height", 32, "--width", 32, "--output_dir", tmp_path / "gen"])
    ours = Image.open(tmp_path / "gen" / "000000.png")
    diffusers_png = Image.fromarray((after * 255).round().astype("uint8"))
    assert list(ours.getdata()) == list(diffusers_png.getdata())


def test_kohya_file_has_unet_keys_and_alphas(runs):
    """The kohya file: lora_unet_ keys with lora_down/lora_up and an alpha per module (rank 4, alpha 4)."""
    state = tensors(ok(runs, "ref4") / KOHYA_WEIGHTS_FILENAME)
    modules = {key.split(".")[0] for key in state}
    assert modules and all(m.startswith("lora_unet_") for m in modules)
    for module in modules:
        assert float(state[f"{module}.alpha"]) == 4.0
        assert state[f"{module}.lora_down.weight"].shape[0] == 4


def test_resume_is_bit_identical_to_an_uninterrupted_run(runs, resumed):
    """ref4 resumed to 6 ends at {checkpoint-4, checkpoint-6}, with checkpoint-6 and the final file equal to ref6's."""
    output, done = resumed["ref4"]
    succeeded(done)
    assert "starting at step 4" in done.stderr
    uninterrupted = ok(runs, "ref6")
    assert checkpoints(output) == checkpoints(uninterrupted) == {"checkpoint-4", "checkpoint-6"}
    assert_same(tensors(output / "checkpoint-6" / LORA_WEIGHTS_FILENAME),
                tensors(uninterrupted / "checkpoint-6" / LORA_WEIGHTS_FILENAME))
    assert_same(tensors(output / LORA_WEIGHTS_FILENAME), tensors(uninterrupted / LORA_WEIGHTS_FILENAME))


def test_ema_8bit_adam_dropout_resume_is_bit_identical(runs, resumed):
    """The features run resumed at checkpoint-2 reproduces step 4 exactly: adapters, EMA adapters, final file."""
    output, done = resumed["features"]
    succeeded(done)
    assert "starting at step 2" in done.stderr
    uninterrupted = ok(runs, "features")
    for rel in (LORA_WEIGHTS_FILENAME, f"{EMA_LORA_DIRNAME}/{LORA_WEIGHTS_FILENAME}"):
        assert_same(tensors(output / "checkpoint-4" / rel), tensors(uninterrupted / "checkpoint-4" / rel))
    assert json.loads((output / "checkpoint-4" / EMA_LORA_DIRNAME / "ema_state.json").read_text())[
        "optimization_step"] == 4
    assert_same(tensors(output / LORA_WEIGHTS_FILENAME), tensors(uninterrupted / LORA_WEIGHTS_FILENAME))


def test_final_file_is_the_ema_and_clipping_saw_the_adapters(runs):
    """The final file holds the EMA adapters (not the last trained ones); the logged grad norm is real."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = ok(runs, "features")
    final = tensors(output / LORA_WEIGHTS_FILENAME)
    assert_same(final, tensors(output / "checkpoint-4" / EMA_LORA_DIRNAME / LORA_WEIGHTS_FILENAME))
    raw = tensors(output / "checkpoint-4" / LORA_WEIGHTS_FILENAME)
    assert any(not torch.equal(final[k], raw[k]) for k in final)
    norms = []
    for event_file in (output / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if "grad_norm" in accumulator.Tags().get("scalars", []):
            norms += [e.value for e in accumulator.Scalars("grad_norm")]
    assert len(norms) == 4 and all(n > 0 for n in norms), norms
    assert (output / "validation_grid.png").is_file() and (output / "loss_curve.png").is_file()


def test_alpha_not_rank_loads_at_the_trained_strength(runs, base_model):
    """load_lora_weights on an alpha=8, rank=4 run redraws the trainer's own final validation image."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    output = ok(runs, "features")
    trained = torch.tensor(list(Image.open(output / "validation" / "step-4" / "0.png").getdata()), dtype=torch.float)
    pipeline = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None)
    pipeline.scheduler.register_to_config(prediction_type="v_prediction")
    pipeline.load_lora_weights(output, adapter_name="run")

    def drawn(scale: float) -> torch.Tensor:
        """The validation image (20 steps, seed 0) at an adapter scale."""
        pipeline.set_adapters(["run"], adapter_weights=[scale])
        image = (sample(pipeline, steps=20) * 255).round().reshape(-1, 3)
        return torch.tensor(image, dtype=torch.float)

    # The same pixels (dropout off when loaded); alpha read as the rank (scale 0.5 here) is far off.
    trained_strength, half_strength = (drawn(1.0) - trained).abs(), (drawn(0.5) - trained).abs()
    assert trained_strength.max() <= 1 and half_strength.mean() > 1


def test_text_encoder_dora_bf16_run_loads_with_both_parts(runs, base_model):
    """Text-encoder DoRA under bf16, with a metadata embedding: the file carries unet. and text_encoder. adapters
    with DoRA magnitudes and loads into the base; the embedding trained beside it; no kohya file, since DoRA has no
    kohya form the converter writes."""
    from diffusers import StableDiffusionPipeline

    from trainer.metadata_unet import EMBEDDING_FILENAME

    output = ok(runs, "text_encoder")
    state = tensors(output / LORA_WEIGHTS_FILENAME)
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("unet.") for k in state)
    assert any("lora_magnitude_vector" in k for k in state)
    assert not (output / KOHYA_WEIGHTS_FILENAME).exists()
    assert tensors(output / EMBEDDING_FILENAME)["class_embedding.linear_2.weight"].abs().sum() > 0
    pipeline = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None)
    prompt_embeds_before = pipeline.encode_prompt(PROMPT, "cpu", 1, False)[0]
    pipeline.load_lora_weights(output)
    assert not torch.equal(pipeline.encode_prompt(PROMPT, "cpu", 1, False)[0], prompt_embeds_before)


def test_nan_stop_in_lora_mode(runs):
    """A diverging LoRA run stops with exit 1, one clear message, no final file, only finite checkpoints."""
    output, done = runs["nan"]
    assert done.returncode == 1, done.stderr[-3000:]
    assert "loss is nan" in done.stderr.lower() or "loss is inf" in done.stderr.lower() \
        or "weights became nan" in done.stderr.lower()
    assert "Traceback" not in done.stderr
    assert not (output / LORA_WEIGHTS_FILENAME).exists()
    for name in checkpoints(output):
        assert all(torch.isfinite(t).all() for t in tensors(output / name / LORA_WEIGHTS_FILENAME).values())


def test_two_processes_with_text_encoder_lora(base_model, metadata_dir, tmp_path):
    """torchrun, 2 CPU processes, text-encoder LoRA with EMA and a metadata embedding (gsd): DDP-wrapped UNet and text
    encoder, small checkpoints; the embedding trains and ships beside the adapters."""
    from trainer.metadata_unet import EMBEDDING_FILENAME

    output = tmp_path / "out"
    command = lora_command(base_model, metadata_dir, output, "--max_train_steps", 4, "--checkpointing_steps", 2,
                           "--use_ema", "--train_text_encoder_lora", "--metadata_fields", "gsd")
    command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    str(REPO_ROOT / "train_text_to_image.py")]
    done = subprocess.run(command, capture_output=True, text=True, env={**single_thread_env(), "ACCELERATE_USE_CPU": "1"},
                          timeout=RUN_TIMEOUT_S, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stderr
    assert checkpoints(output) == {"checkpoint-2", "checkpoint-4"}
    assert (output / "checkpoint-4" / "random_states_1.pkl").is_file()
    state = tensors(output / LORA_WEIGHTS_FILENAME)
    assert any(k.startswith("text_encoder.") for k in state)
    assert_same(state, tensors(output / "checkpoint-4" / EMA_LORA_DIRNAME / LORA_WEIGHTS_FILENAME))
    embedding = tensors(output / EMBEDDING_FILENAME)
    assert embedding["class_embedding.linear_2.weight"].abs().sum() > 0
    assert_same(embedding, tensors(output / "checkpoint-4" / EMA_LORA_DIRNAME / EMBEDDING_FILENAME))


def test_lora_usage_errors_are_one_line(runs):
    """Text-encoder LoRA with cached latents, and a target list matching nothing: exit 2, one line, no traceback."""
    for i, (_, message) in enumerate(USAGE_ERRORS):
        _, done = runs[f"usage-{i}"]
        assert done.returncode == 2, done.stderr[-3000:]
        assert message in done.stderr and "Traceback" not in done.stderr
