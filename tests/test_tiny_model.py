"""trainer.tiny_model: the offline stand-in pipelines (tiny for tests, larger presets for bench/bench_train.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.tiny_model import TOKENIZER_MAX_LENGTH, build_components, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Published parameter counts of SD1.5's UNet and VAE, and of its CLIP ViT-L/14 text tower (vocabulary 49,408).
SD15_UNET, SD15_VAE, SD15_TEXT = 859_520_964, 83_653_863, 123_060_480
SD15_VOCAB, SD15_WIDTH = 49_408, 768


def parameter_counts(preset: str) -> tuple:
    """(vae, text encoder, unet) parameter counts of a preset, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        modules = build_components(preset, len(build_tokenizer()))
    return tuple(sum(p.numel() for p in m.parameters()) for m in modules)


def test_sd15_preset_has_sd15_sizes():
    vae, text, unet = parameter_counts("sd15")
    assert (vae, unet) == (SD15_VAE, SD15_UNET)
    # Same tower; only the token embedding is smaller, because the vocabulary is our byte-level one.
    assert text == SD15_TEXT - (SD15_VOCAB - len(build_tokenizer())) * SD15_WIDTH


def test_vae_realistic_preset_pairs_sd15s_vae_with_a_small_unet():
    vae, _, unet = parameter_counts("vae_realistic")
    assert vae == SD15_VAE and unet < SD15_UNET / 10


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'sdxl'"):
        build_components("sdxl", 10)


def test_byte_tokenizer_keeps_every_character_of_any_text():
    tokenizer = build_tokenizer()
    text = "an airport, 3 planes & a pond — café"
    ids = tokenizer(text)["input_ids"]
    # CLIP's pre-tokenizer splits punctuation off words, so decoding may add spaces; no character is lost.
    assert "".join(tokenizer.decode(ids, skip_special_tokens=True).split()) == "".join(text.split())
    assert tokenizer.model_max_length == TOKENIZER_MAX_LENGTH == 77


def test_cli_saves_a_pipeline_that_diffusers_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "-m", "trainer.tiny_model", str(out), "--preset", "tiny"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer.model_max_length == 77 and pipe.safety_checker is None
    assert sorted(p.name for p in out.glob("*/*.safetensors"))  # weights saved as safetensors
