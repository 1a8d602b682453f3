"""trainer/hub.py and preflight's repo creation: model card, upload exclusions, token hygiene."""

import logging
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from trainer import hub
from trainer.args import parse_args
from trainer.preflight import create_hub_repo
from utils.constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
from utils.logger import setup_logging

TOKEN = "hf_TESTtoken0123456789abcdef"
REQUIRED_KEYS = {"base_model", "license", "tags", "datasets", "pipeline_tag", "library_name", "inference"}


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch, tmp_path):
    """No real token file and no stray HF_TOKEN; every test sets what it needs."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))


def args_for(tmp_path, *extra):
    """Args like train.sh's, with an output dir under tmp_path."""
    return parse_args(["--pretrained_model_name_or_path", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                       "--train_data_dir", str(tmp_path / "data" / "rsicd"), "--output_dir", str(tmp_path / "out"),
                       *extra])


def front_matter(text: str) -> dict:
    """Parse the YAML between the leading '---' lines of a card."""
    assert text.startswith("---\n")
    header, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(header)


def test_card_front_matter_and_body(tmp_path):
    """Valid YAML with the required keys, prompts, grid link, usage snippet with the inference defaults."""
    (tmp_path / "out").mkdir()
    grid = tmp_path / "out" / "validation_grid.png"
    grid.write_bytes(b"png")
    args = args_for(tmp_path, "--validation_prompt", "A satellite image of a crop field", "--report_to=wandb")
    path = hub.write_model_card(tmp_path / "out", args, "me/sd-rsicd", grid)
    text = path.read_text()
    meta = front_matter(text)
    assert REQUIRED_KEYS <= set(meta)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m" and meta["pipeline_tag"] == "text-to-image"
    assert {"stable-diffusion", "text-to-image", "diffusers", "remote-sensing"} <= set(meta["tags"])
    assert meta["library_name"] == "diffusers" and meta["inference"] is True
    assert "A satellite image of a crop field" in text and "](validation_grid.png)" in text
    assert 'StableDiffusionPipeline.from_pretrained("me/sd-rsicd", torch_dtype=torch.float16)' in text
    assert f"num_inference_steps={DEFAULT_NUM_INFERENCE_STEPS}" in text
    assert f"guidance_scale={DEFAULT_GUIDANCE_SCALE}" in text
    assert "| `learning_rate` |" in text
    assert not (tmp_path / "out" / "README.md.tmp").exists()


def test_card_without_prompts_wandb_or_grid(tmp_path, monkeypatch):
    """The reference's card breaks here: no prompts, no grid, wandb not even importable."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    text = hub.write_model_card(tmp_path / "out", args_for(tmp_path), None, None).read_text()
    meta = front_matter(text)
    assert REQUIRED_KEYS <= set(meta)
    assert "Validation prompts" not in text and "![" not in text
    assert 'from_pretrained("out"' in text


def test_card_never_holds_token_or_local_paths(tmp_path):
    """Token and machine paths stay out of the public card; the dataset is described as local data."""
    args = args_for(tmp_path, "--hub_token", TOKEN, "--cache_dir", str(tmp_path / "secret-cache"))
    text = hub.write_model_card(tmp_path / "out", args, "me/x", None).read_text()
    assert TOKEN not in text and str(tmp_path) not in text
    assert front_matter(text)["datasets"] == [] and "local image/caption dataset (`rsicd`" in text


def test_card_hub_dataset_and_local_base(tmp_path):
    """A Hub dataset is listed in datasets; a local base model is not claimed as a Hub base_model."""
    (tmp_path / "tiny").mkdir()
    args = parse_args(["--pretrained_model_name_or_path", str(tmp_path / "tiny"), "--dataset_name",
                       "arampacha/rsicd", "--output_dir", str(tmp_path / "out")])
    meta = front_matter(hub.write_model_card(tmp_path / "out", args, "me/x", None).read_text())
    assert meta["datasets"] == ["arampacha/rsicd"] and "base_model" not in meta


def test_grid_outside_output_dir_is_copied_in(tmp_path):
    """A grid elsewhere is copied next to the card so the link works on the Hub."""
    grid = tmp_path / "elsewhere.png"
    grid.write_bytes(b"png")
    text = hub.write_model_card(tmp_path / "out", args_for(tmp_path), "me/x", grid).read_text()
    assert (tmp_path / "out" / "validation_grid.png").read_bytes() == b"png"
    assert "](validation_grid.png)" in text


FAKE_OUTPUT = {
    "keep": ["model_index.json", "README.md", "validation_grid.png", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/model.safetensors",
             "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"],
    "drop": ["checkpoint-2/unet/diffusion_pytorch_model.safetensors", "checkpoint-2/optimizer.bin",
             "checkpoint-4/unet_ema/config.json", "checkpoint-6.tmp/random_states_0.pkl",
             ".checkpoint-8.partial/unet/config.json", ".checkpoint-2.old/optimizer.bin",
             "logs/text2image-fine-tune/events.out.tfevents.1.host", "validation/step-500/0.png",
             "wandb/run-1/files/config.yaml", ".cache/huggingface/upload/x.lock", "unet.tmp/config.json",
             "README.md.tmp", "tb/events.out.tfevents.2.host"],
}


def make_fake_output(root: Path) -> list:
    """Write every file of FAKE_OUTPUT under root; return their relative posix paths."""
    for rel in FAKE_OUTPUT["keep"] + FAKE_OUTPUT["drop"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def kept_by(patterns, files) -> set:
    """Files huggingface_hub would upload: fnmatch, with its rule that 'dir/' means 'dir/*'."""
    expanded = [p + "*" if p.endswith("/") else p for p in patterns]
    return {f for f in files if not any(fnmatch(f, p) for p in expanded)}


def test_push_final_excludes_checkpoints_and_logs(tmp_path, monkeypatch, caplog, capsys):
    """The upload call's own ignore patterns, evaluated on a real folder, keep the pipeline and drop the rest."""
    calls = []
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", lambda self, **kw: calls.append(kw))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    files = make_fake_output(tmp_path / "out")
    monkeypatch.setattr(setup_logging(), "propagate", True)
    with caplog.at_level(logging.DEBUG):
        hub.push_final(tmp_path / "out", "me/sd-rsicd", args_for(tmp_path, "--logging_dir", "tb"))
    (call,) = calls
    assert call["repo_id"] == "me/sd-rsicd" and call["token"] == TOKEN
    assert Path(call["folder_path"]) == tmp_path / "out"
    assert kept_by(call["ignore_patterns"], files) == set(FAKE_OUTPUT["keep"])
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err
    assert "me/sd-rsicd" in caplog.text


def test_push_final_failure_is_clear_and_token_free(tmp_path, monkeypatch, caplog):
    """A failed upload names the repo and the retry, and masks the token even if the library echoed it."""
    def fail(self, **kw):
        """An upload that fails with a message echoing the token."""
        raise RuntimeError(f"403 forbidden for token {TOKEN}")

    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", fail)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(setup_logging(), "propagate", True)
    with pytest.raises(hub.PushError) as info:
        hub.push_final(tmp_path / "out", "me/x", args_for(tmp_path))
    assert "me/x" in str(info.value) and "hf upload" in str(info.value)
    assert TOKEN not in str(info.value) + caplog.text


def test_create_repo_with_env_token_and_namespace(tmp_path, monkeypatch, caplog, capsys):
    """The repo id is the output dir's name under the user's namespace; created with exist_ok and the env token."""
    calls = []

    def fake_create(self, repo_id, **kw):
        """Record the call; answer like create_repo's RepoUrl."""
        calls.append((repo_id, kw))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", fake_create)
    monkeypatch.setattr("huggingface_hub.HfApi.whoami", lambda self, token=None, **kw: {"name": "alice"})
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with caplog.at_level(logging.DEBUG):
        assert create_hub_repo(args_for(tmp_path, "--push_to_hub")) == "alice/out"
    assert calls == [("alice/out", {"exist_ok": True, "token": TOKEN, "repo_type": "model"})]
    assert create_hub_repo(args_for(tmp_path, "--push_to_hub", "--hub_model_id", "org/name")) == "org/name"
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_hub_token_flag_beats_env(tmp_path, monkeypatch):
    """--hub_token is used when given, like the reference."""
    seen = []
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo",
                        lambda self, repo_id, **kw: seen.append(kw["token"]) or None)
    monkeypatch.setenv("HF_TOKEN", "hf_fromenv")
    assert create_hub_repo(args_for(tmp_path, "--push_to_hub", "--hub_token", TOKEN, "--hub_model_id", "a/b")) \
        == "a/b"
    assert seen == [TOKEN]


def test_lora_card_and_upload(tmp_path, monkeypatch):
    """A LoRA run: base_model and lora tags, a load_lora_weights snippet; the upload keeps only the LoRA files,
    card and grid (no checkpoint adapters, no lora_run.json with its local path)."""
    args = args_for(tmp_path, "--lora_rank", "16")
    text = hub.write_model_card(tmp_path / "card", args, "me/sd-rsicd-lora").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and "lora" in meta["tags"]
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5"' in text
    assert 'pipe.load_lora_weights("me/sd-rsicd-lora")' in text and "LoRA adapters (rank 16)" in text
    assert "pytorch_lora_weights_kohya.safetensors" in text
    keep = ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "README.md",
            "validation_grid.png", "loss_curve.png"]
    drop = ["lora_run.json", "checkpoint-2/pytorch_lora_weights.safetensors", "checkpoint-2/optimizer.bin",
            "checkpoint-2/lora_ema/pytorch_lora_weights.safetensors", "checkpoint-2/lora_run.json",
            ".pytorch_lora_weights.safetensors.tmp"]
    root = tmp_path / "out"
    for rel in keep + drop:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert kept_by(hub.ignore_patterns(args), files) == set(keep)


def test_card_shows_the_validation_progress_picture_when_training_wrote_one(tmp_path):
    """validation_progress.png in OUTPUT_DIR is linked with a line saying how to read it; absent, no link."""
    args = args_for(tmp_path, "--validation_prompt", "A satellite image of a crop field")
    assert "validation_progress.png" not in hub.write_model_card(tmp_path / "out", args, "me/x", None).read_text()
    (tmp_path / "out" / "validation_progress.png").write_bytes(b"png")
    text = hub.write_model_card(tmp_path / "out", args, "me/x", None).read_text()
    assert "![validation progress](validation_progress.png)" in text and "base model" in text
