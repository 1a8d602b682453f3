"""Generate a small Parquet file in the exact RSICD schema, from procedurally drawn aerial-like scenes.

Each row is a 224x224 JPEG of one scene class (farmland, river, pond, residential, bareland: each looks
different), named RSICD-style by its class (`rsicd_images/pond_3.jpg`), with five captions that name the class
and say what is drawn, carrying RSICD's quirks: a repeated sentence that differs only in case and punctuation, and one
junk caption (" ."). Deterministic from the seed.

With --masks, each row is instead a scene drawn from a random class layout (bare land, fields, water, buildings,
road), with its class map in a `mask` column ({bytes, path}: an 8-bit PNG of class indices, LAYOUT_CLASSES) for
ControlNet training: create.py --conditioning_column mask --conditioning_type mask.

With --gsd_levels L (> 1), each class is also drawn at L ground sample distances, 1, 2, 4, ... times
SAMPLE_GSD metres per pixel, in turn (row i: class i mod 5, level (i div 5) mod L), as a coarser sensor sees more
ground in the same pixels: at 2^k times the GSD the scene, drawn as usual, covers the centre 1/2^k of each side and
the dark woods around it fill the rest (shrunk back to 224 px by area averaging). The captions do not change with
the GSD; it is in a `gsd` column for create.py --metadata_columns gsd=gsd.

Run: python diffusion_model/sample_data.py --output data/sample/rsicd_sample.parquet --num_rows 64 [--masks]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import io
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from utils.cli import ArgumentParser, UsageError, run_main
from utils.constants import IMAGE_EXTENSION, IMAGES_DIRNAME, TMP_SUFFIX
from utils.logger import get_logger, setup_logging

SAMPLE_SIZE = 224
SAMPLE_JPEG_QUALITY = 75
JUNK_CAPTION = " ."
SCENES = ("farmland", "river", "pond", "residential", "bareland")
FIELD_COLOURS = ((74, 120, 52), (92, 140, 60), (60, 100, 40), (96, 124, 48))
WATER_COLOUR = (40, 70, 95)
ROAD_COLOUR = (150, 150, 145)
ROOF_COLOURS = ((170, 80, 60), (200, 200, 195), (90, 90, 100))
BARE_COLOUR = (196, 172, 128)
GRASS_COLOUR = (120, 160, 90)
URBAN_COLOUR = (120, 118, 115)
WOODS_COLOUR = (34, 58, 36)

RSICD_SCHEMA = pa.schema(
    [
        ("filename", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ]
)
MASK_SCHEMA = RSICD_SCHEMA.append(pa.field("mask", pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
# Class index -> (caption words, colour) of the layout scenes; class 0 is the ground everything else lies on.
# Metres per pixel of a plain 224 px sample scene; --gsd_levels draws coarser ones at 2, 4, ... times it.
SAMPLE_GSD = 1.0
# The coarsest level's view is 2^(levels - 1) x 224 px wide before shrinking; at level 5 the scene is 14 px wide.
MAX_GSD_LEVELS = 5
GSD_SCHEMA = RSICD_SCHEMA.append(pa.field("gsd", pa.float64()))
LAYOUT_CLASSES = (("bare land", BARE_COLOUR), ("green fields", FIELD_COLOURS[0]), ("water", WATER_COLOUR),
                  ("buildings", ROOF_COLOURS[0]), ("a road", ROAD_COLOUR))


def draw_fields(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """Tile the ground with rectangular fields of varied crop colours."""
    xs = np.sort(np.concatenate([[0, SAMPLE_SIZE], rng.integers(20, SAMPLE_SIZE - 20, 2)]))
    ys = np.sort(np.concatenate([[0, SAMPLE_SIZE], rng.integers(20, SAMPLE_SIZE - 20, 2)]))
    for x0, x1 in zip(xs[:-1], xs[1:]):
        for y0, y1 in zip(ys[:-1], ys[1:]):
            colour = FIELD_COLOURS[rng.integers(len(FIELD_COLOURS))]
            draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=colour)


def draw_river(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """Draw a wide meandering river from the top edge to the bottom edge."""
    ys = np.linspace(-10, SAMPLE_SIZE + 10, 8)
    xs = SAMPLE_SIZE / 2 + np.cumsum(rng.normal(0, 12, len(ys)))
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=WATER_COLOUR, width=int(rng.integers(40, 60)), joint="curve")


def draw_road(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """Draw a straight road across the scene."""
    y0, y1 = (int(v) for v in rng.integers(0, SAMPLE_SIZE, 2))
    draw.line([(0, y0), (SAMPLE_SIZE, y1)], fill=ROAD_COLOUR, width=8)


def draw_ponds(draw: ImageDraw.ImageDraw, rng: np.random.Generator, count: int) -> None:
    """Draw a few large dark oval ponds."""
    for _ in range(count):
        cx, cy = (int(v) for v in rng.integers(40, SAMPLE_SIZE - 40, 2))
        rx, ry = (int(v) for v in rng.integers(25, 45, 2))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=WATER_COLOUR)


def draw_buildings(draw: ImageDraw.ImageDraw, rng: np.random.Generator, count: int) -> None:
    """Draw many small rectangular roofs."""
    for _ in range(count):
        x, y = (int(v) for v in rng.integers(0, SAMPLE_SIZE - 16, 2))
        w, h = (int(v) for v in rng.integers(10, 22, 2))
        draw.rectangle([x, y, x + w, y + h], fill=ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))])


def draw_scene(scene: str, rng: np.random.Generator) -> tuple:
    """Draw one scene; return the RGB image and the things drawn, in caption words, the scene's own thing first.

    Each class looks different at a glance (and at 32 px): farmland is green fields, a river is a wide band of
    water through fields, ponds are large water ovals on grass, residential is a grey ground packed with roofs and
    bare land is plain sand, so a tiny model can learn which caption goes with which look.
    """
    background = {"residential": URBAN_COLOUR, "pond": GRASS_COLOUR}.get(scene, BARE_COLOUR)
    image = Image.new("RGB", (SAMPLE_SIZE, SAMPLE_SIZE), background)
    draw = ImageDraw.Draw(image)
    things = []
    if scene in ("farmland", "river"):
        draw_fields(draw, rng)
    if scene == "farmland":
        things.append("green fields")
    if scene == "river":
        draw_river(draw, rng)
        things += ["a wide winding river", "green fields"]
    if scene == "pond":
        draw_ponds(draw, rng, int(rng.integers(2, 4)))
        things.append("several large dark ponds")
    if scene == "residential":
        draw_buildings(draw, rng, int(rng.integers(60, 90)))
        things.append("many dense buildings")
    if scene == "bareland":
        things.append("some bare sandy land")
    if scene in ("bareland", "residential") or rng.random() < 0.5:
        draw_road(draw, rng)
        things.append("a straight road")
    return add_texture(image, rng), things


def add_texture(image: Image.Image, rng: np.random.Generator, size: int = SAMPLE_SIZE) -> Image.Image:
    """Add mild per-pixel noise so the JPEG looks like a photo rather than flat colour."""
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 1), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def describe(scene: str, things: list, rng: np.random.Generator) -> list:
    """Five RSICD-like captions for the drawn things: three sentences, a case/punctuation repeat, one junk."""
    whole = " and ".join(things)
    sentences = [
        f"an aerial view of {whole} .",
        f"this is a {scene} scene with {whole} .",
        f"{things[0]} can be seen in this {scene} area .",
    ]
    repeat = sentences[0][0].upper() + sentences[0][1:-2] + "."
    captions = sentences + [repeat]
    captions.insert(int(rng.integers(0, len(captions) + 1)), JUNK_CAPTION)
    return captions


def encode_jpeg(image: Image.Image) -> bytes:
    """Encode the scene as RSICD does: JPEG in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=SAMPLE_JPEG_QUALITY)
    return buffer.getvalue()


def draw_zoomed_out(scene: str, rng: np.random.Generator, scale: int) -> tuple:
    """A scene seen at scale times the GSD: the scene, drawn as usual, now covers the centre 1/scale of each side of
    a wider view whose rest is the woods around it, shrunk back to SAMPLE_SIZE by area averaging."""
    side = SAMPLE_SIZE * scale
    canvas = add_texture(Image.new("RGB", (side, side), WOODS_COLOUR), rng, side)
    image, things = draw_scene(scene, rng)
    corner = (side - SAMPLE_SIZE) // 2
    canvas.paste(image, (corner, corner))
    return canvas.resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.Resampling.BOX), things


def gsd_scale(index: int, gsd_levels: int) -> int:
    """How many times SAMPLE_GSD row index is drawn at: 2^level, the level taking turns after each class's turn."""
    return 2 ** ((index // len(SCENES)) % gsd_levels)


def make_sample_row(index: int, seed: int, gsd_levels: int = 1) -> dict:
    """One RSICD row, drawn from an RNG seeded by (seed, index) so any row can be regenerated alone; with
    gsd_levels > 1, drawn at its level's GSD, given in a `gsd` column."""
    rng = np.random.default_rng([seed, index])
    # Classes take turns, so any run of len(SCENES) rows holds each once: held-out sets are balanced, chance is
    # 1/len(SCENES).
    scene = SCENES[index % len(SCENES)]
    scale = gsd_scale(index, gsd_levels)
    image, things = draw_scene(scene, rng) if gsd_levels == 1 else draw_zoomed_out(scene, rng, scale)
    return {
        "filename": f"{IMAGES_DIRNAME}/{scene}_{index + 1}{IMAGE_EXTENSION}",
        "captions": describe(scene, things, rng),
        "image": {"bytes": encode_jpeg(image), "path": None},
        **({"gsd": SAMPLE_GSD * scale} if gsd_levels > 1 else {}),
    }


def draw_layout(rng: np.random.Generator) -> np.ndarray:
    """A random class layout: a few rectangles and ovals of fields, water and buildings on bare land, maybe a road."""
    mask = Image.new("L", (SAMPLE_SIZE, SAMPLE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, SAMPLE_SIZE - 48, 2))
        x1, y1 = x0 + int(rng.integers(40, 120)), y0 + int(rng.integers(40, 120))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([x0, y0, x1, y1], fill=int(rng.integers(1, 4)))
    if rng.random() < 0.5:
        y0, y1 = (int(v) for v in rng.integers(0, SAMPLE_SIZE, 2))
        draw.line([(0, y0), (SAMPLE_SIZE, y1)], fill=4, width=10)
    return np.asarray(mask)


def make_layout_row(index: int, seed: int) -> dict:
    """One scene drawn from a random class layout, its captions naming the classes by area, and its class mask."""
    rng = np.random.default_rng([seed, index, 1])
    mask = draw_layout(rng)
    colours = np.array([colour for _, colour in LAYOUT_CLASSES], np.uint8)
    image = add_texture(Image.fromarray(colours[mask]), rng)
    areas = np.bincount(mask.ravel(), minlength=len(LAYOUT_CLASSES))
    things = [LAYOUT_CLASSES[c][0] for c in np.argsort(-areas, kind="stable") if areas[c]]
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return {"filename": f"{IMAGES_DIRNAME}/layout_{index + 1}{IMAGE_EXTENSION}",
            "captions": describe("land cover", things, rng), "image": {"bytes": encode_jpeg(image), "path": None},
            "mask": {"bytes": buffer.getvalue(), "path": None}}


def make_sample_parquet(path, num_rows: int, seed: int = 0, row_group_size: int = 32, masks: bool = False,
                        gsd_levels: int = 1) -> Path:
    """Write num_rows sample rows to path (atomically) in the RSICD schema (with masks: layout scenes and their
    `mask` column; with gsd_levels > 1: scenes at several GSDs and their `gsd` column); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + TMP_SUFFIX)
    if masks:
        schema, make_row = MASK_SCHEMA, make_layout_row
    elif gsd_levels > 1:
        schema, make_row = GSD_SCHEMA, lambda index, row_seed: make_sample_row(index, row_seed, gsd_levels)
    else:
        schema, make_row = RSICD_SCHEMA, make_sample_row
    with pq.ParquetWriter(tmp_path, schema) as writer:
        for start in range(0, num_rows, row_group_size):
            rows = [make_row(i, seed) for i in range(start, min(start + row_group_size, num_rows))]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=row_group_size)
    tmp_path.replace(path)
    return path


def parse_args(argv: Optional[Sequence[str]]):
    """Command line: output file, row count, seed, row-group size."""
    parser = ArgumentParser(description="Write a small RSICD-schema Parquet of procedurally drawn aerial scenes.")
    parser.add_argument("--output", required=True, help="Parquet file to write.")
    parser.add_argument("--num_rows", type=int, default=64, help="Number of rows (default 64).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed gives the same file.")
    parser.add_argument("--row_group_size", type=int, default=32, help="Rows per Parquet row group (default 32).")
    parser.add_argument("--masks", action="store_true",
                        help="Draw scenes from random class layouts and add their class masks in a `mask` column.")
    parser.add_argument("--gsd_levels", type=int, default=1,
                        help=f"Draw each class at this many ground sample distances ({SAMPLE_GSD:g} m per pixel, "
                             "then 2x, 4x, ...), in a `gsd` column (default 1: one scale, no column).")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Generate the sample Parquet file."""
    setup_logging()
    args = parse_args(argv)
    if args.num_rows < 1:
        raise UsageError(f"--num_rows must be at least 1, got {args.num_rows}")
    if args.row_group_size < 1:
        raise UsageError(f"--row_group_size must be at least 1, got {args.row_group_size}")
    if not 1 <= args.gsd_levels <= MAX_GSD_LEVELS:
        raise UsageError(f"--gsd_levels must be between 1 and {MAX_GSD_LEVELS}, got {args.gsd_levels}")
    if args.gsd_levels > 1 and args.masks:
        raise UsageError("--gsd_levels and --masks do not go together (layout scenes have one scale)")
    path = make_sample_parquet(args.output, args.num_rows, args.seed, args.row_group_size, args.masks,
                               args.gsd_levels)
    get_logger().info("wrote %d sample rows to %s", args.num_rows, path)
    return 0


if __name__ == "__main__":
    run_main(main)
