"""Labelled picture grids a person can see: each small tile enlarged by an integer factor with nearest neighbour (every
pixel a sharp square of its exact colour), row labels (prompts) at the left, column labels (steps, images) above."""

import math
from typing import List, NamedTuple, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from utils.constants import MIN_TILE_SIDE

LABEL_FONT_SIZE = 14
# Row labels wrap within this width; a shorter label set makes the margin narrower.
MAX_ROW_LABEL_WIDTH = 200
# White space around and between tiles and labels, in pixels.
PAD = 6
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
ELLIPSIS = "..."


def upscale_factor(width: int, height: int, minimum: int = MIN_TILE_SIDE) -> int:
    """The smallest integer factor that brings the short side to at least minimum (1 when it already is)."""
    return max(1, math.ceil(minimum / min(width, height)))


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """image enlarged factor times with nearest neighbour, so each pixel becomes a factor x factor square."""
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def label_font(size: int = LABEL_FONT_SIZE):
    """Pillow's own font at size, or its fixed bitmap font where this Pillow cannot size it (before 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def printable(text: str, font) -> str:
    """text with what a bitmap font cannot draw (anything outside Latin-1) replaced by '?'."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def line_height(font) -> int:
    """Pixels from one line of text to the next."""
    return font.getbbox("Ag|")[3] + 2


def clip(text: str, font, width: float, cut: bool = False) -> str:
    """text when it fits in width and cut is False, else its longest prefix that fits followed by '...'."""
    if not cut and font.getlength(text) <= width:
        return text
    while text and font.getlength(text.rstrip() + ELLIPSIS) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def fit_lines(text: str, font, width: float, max_lines: int) -> List[str]:
    """text wrapped at spaces into at most max_lines lines no wider than width; what is left out ends in '...'."""
    lines: List[str] = []
    for word in printable(text, font).split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    kept = lines[:max(1, max_lines)]
    return [clip(line, font, width, cut=index == len(kept) - 1 and len(lines) > len(kept))
            for index, line in enumerate(kept)]


class Layout(NamedTuple):
    """Where a grid's parts go: the first tile's corner (left, top), the cell size and the whole picture's size."""
    left: int
    top: int
    cell: Tuple[int, int]
    size: Tuple[int, int]

    def origin(self, row: int, column: int) -> Tuple[int, int]:
        """Top-left corner of the tile in row, column."""
        return self.left + column * (self.cell[0] + PAD), self.top + row * (self.cell[1] + PAD)


def grid_layout(cell: Tuple[int, int], rows: int, columns: int, label_width: int, header_height: int) -> Layout:
    """Row labels (label_width, 0 for none) then the columns; column labels (header_height, 0 for none) on top."""
    left = PAD + (label_width + PAD if label_width else 0)
    top = PAD + (header_height + PAD if header_height else 0)
    return Layout(left, top, cell, (left + columns * (cell[0] + PAD), top + rows * (cell[1] + PAD)))


def row_label_width(labels: Sequence[str], font) -> int:
    """The widest label's width, capped at MAX_ROW_LABEL_WIDTH (longer labels wrap); 0 without labels."""
    widths = [font.getlength(printable(label, font)) for label in labels if label]
    return min(MAX_ROW_LABEL_WIDTH, math.ceil(max(widths))) if widths else 0


def draw_row_labels(draw: ImageDraw.ImageDraw, layout: Layout, labels: Sequence[str], width: int, font) -> None:
    """Each row's label at its left, wrapped to width and cut to the lines that fit beside the tile."""
    step = line_height(font)
    for row, label in enumerate(labels):
        _, y = layout.origin(row, 0)
        for index, line in enumerate(fit_lines(label, font, width, layout.cell[1] // step)):
            draw.text((PAD, y + index * step), line, fill=TEXT_COLOUR, font=font)


def draw_column_labels(draw: ImageDraw.ImageDraw, layout: Layout, labels: Sequence[str], font) -> None:
    """Each column's label centred above it on one line, cut to the column's width."""
    for column, label in enumerate(labels):
        x, _ = layout.origin(0, column)
        line = clip(printable(label, font), font, layout.cell[0])
        draw.text((x + (layout.cell[0] - font.getlength(line)) / 2, PAD), line, fill=TEXT_COLOUR, font=font)


def enlarged_rows(rows: Sequence[Sequence[Image.Image]]) -> List[List[Image.Image]]:
    """Every tile in RGB, upscaled by its own factor to at least MIN_TILE_SIDE on its short side."""
    return [[upscale(tile.convert("RGB"), upscale_factor(*tile.size)) for tile in row] for row in rows]


def labelled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (),
                  column_labels: Sequence[str] = ()) -> Image.Image:
    """Tiles row by row on white, each enlarged to be seen, row labels at the left and column labels above in black;
    a row shorter than the longest leaves its last cells white."""
    font = label_font()
    tiles = enlarged_rows(rows)
    cell = (max(t.width for row in tiles for t in row), max(t.height for row in tiles for t in row))
    label_width = row_label_width(row_labels, font)
    header = line_height(font) if any(column_labels) else 0
    layout = grid_layout(cell, len(tiles), max(len(row) for row in tiles), label_width, header)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    for row, row_tiles in enumerate(tiles):
        for column, tile in enumerate(row_tiles):
            sheet.paste(tile, layout.origin(row, column))
    draw = ImageDraw.Draw(sheet)
    draw_row_labels(draw, layout, row_labels, label_width, font)
    draw_column_labels(draw, layout, column_labels, font)
    return sheet
