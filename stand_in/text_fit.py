"""Fit a tiny pipeline's random text encoder to a folder's captions and images, as CLIP's text tower was trained.

Stable Diffusion fine-tuning keeps the text encoder frozen and relies on it already telling captions apart: CLIP
learnt that by matching captions to their images. A random tiny text encoder gives nearly the same states to every
caption (a shared prefix dominates them), so its UNet has almost nothing to condition on, however long it trains.
This gives the stand-in the same kind of training, briefly: a contrastive (CLIP-style) loss between each caption's
pooled state and a linear projection of its image's pixels, then writes the text encoder back into the pipeline
folder. Real bases never need this: their text encoder is trained.
Run: python -m stand_in.text_fit MODEL_DIR DATA_DIR [--steps 150] [--seed 0]   (DATA_DIR holds metadata.jsonl)
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file rather than with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import time
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

from stand_in.fitting import fit_steps, replace_component
from utils.cli import ArgumentParser, UsageError, check_at_least, run_main
from utils.logger import get_logger, setup_logging

TEXT_ENCODER_SUBFOLDER = "text_encoder"
# Images enter the contrastive loss as their pixels at this side: enough to tell scenes by colour and layout.
IMAGE_FEATURE_SIDE = 8
PROJECTION_DIM = 64
TEMPERATURE = 0.07


def caption_of(record: dict):
    """The record's caption: its text, or the first of a list of texts; None when it has none."""
    text = record.get("text")
    if isinstance(text, list):
        text = next((t for t in text if isinstance(t, str) and t.strip()), None)
    return text if isinstance(text, str) and text.strip() else None


def load_pairs(data_dir: Path) -> Tuple[List[str], torch.Tensor, int]:
    """(captions, image features N x 3*side*side in [-1, 1], records skipped) from DATA_DIR/metadata.jsonl."""
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise UsageError(f"DATA_DIR {data_dir} has no metadata.jsonl (format.py writes it)")
    captions, features, skipped = [], [], 0
    for line in metadata.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            caption, image_path = caption_of(record), data_dir / record["file_name"]
            with Image.open(image_path) as image:
                small = image.convert("RGB").resize((IMAGE_FEATURE_SIDE,) * 2, Image.BOX)
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            skipped += 1  # a broken line or image: the fit uses the rest, and the log says how many
            continue
        if caption is None:
            skipped += 1
            continue
        captions.append(caption)
        features.append(np.asarray(small, dtype=np.float32).ravel() / 127.5 - 1.0)
    if len(captions) < 2:
        raise UsageError(f"DATA_DIR {data_dir}: metadata.jsonl has {len(captions)} usable caption/image pair(s); "
                         f"the contrastive fit needs at least 2")
    return captions, torch.from_numpy(np.stack(features)), skipped


def contrastive_loss(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: each caption should pick its own image out of the batch, and vice versa."""
    text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)
    image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
    logits = text_embeds @ image_embeds.T / TEMPERATURE
    targets = torch.arange(len(logits))
    return (torch.nn.functional.cross_entropy(logits, targets)
            + torch.nn.functional.cross_entropy(logits.T, targets)) / 2


def token_ids(tokenizer, captions: List[str]) -> torch.Tensor:
    """Captions as the pipeline tokenizes them for the UNet: padded to the model's length, truncated."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def fit_text_encoder(text_encoder, tokenizer, captions: List[str], features: torch.Tensor, steps: int,
                     batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0) -> list:
    """Train text_encoder in place (with throwaway projections) on random batches; return each step's loss."""
    generator = torch.Generator().manual_seed(seed)
    width = text_encoder.config.hidden_size
    text_projection = torch.nn.Linear(width, PROJECTION_DIM)
    image_projection = torch.nn.Linear(features.shape[1], PROJECTION_DIM)
    parameters = [*text_encoder.parameters(), *text_projection.parameters(), *image_projection.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    ids = token_ids(tokenizer, captions)

    def step_loss() -> torch.Tensor:
        picks = torch.randperm(len(captions), generator=generator)[:batch_size]
        pooled = text_encoder(ids[picks]).pooler_output
        return contrastive_loss(text_projection(pooled), image_projection(features[picks]))

    return fit_steps(text_encoder, optimizer, step_loss, steps)


@torch.no_grad()
def caption_similarity(text_encoder, tokenizer, captions: List[str]) -> torch.Tensor:
    """Cosine similarity between the captions' whole state sequences (what the UNet's cross-attention reads)."""
    states = text_encoder(token_ids(tokenizer, captions))[0].flatten(1)
    states = torch.nn.functional.normalize(states, dim=-1)
    return states @ states.T


def parse_args(argv=None):
    """Command line: pipeline folder, data folder and schedule."""
    parser = ArgumentParser(prog="python -m stand_in.text_fit", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a saved pipeline folder (python -m stand_in.tiny_model writes one)")
    parser.add_argument("data_dir", help="folder with metadata.jsonl and its images (format.py's output)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument("--batch_size", type=int, default=64, help="caption/image pairs per step (default 64)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches and the projections")
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--batch_size", args.batch_size)):
        check_at_least(flag, value, 1)
    return args


def main(argv=None) -> int:
    """Fit MODEL_DIR's text encoder on DATA_DIR's caption/image pairs and save it back."""
    from transformers import CLIPTextModel, CLIPTokenizer

    args = parse_args(argv)
    setup_logging()
    model_dir, data_dir = Path(args.model_dir), Path(args.data_dir)
    if not (model_dir / TEXT_ENCODER_SUBFOLDER / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {model_dir} has no {TEXT_ENCODER_SUBFOLDER}/config.json (not a saved pipeline)")
    captions, features, skipped = load_pairs(data_dir)
    torch.manual_seed(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder=TEXT_ENCODER_SUBFOLDER)
    started = time.monotonic()
    losses = fit_text_encoder(text_encoder, tokenizer, captions, features, args.steps, args.batch_size,
                              args.learning_rate, args.seed)
    replace_component(text_encoder, model_dir, TEXT_ENCODER_SUBFOLDER)
    get_logger().info("text encoder fitted on %d caption/image pairs (%d skipped) in %.0f s: contrastive loss "
                      "%.3f -> %.3f", len(captions), skipped, time.monotonic() - started, losses[0],
                      float(np.mean(losses[-10:])))
    return 0


if __name__ == "__main__":
    run_main(main)
