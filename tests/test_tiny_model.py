"""stand_in.tiny_model: the offline stand-in pipelines (tiny for tests, larger presets for bench/bench_train.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stand_in.tiny_model import (TOKENIZER_MAX_LENGTH, build_components, build_preset_scheduler,
                                build_preset_tokenizer, build_tokenizer)

REPO = Path(__file__).resolve().parents[1]
# Published parameter counts of SD1.5's UNet and VAE, and of its CLIP ViT-L/14 text tower (vocabulary 49,408).
SD15_UNET, SD15_VAE, SD15_TEXT = 859_520_964, 83_653_863, 123_060_480
SD15_VOCAB, SD15_WIDTH = 49_408, 768
# SD 2.1's UNet (the same for 2.1-base and the 768 model), and its OpenCLIP ViT-H text tower cut to 23 layers.
SD21_UNET, SD21_TEXT, SD21_WIDTH = 865_910_724, 340_387_840, 1024


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


def test_sd21_preset_has_sd21_sizes():
    """Per-level heads, linear projections, cross-attention 1024: exactly SD 2.1's UNet parameter count."""
    vae, text, unet = parameter_counts("sd21")
    assert (vae, unet) == (SD15_VAE, SD21_UNET)
    assert text == SD21_TEXT - (SD15_VOCAB - len(build_tokenizer())) * SD21_WIDTH


@pytest.mark.parametrize("preset", ["sd2", "sd2_v", "sd21"])
def test_sd2_presets_carry_sd2s_config_features(preset):
    """What sets SD 2.x apart from SD1.5, in the configs the pipeline saves."""
    with torch.device("meta"):
        _, text_encoder, unet = build_components(preset, len(build_tokenizer()))
    unet_config, text_config = unet.config, text_encoder.config
    assert unet_config.use_linear_projection is True
    heads = unet_config.attention_head_dim
    assert isinstance(heads, (list, tuple)) and len(heads) == len(unet_config.block_out_channels)
    assert len({c // h for c, h in zip(unet_config.block_out_channels, heads)}) == 1  # one head width everywhere
    assert unet_config.upcast_attention is (preset != "sd2")  # 2.1-base does not upcast, the 768 model does
    assert unet_config.cross_attention_dim == text_config.hidden_size
    assert text_config.hidden_act == "gelu" and text_config.num_hidden_layers % 2 == 1  # 23 of OpenCLIP's 24
    scheduler = build_preset_scheduler(preset)
    expected = ("PNDMScheduler", "epsilon") if preset == "sd2" else ("DDIMScheduler", "v_prediction")
    assert (type(scheduler).__name__, scheduler.config.prediction_type) == expected


def test_sd2_tiny_presets_are_wider_than_sd1s_and_the_v_model_samples_larger():
    """Cross-attention wider than the SD1 tiny preset's; the 768 model's default size is 1.5x 2.1-base's."""
    with torch.device("meta"):
        tiny = build_components("tiny", 10)[2].config
        base, v_model = (build_components(p, 10)[2].config for p in ("sd2", "sd2_v"))
    assert base.cross_attention_dim > tiny.cross_attention_dim
    assert v_model.sample_size * 512 == base.sample_size * 768


def test_sd2_tokenizer_pads_with_exclamation_marks_not_the_end_token():
    """SD2's tokenizer pads with "!"; SD1.5's (and our other presets') with <|endoftext|>."""
    for preset, pad in (("sd2", "!"), ("tiny", "<|endoftext|>")):
        tokenizer = build_preset_tokenizer(preset)
        ids = tokenizer("a", padding="max_length", max_length=6)["input_ids"]
        assert ids[:3] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("a</w>"), tokenizer.eos_token_id]
        assert ids[3:] == [tokenizer.convert_tokens_to_ids(pad)] * 3


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
    done = subprocess.run([sys.executable, "-m", "stand_in.tiny_model", str(out), "--preset", "tiny"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.tokenizer.model_max_length == 77 and pipe.safety_checker is None
    assert sorted(p.name for p in out.glob("*/*.safetensors"))  # weights saved as safetensors


def test_silenced_cross_attention_makes_the_output_independent_of_the_text():
    import torch

    from stand_in.tiny_model import build_unet, silence_cross_attention

    torch.manual_seed(0)
    unet = build_unet()
    latents, timestep = torch.randn(1, 4, 8, 8), torch.tensor([500])
    states = torch.randn(2, 1, 77, 32)

    def outputs():
        with torch.no_grad():
            return [unet(latents, timestep, s).sample for s in states]

    assert not torch.allclose(*outputs())  # a random UNet follows its text, by accident
    silence_cross_attention(unet)
    assert torch.equal(*outputs())
