"""What evaluate.py writes besides the images: eval_report.json and an HTML sheet of real vs generated pairs."""

import html
from pathlib import Path
from typing import Optional, Sequence

from utils.atomic import open_text_atomic
from utils.bad_rows import bad_rows_document
from utils.grids import upscale_factor
from evaluation.data import BadRow, EvalRow
from evaluation.generation import GENERATED_DIRNAME, image_path, save_png
from evaluation.metrics import CLIP_SCORE_DEFINITION as CLIP_SCORE
from evaluation.metrics import FID_RESIZE as FID_INPUT
from evaluation.gsd import gsd_headline, gsd_notes, sweep_sheet
from evaluation.scene import SCENE_CLASSIFIER, directions_note

REPORT_FILENAME = "eval_report.json"
SHEET_FILENAME = "sheet.html"
SHEET_DIRNAME = "sheet"
# Below this many pairs FID is far above its large-N value for the same model (RSICD: about 200 at N=64 against
# about 66 at N=1093), so figures are comparable only at equal N; the standard protocol uses the 1093 test rows.
RELIABLE_FID_N = 1000


def small_n_warning(pairs: int) -> Optional[str]:
    """A warning when N is too small for FID to be compared with published figures, else None."""
    if pairs >= RELIABLE_FID_N:
        return None
    return (f"N={pairs} is small: FID is biased upward at small N (on RSICD about 200 at N=64 vs about 66 at "
            f"N=1093 for the same model); compare only figures computed at the same N")


def scene_headline(scene: dict) -> dict:
    """The scene figures shown beside FID and CLIP score (None when the rows have fewer than two classes)."""
    return {key: scene.get(source) for key, source in (
        ("scene_accuracy", "scene_accuracy"), ("scene_accuracy_real", "scene_accuracy_real"),
        ("scene_accuracy_real_trained", "scene_accuracy_real_trained"), ("chance", "chance"),
        ("num_classes", "num_classes"), ("scene_num_samples", "num_samples"))}


def bad_row_summary(bad: Sequence[BadRow]) -> dict:
    """Every left-out row with its reason, and counts by reason."""
    return bad_rows_document([{"row": row.number, "reason": row.reason, "detail": row.detail} for row in bad])


def shown_size(size) -> str:
    """CSS width and height that show an image of size (w, h) enlarged by an integer factor to be seen."""
    factor = upscale_factor(*size)
    return f"width:{size[0] * factor}px;height:{size[1] * factor}px"


def write_sheet(eval_dir: Path, rows: Sequence[EvalRow], reals: Sequence, title: str,
                controls: Optional[Sequence] = None, gsd: Optional[dict] = None,
                all_rows: Sequence[EvalRow] = ()) -> Path:
    """sheet.html: one row per pair, its caption as the row's label, then the real and the generated image, small
    ones enlarged by an integer factor without smoothing (relative image paths); with controls (a ControlNet's
    conditioning in false colour, one per row), a "conditioning" column before them; then the GSD sweep, if any."""
    sheet_dir = eval_dir / SHEET_DIRNAME
    sheet_dir.mkdir(exist_ok=True)
    lines = ["<!DOCTYPE html>", "<meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>td,th{vertical-align:top;padding:4px;text-align:left} th[scope=row]{font-weight:normal;"
             "max-width:320px} img{image-rendering:pixelated}</style>",
             f"<h1>{html.escape(title)}</h1>", "<table>", "<tr><th>row</th><th>caption</th>"
             + ("<th>conditioning</th>" if controls is not None else "") + "<th>real</th><th>generated</th></tr>"]
    for index, (row, real) in enumerate(zip(rows, reals)):
        real_path = sheet_dir / f"real_{row.number:06d}.png"
        save_png(real, real_path)
        generated = image_path(eval_dir / GENERATED_DIRNAME, row).relative_to(eval_dir).as_posix()
        # Both sides are at --resolution: the real one was cropped and resized to it, the generated one drawn at it.
        style = shown_size(real.size)
        shown = control_cell(eval_dir, sheet_dir, row, controls[index], style) if controls is not None else ""
        lines.append(f"<tr><td>{row.number}</td><th scope='row'>{html.escape(row.caption)}</th>{shown}"
                     f"<td><img src='{real_path.relative_to(eval_dir).as_posix()}' alt='real' style='{style}'></td>"
                     f"<td><img src='{generated}' alt='generated' style='{style}'></td></tr>")
    lines.append("</table>")
    lines += sweep_sheet(eval_dir, gsd, {row.number: row.caption for row in all_rows}, shown_size)
    path = eval_dir / SHEET_FILENAME
    with open_text_atomic(path) as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def control_cell(eval_dir: Path, sheet_dir: Path, row: EvalRow, picture, style: str) -> str:
    """A sheet cell showing a row's conditioning in false colour (saved beside the real images)."""
    path = sheet_dir / f"conditioning_{row.number:06d}.png"
    save_png(picture, path)
    return f"<td><img src='{path.relative_to(eval_dir).as_posix()}' alt='conditioning' style='{style}'></td>"


def build_report(args, *, settings: dict, rows_read: int, pairs: int, bad: Sequence[BadRow], figures: dict,
                 inception: dict, clip: dict, device: str, timings: dict) -> dict:
    """eval_report.json: N and the figures first, then everything needed to reproduce and judge them."""
    stand_in = not inception["matches_standard_name"] or clip["stand_in"]
    warning = small_n_warning(pairs)
    return {
        "num_samples": pairs,
        "fid": figures["fid"],
        "clip_score": figures["clip_score"],
        "clip_cosine": figures["clip_cosine"],
        **scene_headline(figures["scene"]),
        **{key: value for key, value in figures.get("control", {}).items() if key.startswith("control_")},
        **gsd_headline(figures.get("gsd")),
        "stand_in_models": stand_in,
        "warnings": [w for w in (warning, stand_in and "stand-in (random or non-standard) metric models: "
                                 "these figures are not comparable with anything") if w],
        "rows_read": rows_read,
        "num_samples_requested": args.num_samples,
        "bad_rows": bad_row_summary(bad),
        "model": args.model,
        "base_model": args.base_model,
        "weights": args.weights,
        "data": {"data_dir": args.data_dir, "parquet_path": args.parquet_path, "caption_index": args.caption_index,
                 **({"input": args.input, "format": args.format, "split": args.split} if getattr(args, "input", None)
                    else {})},
        "settings": {**settings, "batch_size": args.batch_size, "device": device},
        "fid_details": {"inception_weights": inception, "feature_dim": 2048, "real_images":
                        f"centre-cropped and resized to {args.resolution}x{args.resolution} (Pillow Lanczos)",
                        "generated_images": f"generated at {args.resolution}x{args.resolution}",
                        "inception_input": FID_INPUT},
        "clip_details": {"clip_model": clip, "clip_score": CLIP_SCORE,
                         "clip_cosine": "mean cosine(image, caption), unclamped"},
        "scene_details": {**figures["scene"], "classifier": SCENE_CLASSIFIER, "directions": directions_note()},
        **({"gsd_details": {**figures["gsd"], "notes": gsd_notes()}} if figures.get("gsd") else {}),
        "timings_s": timings,
    }
