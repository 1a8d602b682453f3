"""Feed the metrics: real images (first, streamed) and generated images with their captions, in batches."""

from pathlib import Path
from typing import List, Sequence, Tuple

from PIL import Image
from tqdm.auto import tqdm

from utils.image_errors import ImageRejected
from evaluation.data import BadRow, EvalRow, real_image
from evaluation.generation import image_path
from evaluation.metrics import to_uint8_batch


def chunks(items: Sequence, size: int) -> List[Sequence]:
    """Consecutive slices of at most size items."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def add_real_images(rows: Sequence[EvalRow], fid, resolution: int, batch_size: int, keep: int,
                    device) -> Tuple[List[EvalRow], List[BadRow], list]:
    """Decode real images into FID's real side; return usable rows, rejected rows and the first `keep` images."""
    good, bad, kept = [], [], []
    for chunk in tqdm(chunks(rows, batch_size), desc="real images", unit="batch"):
        images = []
        for row in chunk:
            try:
                image = real_image(row, resolution)
            except ImageRejected as err:
                bad.append(BadRow(row.number, err.reason, err.detail))
                continue
            good.append(row)
            images.append(image)
            if len(kept) < keep:
                kept.append(image)
        if images:
            fid.update(to_uint8_batch(images).to(device), real=True)
    return good, bad, kept


def load_generated(path: Path, resolution: int) -> Image.Image:
    """A generated image as RGB at the evaluation resolution (it already is, unless the model ignored the size)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return rgb if rgb.size == (resolution, resolution) else rgb.resize((resolution, resolution), Image.BICUBIC)


def add_generated_images(rows: Sequence[EvalRow], generated_dir: Path, fid, clip_score, resolution: int,
                         batch_size: int, device) -> None:
    """Generated images into FID's generated side, and with their captions into CLIP score."""
    for chunk in tqdm(chunks(rows, batch_size), desc="generated images", unit="batch"):
        batch = to_uint8_batch([load_generated(image_path(generated_dir, row), resolution) for row in chunk]).to(device)
        fid.update(batch, real=False)
        clip_score.update(batch, [row.caption for row in chunk])
