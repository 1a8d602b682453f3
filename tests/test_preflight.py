"""trainer/preflight.py: every fail-fast check gives its one-line message before any model loads."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from trainer import preflight as pf
from trainer.args import parse_args
from trainer.preflight import PIPELINE_FILES, preflight
from utils.cli import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "some-org/some-model"
TOKEN = "hf_TESTtoken0123456789abcdef"


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """A folder with a diffusers pipeline's layout (configs only: preflight never loads weights)."""
    folder = tmp_path / "base"
    for name in PIPELINE_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def write_imagefolder(folder: Path, rows: int = 3, **extra) -> Path:
    """An imagefolder like format.py writes: metadata.jsonl next to rsicd_images/."""
    (folder / "rsicd_images").mkdir(parents=True)
    with (folder / "metadata.jsonl").open("w") as handle:
        for i in range(rows):
            name = f"rsicd_images/image_{i:06d}.jpg"
            Image.new("RGB", (8, 8), (i * 40, 90, 200)).save(folder / name)
            handle.write(json.dumps({"file_name": name, "text": f"caption {i}", **extra}) + "\n")
    return folder


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    """A valid three-image imagefolder."""
    return write_imagefolder(tmp_path / "data")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    """No real token, no real cache, no network: every Hub call in these tests is intercepted or offline."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))


def make_args(model, data, tmp_path, *extra):
    """Parsed args with a local model, a data dir and an output dir under tmp_path."""
    return parse_args(["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
                       "--output_dir", str(tmp_path / "out"), *[str(e) for e in extra]])


def fails_with(args, *fragments) -> str:
    """preflight(args) raises a one-line UsageError holding every fragment; returns the message."""
    with pytest.raises(UsageError) as info:
        preflight(args)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_valid_local_setup_passes(model_dir, data_dir, tmp_path):
    """A correct local setup passes and creates nothing."""
    result = preflight(make_args(model_dir, data_dir, tmp_path))
    assert result.hub_repo_id is None and result.model_is_local and result.resume_path is None
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resolution", [0, -8, 100, 513])
def test_resolution_must_be_multiple_of_8(resolution, model_dir, data_dir, tmp_path):
    """The VAE's factor of 8: anything else fails inside the UNet much later."""
    fails_with(make_args(model_dir, data_dir, tmp_path, f"--resolution={resolution}"),
               f"--resolution {resolution}", "multiple of 8")


def test_missing_data_dir(model_dir, tmp_path):
    """A data dir that does not exist is named."""
    fails_with(make_args(model_dir, tmp_path / "nope", tmp_path), "--train_data_dir", "nope", "does not exist")


def test_images_folder_points_to_parent(model_dir, data_dir, tmp_path):
    """Passing rsicd_images/ tells the user to pass its parent, which holds metadata.jsonl."""
    fails_with(make_args(model_dir, data_dir / "rsicd_images", tmp_path), "pass its parent", str(data_dir),
               "metadata.jsonl")


def test_folder_without_metadata(model_dir, tmp_path):
    """A folder of images with no metadata.jsonl anywhere near is a clear error."""
    (tmp_path / "imgs").mkdir()
    fails_with(make_args(model_dir, tmp_path / "imgs", tmp_path), "holds no metadata.jsonl")


def test_missing_caption_column(model_dir, data_dir, tmp_path):
    """A caption column absent from metadata.jsonl lists the columns there are."""
    fails_with(make_args(model_dir, data_dir, tmp_path, "--caption_column", "caption"),
               "--caption_column 'caption'", "columns: image, text")


def test_missing_image_column(model_dir, data_dir, tmp_path):
    """An image column other than imagefolder's 'image' must exist in the metadata."""
    fails_with(make_args(model_dir, data_dir, tmp_path, "--image_column", "img"), "--image_column 'img'")


def test_extra_metadata_column_accepted(model_dir, tmp_path):
    """A caption column that is present (other than 'text') passes."""
    data = write_imagefolder(tmp_path / "d2", captions=["a", "b"])
    preflight(make_args(model_dir, data, tmp_path, "--caption_column", "captions"))


def test_metadata_bad_json_and_missing_image(model_dir, data_dir, tmp_path):
    """A corrupt line and a line naming a missing image are reported with their line number."""
    metadata = data_dir / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    metadata.write_text("\n".join(lines + ["{not json"]) + "\n")
    fails_with(make_args(model_dir, data_dir, tmp_path), "metadata.jsonl:4", "not valid JSON")
    (data_dir / "rsicd_images" / "image_000001.jpg").unlink()
    fails_with(make_args(model_dir, data_dir, tmp_path), "metadata.jsonl:2", "image_000001.jpg", "does not exist")


def test_empty_metadata(model_dir, data_dir, tmp_path):
    """No examples at all is an error, not an empty epoch loop."""
    (data_dir / "metadata.jsonl").write_text("\n")
    fails_with(make_args(model_dir, data_dir, tmp_path), "is empty")


def test_output_dir_is_a_file(model_dir, data_dir, tmp_path):
    """An output path that is a file, or lies under one, cannot be used."""
    (tmp_path / "afile").write_text("x")
    args = parse_args(["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
                       "--output_dir", str(tmp_path / "afile")])
    fails_with(args, "--output_dir", "not a folder")
    args = parse_args(["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir),
                       "--output_dir", str(tmp_path / "afile" / "sub")])
    fails_with(args, "--output_dir", "cannot be created")


def test_output_dir_not_writable(model_dir, data_dir, tmp_path, monkeypatch):
    """An unwritable location is caught (os.access is intercepted: tests may run as root)."""
    monkeypatch.setattr(pf.os, "access", lambda path, mode: False)
    fails_with(make_args(model_dir, data_dir, tmp_path), "--output_dir", "not writable")


def test_wandb_must_be_importable(model_dir, data_dir, tmp_path, monkeypatch):
    """--report_to wandb without the package fails now, not at init_trackers."""
    real = pf.importlib.util.find_spec
    monkeypatch.setattr(pf.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    fails_with(make_args(model_dir, data_dir, tmp_path, "--report_to=wandb"), "pip install wandb")
    preflight(make_args(model_dir, data_dir, tmp_path, "--report_to=tensorboard"))


def test_resume_missing_checkpoint(model_dir, data_dir, tmp_path):
    """Naming a checkpoint that does not exist is an error listing those that do."""
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-4.tmp").mkdir()
    fails_with(make_args(model_dir, data_dir, tmp_path, "--resume_from_checkpoint", "checkpoint-7"),
               "'checkpoint-7' does not exist", "checkpoint-2", "drop the flag")


def test_resume_resolution(model_dir, data_dir, tmp_path):
    """latest picks the highest complete step; a bare name lives in the output dir; latest with none is fresh."""
    assert preflight(make_args(model_dir, data_dir, tmp_path, "--resume_from_checkpoint", "latest")).resume_path \
        is None
    for step in (2, 10, 4):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-12.tmp").mkdir()
    latest = preflight(make_args(model_dir, data_dir, tmp_path, "--resume_from_checkpoint", "latest"))
    assert latest.resume_path == tmp_path / "out" / "checkpoint-10"
    named = preflight(make_args(model_dir, data_dir, tmp_path, "--resume_from_checkpoint", "checkpoint-4"))
    assert named.resume_path == tmp_path / "out" / "checkpoint-4"


def test_local_model_without_model_index(model_dir, data_dir, tmp_path):
    """A folder that is not a pipeline (e.g. a checkpoint-N) is named as such."""
    (model_dir / "model_index.json").unlink()
    fails_with(make_args(model_dir, data_dir, tmp_path), "holds no model_index.json", "pipeline folder")


def test_local_model_missing_component(model_dir, data_dir, tmp_path):
    """A pipeline folder missing a component lists what is missing."""
    (model_dir / "vae" / "config.json").unlink()
    fails_with(make_args(model_dir, data_dir, tmp_path), "is missing vae/config.json")


@pytest.mark.parametrize("value,fragment", [("./nowhere/model", "does not exist"),
                                            ("bad id!!", "nor a valid Hub id"),
                                            ("a/b/c/d", "does not exist")])
def test_bad_model_value(value, fragment, data_dir, tmp_path):
    """Non-existent paths and malformed Hub ids fail without touching the network."""
    fails_with(make_args(value, data_dir, tmp_path), fragment)


def write_hub_cache(cache: Path, repo_id: str, files) -> None:
    """A minimal huggingface_hub cache snapshot of repo_id at 'main' holding files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in files:
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


def test_offline_model_not_cached(data_dir, tmp_path, monkeypatch):
    """Offline, a Hub id absent from the cache says what is missing and how to fix it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = make_args(HUB_ID, data_dir, tmp_path, "--cache_dir", tmp_path / "cache")
    fails_with(args, f"'{HUB_ID}' is not in the local Hugging Face cache", "HF_HUB_OFFLINE=1", "hf download")


def test_offline_model_partly_cached(data_dir, tmp_path, monkeypatch):
    """A partial download lists the missing files; a complete one passes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_hub_cache(tmp_path / "cache", HUB_ID, [n for n in PIPELINE_FILES if not n.startswith("unet/")])
    args = make_args(HUB_ID, data_dir, tmp_path, "--cache_dir", tmp_path / "cache")
    fails_with(args, "missing unet/config.json")
    write_hub_cache(tmp_path / "cache2", HUB_ID, PIPELINE_FILES)
    result = preflight(make_args(HUB_ID, data_dir, tmp_path, "--cache_dir", tmp_path / "cache2"))
    assert not result.model_is_local


def hub_error(cls, message="hub says no"):
    """An instance of a huggingface_hub HTTP error class, with a fake response."""
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/x")
    return cls(message, response=httpx2.Response(404, request=request))


def raising(exc):
    """A stand-in Hub method that raises exc."""
    def method(*args, **kwargs):
        """Fail like the Hub would."""
        raise exc
    return method


@pytest.mark.parametrize("error_name,fragment", [("RepositoryNotFoundError", "was not found on the Hub"),
                                                 ("GatedRepoError", "is gated"),
                                                 ("RevisionNotFoundError", "--revision")])
def test_online_model_hub_errors(error_name, fragment, data_dir, tmp_path, monkeypatch):
    """The Hub's answers become one line each."""
    import huggingface_hub.errors

    error = hub_error(getattr(huggingface_hub.errors, error_name))
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", raising(error))
    fails_with(make_args(HUB_ID, data_dir, tmp_path), fragment)


def test_online_model_unreachable_falls_back_to_cache(data_dir, tmp_path, monkeypatch):
    """An unreachable Hub is fine if the cache has the model, an error naming both otherwise."""
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", raising(ConnectionError("Name or service not known")))
    fails_with(make_args(HUB_ID, data_dir, tmp_path, "--cache_dir", tmp_path / "c"), "the Hub is unreachable",
               "not in the local Hugging Face cache")
    write_hub_cache(tmp_path / "c2", HUB_ID, PIPELINE_FILES)
    preflight(make_args(HUB_ID, data_dir, tmp_path, "--cache_dir", tmp_path / "c2"))


def test_online_model_not_a_pipeline(data_dir, tmp_path, monkeypatch):
    """A Hub repo without model_index.json is not a diffusers pipeline."""
    from types import SimpleNamespace

    info = SimpleNamespace(siblings=[SimpleNamespace(rfilename="config.json")])
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda self, *a, **k: info)
    fails_with(make_args(HUB_ID, data_dir, tmp_path), "not a diffusers pipeline")


def test_dataset_name_checks(model_dir, tmp_path, monkeypatch):
    """--dataset_name: a missing path or an unknown Hub id fails; an existing local path passes."""
    def args_for(name):
        """Args training on dataset `name`."""
        return parse_args(["--pretrained_model_name_or_path", str(model_dir), "--dataset_name", str(name),
                           "--output_dir", str(tmp_path / "out")])

    fails_with(args_for("./no/such/dataset"), "--dataset_name", "does not exist")
    import huggingface_hub.errors

    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info",
                        raising(hub_error(huggingface_hub.errors.RepositoryNotFoundError)))
    fails_with(args_for("someone/rsicd"), "--dataset_name 'someone/rsicd' was not found")
    (tmp_path / "localds").mkdir()
    preflight(args_for(tmp_path / "localds"))


def test_push_needs_login(model_dir, data_dir, tmp_path):
    """No --hub_token, no HF_TOKEN, no stored login: the fix is named."""
    fails_with(make_args(model_dir, data_dir, tmp_path, "--push_to_hub"), "run `hf auth login` or set HF_TOKEN")


def test_push_offline(model_dir, data_dir, tmp_path, monkeypatch):
    """Pushing while HF_HUB_OFFLINE is set can never succeed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fails_with(make_args(model_dir, data_dir, tmp_path, "--push_to_hub"), "HF_HUB_OFFLINE")


def test_push_hub_failure_is_one_line_without_token(model_dir, data_dir, tmp_path, monkeypatch):
    """A Hub failure while creating the repo is one line, and the token is masked even if echoed."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", raising(RuntimeError(f"401 bad token {TOKEN}\nmore")))
    message = fails_with(make_args(model_dir, data_dir, tmp_path, "--push_to_hub", "--hub_model_id", "me/x"),
                         "cannot create Hub repo 'me/x'", "401")
    assert TOKEN not in message


def test_push_whoami_failure(model_dir, data_dir, tmp_path, monkeypatch):
    """A rejected token is reported when the namespace is looked up."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi.whoami", raising(RuntimeError("401 Unauthorized")))
    fails_with(make_args(model_dir, data_dir, tmp_path, "--push_to_hub"), "cannot identify your Hub account")


@pytest.mark.skipif(not (REPO_ROOT / "train_text_to_image.py").exists(), reason="entry script not written yet")
def test_entry_script_fails_fast(model_dir, data_dir, tmp_path):
    """The real entry stops on a bad data dir before loading the (weightless) model: exit 2, one line, quickly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    command = [sys.executable, "train_text_to_image.py", "--pretrained_model_name_or_path", str(model_dir),
               "--train_data_dir", str(data_dir / "rsicd_images"), "--output_dir", str(tmp_path / "out")]
    start = time.monotonic()
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert len(lines) == 1 and "pass its parent" in lines[0], out.stderr
    assert elapsed < 30


@pytest.fixture()
def no_accelerate_env(monkeypatch):
    """Neither accelerate's precision nor its CPU switch from the calling shell."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)


def fake_gpu(monkeypatch, native_bf16: bool) -> None:
    """torch reports one CUDA GPU, with or without native bf16."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: native_bf16)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda *a: "Tesla T4")


def test_fp16_without_cuda_names_the_fix(model_dir, data_dir, tmp_path, no_accelerate_env):
    """fp16 on this CPU-only machine: refused before any model loads, naming bf16 and no."""
    fails_with(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=fp16"), "--mixed_precision=fp16",
               "needs a CUDA GPU", "--mixed_precision=bf16", "--mixed_precision=no")


def test_fp16_from_accelerate_config_is_checked_too(model_dir, data_dir, tmp_path, no_accelerate_env, monkeypatch):
    """Without the flag, the precision `accelerate launch` passes on is the one checked; the flag wins over it."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    fails_with(make_args(model_dir, data_dir, tmp_path), "fp16 (from the accelerate config", "--mixed_precision=bf16")
    preflight(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=no"))
    preflight(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=bf16"))


def test_fp16_on_a_gpu_forced_to_cpu(model_dir, data_dir, tmp_path, no_accelerate_env, monkeypatch):
    """`accelerate launch --cpu` (ACCELERATE_USE_CPU) trains on the CPU: fp16 is refused although a GPU exists."""
    fake_gpu(monkeypatch, native_bf16=True)
    preflight(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=fp16"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    fails_with(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=fp16"), "needs a CUDA GPU")


def test_bf16_needs_native_bf16_on_a_gpu(model_dir, data_dir, tmp_path, no_accelerate_env, monkeypatch):
    """bf16 on a GPU without native bf16 is refused naming fp16 and no; with native bf16 it passes."""
    fake_gpu(monkeypatch, native_bf16=False)
    fails_with(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=bf16"), "native bf16", "Tesla T4",
               "--mixed_precision=fp16", "--mixed_precision=no")
    fake_gpu(monkeypatch, native_bf16=True)
    preflight(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=bf16"))


def test_bf16_on_cpu_passes(model_dir, data_dir, tmp_path, no_accelerate_env):
    """bf16 autocast works on the CPU."""
    preflight(make_args(model_dir, data_dir, tmp_path, "--mixed_precision=bf16"))


def test_dream_with_v_prediction_is_refused(model_dir, data_dir, tmp_path):
    """DREAM with v_prediction, from the flag or from the base scheduler's config: one line; epsilon passes."""
    fails_with(make_args(model_dir, data_dir, tmp_path, "--dream_training", "--prediction_type=v_prediction"),
               "--dream_training", "v_prediction")
    preflight(make_args(model_dir, data_dir, tmp_path, "--dream_training"))  # config without a type: epsilon
    (model_dir / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    fails_with(make_args(model_dir, data_dir, tmp_path, "--dream_training"), "--dream_training")
    preflight(make_args(model_dir, data_dir, tmp_path, "--dream_training", "--prediction_type=epsilon"))
    preflight(make_args(model_dir, data_dir, tmp_path))


def test_entry_script_refuses_fp16_on_cpu(model_dir, data_dir, tmp_path):
    """As users run it: fp16 on a machine without CUDA is one line and exit 2, before any model loads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "train_text_to_image.py", "--pretrained_model_name_or_path", str(model_dir),
               "--train_data_dir", str(data_dir), "--output_dir", str(tmp_path / "out"), "--mixed_precision=fp16"]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and "--mixed_precision=bf16" in lines[0] and "Traceback" not in out.stderr, out.stderr
