"""Build a tiny, randomly initialised Stable Diffusion pipeline offline, for tests, the demo and benchmarks.

No weights can be downloaded here, so this makes a pipeline with the same structure as SD1.5 (UNet, VAE,
CLIP text encoder, byte-level CLIP tokenizer, DDPM-style scheduler with SD's betas) but tiny sizes.
The sd2 / sd2_v presets are tiny pipelines shaped like SD 2.1-base / SD 2.1 (768, v-prediction): see SD2_PRESETS.
Run: python -m stand_in.tiny_model OUTPUT_DIR [--seed 0] [--preset tiny|vae_realistic|sd15|sd2|sd2_v|sd21]
(the larger presets exist for bench/bench_train.py); --fit_data DATA_DIR then fits its VAE and text encoder to a
data folder, as the demo does.
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from utils.cli import run_main
from utils.quiet import quiet_loading_bars

TOKENIZER_MAX_LENGTH = 77


def byte_symbols() -> list:
    """The 256 printable symbols byte-level BPE uses for bytes: printable Latin-1 as is, the rest shifted past 255."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def build_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: every byte symbol, alone and word-final, plus the two specials."""
    symbols = byte_symbols()
    vocab = {}
    for sym in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(sym, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENIZER_MAX_LENGTH, pad_token=pad_token)


def build_text_encoder(vocab_size: int, hidden_size: int = 32, intermediate_size: int = 37, num_layers: int = 2,
                       num_heads: int = 4, hidden_act: str = "quick_gelu") -> CLIPTextModel:
    """A CLIP text encoder over our vocabulary (small by default) whose hidden size is the UNet's cross-attention dim."""
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act=hidden_act, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
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
                  sample_size: int, attention_head_dim=8, use_linear_projection: bool = False,
                  upcast_attention: bool = False) -> UNet2DConditionModel:
    """A UNet with SD's block layout (cross-attention in all but the deepest level) at the given widths.

    The defaults are SD1.5's; SD 2.x gives attention_head_dim per level (diffusers reads it as the number of
    heads), linear instead of 1x1-conv projections into its transformers, and (the 768 model) fp32 attention scores.
    """
    levels = len(block_out_channels)
    return UNet2DConditionModel(
        block_out_channels=block_out_channels, layers_per_block=layers_per_block, sample_size=sample_size,
        in_channels=4, out_channels=4, cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
    )


def build_components(preset: str, vocab_size: int) -> tuple:
    """(vae, text_encoder, unet) of a preset: tiny (64 px tests), vae_realistic (SD1.5's VAE, small UNet), sd15,
    and the SD 2.x-shaped SD2_PRESETS."""
    if preset in SD2_PRESETS:
        return build_sd2_components(SD2_PRESETS[preset], vocab_size)
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


# SD 2.x as data, from stabilityai's stable-diffusion-2-1(-base) config.json files, scaled down where marked.
# UNet: cross-attention dim 1024 (SD1.5: 768) = the text encoder's width; attention_head_dim [5, 10, 20, 20] is a
# head count per level (64 channels a head), here 16 channels a head; linear projections; 2.1 (768) upcasts the
# attention scores to fp32, 2.1-base does not. Its default size (sample_size x the VAE's factor) is 1.5x the base's.
# Text encoder: OpenCLIP ViT-H's text tower (width 1024, 16 heads, MLP 4096, gelu, not CLIP's quick_gelu) cut to 23
# of its 24 layers, so the last hidden state IS the penultimate layer that SD2 conditions on (then the final layer
# norm, as in OpenCLIP): a trainer must not skip a layer again. Tiny: an odd 3 layers, read as 4 cut by one.
# Tokenizer: pads with "!" (OpenCLIP pads with id 0, which is "!"), not with the end token as SD1.5's does.
# Scheduler: 2.1-base ships PNDM + epsilon; 2.1 ships DDIM + v_prediction (its PNDM default was swapped for DDIM).
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "set_alpha_to_one": False}
SD21_BASE_SCHEDULER = ("PNDMScheduler", {**SD_BETAS, "skip_prk_steps": True, "prediction_type": "epsilon"})
SD21_V_SCHEDULER = ("DDIMScheduler", {**SD_BETAS, "clip_sample": False, "prediction_type": "v_prediction"})
SD2_TINY_UNET = {"block_out_channels": (32, 64), "layers_per_block": 2, "cross_attention_dim": 64,
                 "sample_size": 8, "attention_head_dim": (2, 4), "use_linear_projection": True}
SD2_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_layers": 3, "num_heads": 4, "hidden_act": "gelu"}
SD2_PRESETS = {
    "sd2": {"vae": "tiny", "unet": SD2_TINY_UNET, "text_encoder": SD2_TINY_TEXT, "scheduler": SD21_BASE_SCHEDULER},
    "sd2_v": {"vae": "tiny", "unet": {**SD2_TINY_UNET, "sample_size": 12, "upcast_attention": True},
              "text_encoder": SD2_TINY_TEXT, "scheduler": SD21_V_SCHEDULER},
    # Full size (~1.24B parameters with our small vocabulary): 2.1's UNet (865,910,724), text tower, VAE (SD1.5's).
    "sd21": {"vae": "sd15", "unet": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                                      "cross_attention_dim": 1024, "sample_size": 96,
                                      "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
                                      "upcast_attention": True},
             "text_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_layers": 23, "num_heads": 16,
                              "hidden_act": "gelu"},
             "scheduler": SD21_V_SCHEDULER},
}
SD2_PAD_TOKEN = "!"
PRESETS = ("tiny", "vae_realistic", "sd15", *SD2_PRESETS)


def build_sd2_components(spec: dict, vocab_size: int) -> tuple:
    """(vae, text_encoder, unet) of an SD2_PRESETS entry."""
    vae = build_sd15_vae() if spec["vae"] == "sd15" else build_vae()
    return vae, build_text_encoder(vocab_size, **spec["text_encoder"]), build_sd_unet(**spec["unet"])


def build_preset_tokenizer(preset: str) -> CLIPTokenizer:
    """The byte-level tokenizer, padding as the preset's model does ("!" for SD 2.x, the end token otherwise)."""
    return build_tokenizer(SD2_PAD_TOKEN) if preset in SD2_PRESETS else build_tokenizer()


def build_preset_scheduler(preset: str):
    """The preset's scheduler: SD 2.x's own class and prediction type, else the DDPM scheduler."""
    if preset not in SD2_PRESETS:
        return build_scheduler()
    import diffusers

    class_name, config = SD2_PRESETS[preset]["scheduler"]
    return getattr(diffusers, class_name)(**config)


def build_tiny_pipeline(seed: int = 0, preset: str = "tiny") -> StableDiffusionPipeline:
    """Assemble a random pipeline of the preset (tiny by default), deterministically for a given seed."""
    torch.manual_seed(seed)
    tokenizer = build_preset_tokenizer(preset)
    vae, text_encoder, unet = build_components(preset, len(tokenizer))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=build_preset_scheduler(preset), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
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
                        help="tiny (tests), vae_realistic (SD1.5's VAE + a small UNet, for CPU benchmarks), sd15 "
                             "(SD1.5-shaped UNet, VAE and text encoder; ~1.1B parameters), sd2 / sd2_v (tiny, shaped "
                             "like SD 2.1-base / the 768 v-prediction SD 2.1) or sd21 (SD 2.1-sized; ~1.24B) "
                             "(default tiny)")
    parser.add_argument("--fit_data", metavar="DATA_DIR",
                        help="then fit the random VAE and text encoder to DATA_DIR (format.py's output), as "
                             "stand_in.vae_fit and stand_in.text_fit do, so a fine-tune can learn in minutes")
    parser.add_argument("--fit_resolution", type=int, default=16,
                        help="image side the VAE is fitted at, whole images (default 16)")
    parser.add_argument("--vae_steps", type=int, default=200, help="VAE fitting steps (default 200)")
    parser.add_argument("--text_steps", type=int, default=150, help="text-encoder fitting steps (default 150)")
    args = parser.parse_args(argv)
    quiet_loading_bars()
    out = save_tiny_pipeline(args.output_dir, args.seed, args.preset)
    print(out)
    if args.fit_data:
        fit_to_data(out, args.fit_data, args.fit_resolution, args.vae_steps, args.text_steps, args.seed)
    return 0


def silence_cross_attention(unet) -> None:
    """Zero the output projection of every cross-attention, so the UNet's output does not depend on the text (yet).

    A random UNet reading a fitted text encoder passes the captions' image-matched states through random maps, and
    its images then differ by caption by accident; with these zeroed, the base draws the same distribution for every
    caption, and fine-tuning (whose gradients reach the zeroed weights) has to learn the link."""
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def fit_to_data(model_dir: Path, data_dir: str, resolution: int, vae_steps: int, text_steps: int, seed: int) -> None:
    """Fit the saved pipeline's VAE and text encoder to the data, in this process (one start-up, not three), and
    silence its UNet's cross-attention so the base does not follow captions by accident."""
    from stand_in import text_fit, vae_fit
    from stand_in.fitting import replace_component

    vae_fit.main([str(model_dir), data_dir, "--resolution", str(resolution), "--crop", str(resolution),
                  "--steps", str(vae_steps), "--seed", str(seed)])
    text_fit.main([str(model_dir), data_dir, "--steps", str(text_steps), "--seed", str(seed)])
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    silence_cross_attention(unet)
    replace_component(unet, Path(model_dir), "unet")


if __name__ == "__main__":
    run_main(main)
