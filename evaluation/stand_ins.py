"""Random stand-ins for the evaluation models, so evaluate.py runs offline (tests, the demo).

Writes OUT_DIR/inception_random.pth, a randomly initialised FID InceptionV3 state dict in the same format as the
standard weights (loaded by the same code path), and OUT_DIR/clip_tiny/, a tiny random CLIP model with a processor.
Figures computed with them mean nothing; evaluate.py marks its report so ("stand_in_models": true).
Run: python -m evaluation.stand_ins OUT_DIR [--seed 0]
"""

import io
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from evaluation.fidelity_compat import register_torch_fidelity
from evaluation.metrics import STAND_IN_MARKER
from stand_in.tiny_model import build_tokenizer
from utils.cli import ArgumentParser, UsageError, run_main
from utils.quiet import quiet_loading_bars

register_torch_fidelity()
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402

INCEPTION_FILENAME = "inception_random.pth"
CLIP_DIRNAME = "clip_tiny"
CLIP_IMAGE_SIZE = 32
# Byte-level tokens: one per character, so the text side must fit long captions whole.
CLIP_TEXT_POSITIONS = 256
CALIBRATION_IMAGES = 4
# The standard Inception's pool features average about this on natural images; scaled to it, the stand-in's FID
# lands in the range real FIDs do (tens to hundreds) instead of ~1e5, which would read as a bug.
POOL_FEATURE_MEAN = 0.4
# Mixed_7c's last conv of each branch: their outputs are concatenated and averaged into the pool features.
FINAL_BRANCHES = ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")


class _RandomInception(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 that keeps its random initialisation instead of loading weights."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Ignore the (empty) state dict the constructor insists on loading."""
        return None


def random_inception_state(seed: int) -> dict:
    """A random FID Inception state dict whose batch-norm statistics are calibrated on noise images.

    With default statistics (mean 0, variance 1) random layers shrink activations to nothing and every image gets
    the same features; one pass over noise in training mode gives each layer unit-scale outputs instead.
    """
    torch.manual_seed(seed)
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    model = _RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics exactly
    model.train()
    images = calibration_images()
    with torch.no_grad():
        model(images)
        model.eval()
        scale = POOL_FEATURE_MEAN / float(model(images)[0].mean())
    state = model.state_dict()
    for branch in FINAL_BRANCHES:  # ReLU(s * BN(x)) = s * ReLU(BN(x)): the pool features scale by s
        for kind in ("weight", "bias"):
            state[f"Mixed_7c.{branch}.bn.{kind}"] *= scale
    return state


def calibration_images() -> torch.Tensor:
    """Pixel noise and smooth colour fields (noise upsampled), so both kinds of input get unit-scale activations."""
    noise = torch.randint(0, 256, (CALIBRATION_IMAGES, 3, 299, 299), dtype=torch.uint8)
    coarse = torch.randint(0, 256, (CALIBRATION_IMAGES, 3, 8, 8)).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(299, 299), mode="bilinear").round().to(torch.uint8)
    return torch.cat([noise, smooth])


def tiny_clip(seed: int):
    """A tiny random CLIP model and a processor with the project's byte-level tokenizer."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = CLIP_TEXT_POSITIONS
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CLIP_TEXT_POSITIONS,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=CLIP_IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                         crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def write_stand_ins(out_dir: Path, seed: int = 0) -> dict:
    """Write both stand-ins under out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inception = out_dir / INCEPTION_FILENAME
    tmp = inception.with_name(inception.name + ".tmp")
    torch.save(random_inception_state(seed), tmp)
    tmp.replace(inception)
    clip_dir = out_dir / CLIP_DIRNAME
    model, processor = tiny_clip(seed)
    model.save_pretrained(clip_dir)
    processor.save_pretrained(clip_dir)
    (clip_dir / STAND_IN_MARKER).write_text("Randomly initialised CLIP for offline runs: its scores mean nothing.\n")
    return {"inception_weights": inception, "clip_model": clip_dir}


def main(argv=None) -> int:
    """CLI: write the stand-ins and print their paths."""
    parser = ArgumentParser(prog="python -m evaluation.stand_ins", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="folder to write inception_random.pth and clip_tiny/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output_dir {out} exists and is not a folder")
    quiet_loading_bars()
    for name, path in write_stand_ins(out, args.seed).items():
        print(f"--{name} {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
