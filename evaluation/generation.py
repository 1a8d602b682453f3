"""Generate one image per held-out caption into EVAL_DIR/generated/, resumably.

Row n's image is generated/NNNNNN.png from seed --seed + n - 1 (or --seed itself, with --shared_seed), written to a
temporary name and renamed, so an interrupted run leaves only complete images and a rerun generates just the missing
ones, with the same pixels an uninterrupted run would give. The settings that made the images are kept beside them;
a rerun with other settings is refused rather than mixing two models' images in one figure.
"""

import io
import json
from pathlib import Path
from typing import List, Sequence

from utils.atomic import write_bytes_atomic, write_json_atomic
from evaluation.data import EvalRow
from inference.pipeline import generate
from utils.cli import UsageError

GENERATED_DIRNAME = "generated"
SETTINGS_FILENAME = "generation_settings.json"
IMAGE_DIGITS = 6
PNG_SUFFIX = ".png"


def image_path(generated_dir: Path, row: EvalRow) -> Path:
    """Where row's generated image lives."""
    return generated_dir / f"{row.number:0{IMAGE_DIGITS}d}{PNG_SUFFIX}"


def row_seed(seed: int, row: EvalRow, shared: bool = False) -> int:
    """The seed of row's image: fixed by the row (or one for all rows), not by which rows a run generates."""
    return seed if shared else seed + row.number - 1


def check_settings(generated_dir: Path, settings: dict, overwrite: bool) -> None:
    """Refuse a folder whose images came from other settings, unless overwriting (cheap: runs before any loading)."""
    path = generated_dir / SETTINGS_FILENAME
    if overwrite or not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise UsageError(f"{generated_dir} holds images made with other settings ({', '.join(changed)}); "
                         "use another --output_dir or --overwrite")


def record_settings(generated_dir: Path, settings: dict, overwrite: bool) -> None:
    """Write the settings beside the images (once the model has loaded); with overwrite, drop the old images."""
    generated_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in generated_dir.glob(f"*{PNG_SUFFIX}"):
            old.unlink()
    write_json_atomic(generated_dir / SETTINGS_FILENAME, settings)


def settings_from_args(args, device, dtype) -> dict:
    """What decides a generated image's pixels, besides its row: kept beside the images to guard resumes.

    Device and dtype too: fp16 images from a GPU and fp32 ones from a CPU differ, and must not share one FID.
    """
    source = args.data_dir or args.parquet_path or getattr(args, "input", None)
    return {"model": str(Path(args.model).resolve()), "base_model": args.base_model, "weights": args.weights,
            "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale, "resolution": args.resolution, "seed": args.seed,
            "caption_index": args.caption_index, "data": str(Path(source).resolve()) + input_split(args),
            "device": device.type, "dtype": str(dtype).replace("torch.", ""), "lora_scale": args.lora_scale,
            # only when on, so folders generated before the flag existed still resume
            **({"shared_seed": True} if args.shared_seed else {}),
            **({"controlnet": str(Path(args.controlnet).resolve()),
                "controlnet_conditioning_scale": args.controlnet_conditioning_scale}
               if getattr(args, "controlnet", None) else {})}


def input_split(args) -> str:
    """The split an --input is read at, so a rerun on another split of the same file is refused."""
    return f" (split {args.split or 'default'})" if getattr(args, "input", None) else ""


def missing_rows(rows: Sequence[EvalRow], generated_dir: Path) -> List[EvalRow]:
    """Rows whose image is not on disk yet."""
    return [row for row in rows if not image_path(generated_dir, row).is_file()]


def save_png(image, path: Path) -> None:
    """Write a PIL image as PNG atomically (temporary name, then rename)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def generate_missing(pipeline, rows: Sequence[EvalRow], generated_dir: Path, *, seed: int,
                     num_inference_steps: int, guidance_scale: float, resolution: int, batch_size: int,
                     shared_seed: bool = False, per_image=None) -> int:
    """Generate and save the images of rows (each saved as soon as it is ready); return how many were made.
    per_image(indices into rows) gives the call arguments that differ by row (a ControlNet's control images)."""
    if not rows:
        return 0
    generate(pipeline, [row.caption for row in rows], [row_seed(seed, row, shared_seed) for row in rows],
             negative_prompt=None, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
             height=resolution, width=resolution, batch_size=batch_size, per_image=per_image,
             on_image=lambda index, image: save_png(image, image_path(generated_dir, rows[index])))
    return len(rows)
