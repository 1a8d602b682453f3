"""Build a tiny, randomly initialised Stable Diffusion pipeline offline, for tests, the demo and benchmarks.

No weights can be downloaded here, so this makes a pipeline with the same structure as SD1.5 (UNet, VAE,
CLIP text encoder, byte-level CLIP tokenizer, DDPM-style scheduler with SD's betas) but tiny sizes.
Run: python -m trainer.tiny_model OUTPUT_DIR [--seed 0] [--preset tiny|vae_realistic|sd15]
(the larger presets exist for bench/bench_train.py).
"""

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from utils.quiet import quiet_loading_bars

TOKENIZER_MAX_LENGTH = 77


def byte_symbols() -> list:
    """The 256 printable symbols byte-level BPE uses for bytes: printable Latin-1 as is, the rest shifted past 255."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: every byte symbol, alone and word-final, plus the two specials."""
    symbols = byte_symbols()
    vocab = {}
    for sym in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(sym, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH)


def build_text_encoder(vocab_size: int, hidden_size: int = 32, intermediate_size: int = 37, num_layers: int = 2,
                       num_heads: int = 4) -> CLIPTextModel:
    """A CLIP text encoder over our vocabulary (small by default) whose hidden size is the UNet's cross-attention dim."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="quick_gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int = 32, sample_size: int = 8) -> UNet2DConditionModel:
    """A two-level conditional UNet with SD's block types."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def build_vae(sample_size: int = 64) -> AutoencoderKL:
    """A two-block KL autoencoder with 4 latent channels and a downscale of 2."""
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32,
    )


def build_scheduler() -> DDPMScheduler:
    """A DDPM scheduler with Stable Diffusion's scaled-linear betas."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )


def build_sd15_vae() -> AutoencoderKL:
    """A KL autoencoder with Stable Diffusion 1.5's configuration (83.7M parameters, downscale 8), random weights."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3, out_channels=3,
        latent_channels=4, sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
    )


def build_sd_unet(block_out_channels: tuple, layers_per_block: int, cross_attention_dim: int,
                  sample_size: int) -> UNet2DConditionModel:
    """A UNet with SD1.5's block layout (cross-attention in all but the deepest level) at the given widths."""
    levels = len(block_out_channels)
    return UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, sample_size=sample_size,
        in_channels=4, out_channels=4, cross_attention_dim=cross_attention_dim, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
    )


def build_components(preset: str, vocab_size: int) -> tuple:
    """(vae, text_encoder, unet) of a preset: tiny (64 px tests), vae_realistic (SD1.5's VAE, small UNet), sd15."""
    if preset == "tiny":
        return build_vae(), build_text_encoder(vocab_size), build_unet()
    if preset == "vae_realistic":
        return (build_sd15_vae(), build_text_encoder(vocab_size, hidden_size=256),
                build_sd_unet((64, 128, 256, 256), 1, 256, 32))
    if preset == "sd15":
        # SD1.5's text tower is CLIP ViT-L/14's: 12 layers, width 768, 12 heads
        return (build_sd15_vae(), build_text_encoder(vocab_size, 768, 3072, num_layers=12, num_heads=12),
                build_sd_unet((320, 640, 1280, 1280), 2, 768, 64))
    raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")


PRESETS = ("tiny", "vae_realistic", "sd15")


def build_tiny_pipeline(seed: int = 0, preset: str = "tiny") -> StableDiffusionPipeline:
    """Assemble a random pipeline of the preset (tiny by default), deterministically for a given seed."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vae, text_encoder, unet = build_components(preset, len(tokenizer))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(output_dir: str, seed: int = 0, preset: str = "tiny") -> Path:
    """Build the preset's pipeline and save it (safetensors) to output_dir."""
    out = Path(output_dir)
    build_tiny_pipeline(seed, preset).save_pretrained(out, safe_serialization=True)
    return out


def main(argv=None) -> int:
    """CLI: write the tiny pipeline to a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    parser.add_argument("--preset", choices=PRESETS, default="tiny",
                        help="tiny (tests), vae_realistic (SD1.5's VAE + a small UNet, for CPU benchmarks) or sd15 "
                             "(SD1.5-shaped UNet, VAE and text encoder; ~1.1B parameters) (default tiny)")
    args = parser.parse_args(argv)
    quiet_loading_bars()
    print(save_tiny_pipeline(args.output_dir, args.seed, args.preset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
