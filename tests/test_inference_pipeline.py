"""inference/pipeline.py: device choice, where a run's or checkpoint's pieces come from, loading, seeded generation."""

import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from inference.pipeline import (ModelSource, batches, check_pipeline, check_size, checkpoint_unet, generate,
                                hub_offline, is_checkpoint, load_pipeline, load_source, pick_device,
                                resolve_model)
from stand_in.tiny_model import build_unet
from utils.cli import UsageError
from utils.constants import DEFAULT_BASE_MODEL, EMA_UNET_DIRNAME, UNET_DIRNAME

CPU = torch.device("cpu")
SIZE = 16
PROMPTS = ["a crop field", "a river", "an airport"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: two threads on the shared 2-core box make sampling ~100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_checkpoint(folder, *unet_dirs):
    """A checkpoint-N folder shape with empty UNet folders: enough for path resolution, which loads nothing."""
    folder.mkdir(parents=True)
    for name in unet_dirs:
        (folder / name).mkdir()
    return folder


def make_pipeline_dir(folder):
    """A folder that looks like a saved pipeline to the path checks."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    return folder


def fake_hub_cache(root, repo_id: str):
    """The Hugging Face cache layout holding repo_id's model_index.json at revision main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    make_pipeline_dir(repo / "snapshots" / ("0" * 40))
    return root


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache of our own (the machine's cache must not decide the outcome)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def unet_weights(unet) -> dict:
    return {key: value.detach().clone() for key, value in unet.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def other_unet(tmp_path_factory):
    """A UNet with other random weights than the tiny pipeline's, saved as a checkpoint's unet_ema/."""
    torch.manual_seed(123)
    unet = build_unet()
    folder = tmp_path_factory.mktemp("other_unet") / "unet"
    unet.save_pretrained(folder, safe_serialization=True)
    return folder, unet_weights(unet)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_dir):
    return load_source(ModelSource(str(tiny_model_dir), None, "pipeline"), CPU, torch.float32)


def pixels(image) -> np.ndarray:
    return np.asarray(image)


# --- device


def test_cpu_is_float32_and_cuda_is_float16(monkeypatch):
    assert pick_device("cpu") == (CPU, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None) == (torch.device("cuda"), torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == (CPU, torch.float32)


def test_dtype_auto_keeps_the_device_default_and_explicit_dtypes_apply(monkeypatch):
    assert pick_device("cpu", "auto") == (CPU, torch.float32)
    assert pick_device("cpu", "bf16") == (CPU, torch.bfloat16)
    assert pick_device("cpu", "fp32") == (CPU, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None, "auto") == (torch.device("cuda"), torch.float16)
    assert pick_device(None, "fp32") == (torch.device("cuda"), torch.float32)
    assert pick_device(None, "fp16") == (torch.device("cuda"), torch.float16)


def test_fp16_off_cuda_is_a_usage_error_naming_the_fix():
    with pytest.raises(UsageError, match="--dtype fp16 needs a CUDA device and this run is on cpu: use --dtype bf16"):
        pick_device("cpu", "fp16")


def test_cuda_requested_without_cuda_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device 'cuda': CUDA is not available"):
        pick_device("cuda")


def test_unknown_device_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="--device 'gpu0' is not a torch device"):
        pick_device("gpu0")


# --- small checks


@pytest.mark.parametrize("value, offline", [("1", True), ("ON", True), (" yes ", True), ("true", True),
                                            ("0", False), ("", False), ("off", False)])
def test_hub_offline_reads_the_variable_now(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline


def test_hub_offline_is_false_when_unset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub_offline() is False


@pytest.mark.parametrize("value", [None, 8, 64, 520])
def test_sizes_that_are_multiples_of_8_or_default_pass(value):
    check_size("--height", value)


@pytest.mark.parametrize("value", [30, 0, -8, 4])
def test_other_sizes_are_a_usage_error_naming_flag_and_value(value):
    with pytest.raises(UsageError, match=f"--width {value} must be a positive multiple of 8"):
        check_size("--width", value)


def test_batches_cover_every_index_in_order():
    assert batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert batches(3, 8) == [range(0, 3)]


def test_batch_size_below_one_is_a_usage_error():
    with pytest.raises(UsageError, match="--batch_size 0"):
        batches(3, 0)


# --- what is a checkpoint, and which UNet


def test_checkpoint_is_a_checkpoint_n_name_or_unet_folders_without_model_index(tmp_path):
    assert is_checkpoint(make_checkpoint(tmp_path / "checkpoint-12"))
    assert is_checkpoint(make_checkpoint(tmp_path / "renamed", UNET_DIRNAME))
    assert is_checkpoint(make_checkpoint(tmp_path / "ema_only", EMA_UNET_DIRNAME))
    assert not is_checkpoint(make_pipeline_dir(make_checkpoint(tmp_path / "run", UNET_DIRNAME)))
    assert not is_checkpoint(make_checkpoint(tmp_path / ".checkpoint-3.partial"))
    assert not is_checkpoint(make_checkpoint(tmp_path / "empty"))


def test_auto_and_ema_take_unet_ema_when_present(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-2", UNET_DIRNAME, EMA_UNET_DIRNAME)
    assert checkpoint_unet(checkpoint, "auto") == (checkpoint / EMA_UNET_DIRNAME, "ema")
    assert checkpoint_unet(checkpoint, "ema") == (checkpoint / EMA_UNET_DIRNAME, "ema")
    assert checkpoint_unet(checkpoint, "unet") == (checkpoint / UNET_DIRNAME, "unet")


def test_auto_falls_back_to_unet_without_ema(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-2", UNET_DIRNAME)
    assert checkpoint_unet(checkpoint, "auto") == (checkpoint / UNET_DIRNAME, "unet")


def test_ema_requested_without_ema_is_a_usage_error_suggesting_unet(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-2", UNET_DIRNAME)
    with pytest.raises(UsageError, match="--weights ema: checkpoint .* has no unet_ema/.*--weights unet"):
        checkpoint_unet(checkpoint, "ema")


def test_checkpoint_without_unet_is_a_usage_error(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-2")
    with pytest.raises(UsageError, match="holds no unet/ folder: not a finished checkpoint"):
        checkpoint_unet(checkpoint, "unet")


# --- pipeline folders and Hub ids


def test_folder_without_model_index_is_not_a_pipeline(tmp_path):
    with pytest.raises(UsageError, match="holds no model_index.json"):
        check_pipeline("--model", str(tmp_path))


def test_file_is_not_a_pipeline(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="is a file"):
        check_pipeline("--model", str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("value", ["/no/such/run", "./no-such-run", "~/no-such-run", "runs/a/b"])
def test_missing_paths_do_not_exist(value):
    with pytest.raises(UsageError, match=f"--model '{value}' does not exist"):
        check_pipeline("--model", value)


def test_malformed_id_is_neither_folder_nor_hub_id():
    with pytest.raises(UsageError, match="neither an existing folder nor a valid Hub id"):
        check_pipeline("--model", "not a repo!")


def test_hub_id_online_is_accepted_without_a_network_call(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_pipeline("--model", "someone/some-model")


def test_hub_id_offline_must_be_in_the_cache(offline_cache):
    with pytest.raises(UsageError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        check_pipeline("--base_model", "someone/some-model")
    fake_hub_cache(offline_cache, "someone/some-model")
    check_pipeline("--base_model", "someone/some-model")


# --- resolve_model: where the pipeline and its UNet come from


def test_pipeline_folder_is_used_whole(tmp_path):
    run = make_pipeline_dir(tmp_path / "run")
    assert resolve_model(str(run), None) == ModelSource(str(run), None, "pipeline")


def test_home_relative_pipeline_is_expanded_for_loading(tmp_path, monkeypatch):
    # from_pretrained does not expand ~; a quoted --model ~/run must reach it as a real path.
    monkeypatch.setenv("HOME", str(tmp_path))
    make_pipeline_dir(tmp_path / "run")
    assert resolve_model("~/run", None).pipeline == str(tmp_path / "run")


def test_checkpoint_of_a_finished_run_goes_into_the_runs_pipeline(tmp_path):
    run = make_pipeline_dir(tmp_path / "run")
    checkpoint = make_checkpoint(run / "checkpoint-4", UNET_DIRNAME, EMA_UNET_DIRNAME)
    assert resolve_model(str(checkpoint), None) == ModelSource(str(run), checkpoint / EMA_UNET_DIRNAME, "ema")
    assert resolve_model(str(checkpoint), None, "unet") == ModelSource(str(run), checkpoint / UNET_DIRNAME, "unet")


def test_base_model_flag_wins_over_the_runs_pipeline(tmp_path):
    run = make_pipeline_dir(tmp_path / "run")
    base = make_pipeline_dir(tmp_path / "base")
    checkpoint = make_checkpoint(run / "checkpoint-4", UNET_DIRNAME)
    assert resolve_model(str(checkpoint), str(base)).pipeline == str(base)


def test_missing_base_model_is_a_usage_error_naming_the_flag(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint-4", UNET_DIRNAME)
    with pytest.raises(UsageError, match="--base_model '/no/base' does not exist"):
        resolve_model(str(checkpoint), "/no/base")


def test_unfinished_run_checkpoint_defaults_to_sd15_online(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint-4", UNET_DIRNAME)
    assert resolve_model(str(checkpoint), None).pipeline == DEFAULT_BASE_MODEL


def test_unfinished_run_checkpoint_offline_uses_a_cached_sd15(tmp_path, offline_cache):
    fake_hub_cache(offline_cache, DEFAULT_BASE_MODEL)
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint-4", UNET_DIRNAME)
    assert resolve_model(str(checkpoint), None).pipeline == DEFAULT_BASE_MODEL


def test_unfinished_run_checkpoint_offline_without_sd15_asks_for_base_model(tmp_path, offline_cache):
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint-4", UNET_DIRNAME)
    with pytest.raises(UsageError) as caught:
        resolve_model(str(checkpoint), None)
    message = str(caught.value)
    assert f"checkpoint '{checkpoint}'" in message and "--base_model" in message and DEFAULT_BASE_MODEL in message


@pytest.mark.parametrize("weights", ["ema", "unet"])
def test_weights_flag_on_a_pipeline_is_a_usage_error(tmp_path, weights):
    run = make_pipeline_dir(tmp_path / "run")
    with pytest.raises(UsageError, match=f"--weights {weights} applies to checkpoint-N folders"):
        resolve_model(str(run), None, weights)


def test_unknown_weights_value_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--weights 'best' is not one of auto, ema, unet"):
        resolve_model(str(tmp_path), None, "best")


# --- loading


def test_checkpoint_unet_replaces_the_pipelines_and_scheduler_is_swapped(tiny_model_dir, other_unet):
    folder, weights = other_unet
    pipeline = load_source(ModelSource(str(tiny_model_dir), folder, "ema"), CPU, torch.float32, "euler")
    assert same_weights(unet_weights(pipeline.unet), weights)
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipeline.safety_checker is None and pipeline.device == CPU


def test_pipeline_alone_keeps_its_own_unet_and_scheduler(tiny_pipeline, other_unet):
    assert not same_weights(unet_weights(tiny_pipeline.unet), other_unet[1])
    assert type(tiny_pipeline.scheduler).__name__ == "DDPMScheduler"


def test_load_pipeline_puts_a_runs_checkpoint_ema_into_the_run(tmp_path, tiny_model_dir, other_unet):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    shutil.copytree(other_unet[0], run / "checkpoint-3" / EMA_UNET_DIRNAME)
    pipeline = load_pipeline(str(run / "checkpoint-3"), None, CPU, torch.float32)
    assert same_weights(unet_weights(pipeline.unet), other_unet[1])


def test_corrupt_unet_is_one_usage_error_line(tmp_path, tiny_model_dir):
    unet = tmp_path / "checkpoint-1" / UNET_DIRNAME
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{not json")
    with pytest.raises(UsageError) as caught:
        load_source(ModelSource(str(tiny_model_dir), unet, "unet"), CPU, torch.float32)
    assert str(caught.value).startswith(f"could not load '{unet}'") and "\n" not in str(caught.value)


def test_unknown_scheduler_fails_before_loading(tmp_path):
    with pytest.raises(UsageError, match="--scheduler 'lms'"):
        load_source(ModelSource(str(tmp_path / "never-read"), None, "pipeline"), CPU, torch.float32, "lms")


# --- generate


def run_generate(pipeline, prompts, seeds, **overrides):
    settings = dict(negative_prompt=None, num_inference_steps=2, guidance_scale=7.5, height=SIZE, width=SIZE)
    return generate(pipeline, prompts, seeds, **{**settings, **overrides})


def test_one_image_per_prompt_at_the_size_reported_in_order(tiny_pipeline):
    seen = []
    images = run_generate(tiny_pipeline, PROMPTS, [5, 6, 7], height=16, width=24,
                          on_image=lambda index, image: seen.append((index, image)))
    assert [image.size for image in images] == [(24, 16)] * 3
    assert [index for index, _ in seen] == [0, 1, 2] and [image for _, image in seen] == images


def test_each_image_regenerates_alone_from_its_seed(tiny_pipeline):
    images = run_generate(tiny_pipeline, PROMPTS, [5, 6, 7])
    again = run_generate(tiny_pipeline, PROMPTS[1:2], [6])
    assert np.array_equal(pixels(again[0]), pixels(images[1]))


def test_other_seed_other_pixels(tiny_pipeline):
    first, second = (run_generate(tiny_pipeline, PROMPTS[:1], [seed])[0] for seed in (5, 6))
    assert not np.array_equal(pixels(first), pixels(second))


def test_batches_give_every_image(tiny_pipeline):
    seen = []
    images = run_generate(tiny_pipeline, PROMPTS, [5, 6, 7], batch_size=2, on_image=lambda i, _: seen.append(i))
    assert len(images) == 3 and seen == [0, 1, 2]


def test_negative_prompt_changes_the_pixels(tiny_pipeline):
    plain = run_generate(tiny_pipeline, PROMPTS[:1], [5])[0]
    steered = run_generate(tiny_pipeline, PROMPTS[:1], [5], negative_prompt="clouds")[0]
    assert not np.array_equal(pixels(plain), pixels(steered))


def test_prompts_and_seeds_must_pair_up(tiny_pipeline):
    with pytest.raises(ValueError, match="3 prompts but 2 seeds"):
        run_generate(tiny_pipeline, PROMPTS, [1, 2])


def test_bad_size_is_a_usage_error_before_sampling(tiny_pipeline):
    with pytest.raises(UsageError, match="--height 20"):
        run_generate(tiny_pipeline, PROMPTS[:1], [1], height=20)


# --- LoRA runs and their checkpoints as --model (lora_run_dir: conftest, rank 4, alpha 8, base recorded).


def test_lora_run_uses_the_recorded_base_and_its_checkpoint_the_ema_adapters(lora_run_dir, tiny_model_dir):
    """A LoRA OUTPUT_DIR → base from lora_run.json + its adapters; a checkpoint → lora_ema/ by default."""
    source = resolve_model(str(lora_run_dir), None)
    assert source.pipeline == str(tiny_model_dir.resolve()) and source.lora == lora_run_dir
    assert source.weights == "lora" and source.unet is None
    checkpoint = resolve_model(str(lora_run_dir / "checkpoint-2"), None)
    assert checkpoint.lora == lora_run_dir / "checkpoint-2" / "lora_ema" and checkpoint.weights == "lora_ema"
    raw = resolve_model(str(lora_run_dir / "checkpoint-2"), None, "unet", lora_scale=0.5)
    assert raw.lora == lora_run_dir / "checkpoint-2" and raw.lora_scale == 0.5


def test_lora_mistakes_are_usage_errors(lora_run_dir, tmp_path, tiny_model_dir):
    """--weights ema without lora_ema/, no record and no --base_model, --lora_scale on a plain pipeline."""
    bare = tmp_path / "bare"
    shutil.copytree(lora_run_dir, bare, ignore=shutil.ignore_patterns("checkpoint-*", "lora_run.json"))
    with pytest.raises(UsageError, match="lora_ema"):
        resolve_model(str(bare), None, "ema")
    with pytest.raises(UsageError, match="--base_model"):
        resolve_model(str(bare), None)
    assert resolve_model(str(bare), str(tiny_model_dir)).pipeline == str(tiny_model_dir)
    with pytest.raises(UsageError, match="--lora_scale 0.5"):
        resolve_model(str(tiny_model_dir), None, lora_scale=0.5)


def test_lora_scale_zero_is_the_base_and_one_is_the_trained_strength(lora_run_dir, tiny_model_dir):
    """load_pipeline at scale 0 draws the base's pixels; at 1 the same pixels as diffusers' own load."""
    from diffusers import StableDiffusionPipeline

    def draw(pipeline):
        """One seeded 16 px image."""
        return generate(pipeline, ["a field"], [0], negative_prompt=None, num_inference_steps=2, guidance_scale=7.5,
                        height=SIZE, width=SIZE)[0]

    base = np.asarray(draw(load_pipeline(str(tiny_model_dir), None, CPU, torch.float32)))
    zero = np.asarray(draw(load_pipeline(str(lora_run_dir), None, CPU, torch.float32, lora_scale=0.0)))
    ours = np.asarray(draw(load_pipeline(str(lora_run_dir), None, CPU, torch.float32)))
    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    reference.load_lora_weights(lora_run_dir)
    assert np.array_equal(zero, base) and not np.array_equal(ours, base)
    assert np.array_equal(ours, np.asarray(draw(reference)))
