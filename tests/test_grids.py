"""utils/grids.py: the tile-size rule, nearest-neighbour enlargement, label fitting and the labelled grid's layout."""

import numpy as np
import pytest
from PIL import Image, ImageFont

from utils import grids as G
from utils.constants import MIN_TILE_SIDE

DARK = 100  # a channel below this counts as drawn text on the white margins


def random_tile(width: int, height: int, seed: int) -> Image.Image:
    """A tile of random colours, so any blur or shift changes some pixel."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def enlarged(tile: Image.Image, factor: int) -> np.ndarray:
    """What a nearest-neighbour enlargement must be: each pixel repeated factor times both ways."""
    return np.asarray(tile).repeat(factor, axis=0).repeat(factor, axis=1)


def is_dark(region: np.ndarray) -> bool:
    """Whether some pixel of region is text-dark."""
    return bool((region.max(axis=-1) < DARK).any())


@pytest.mark.parametrize("size, factor", [
    ((16, 16), 8), ((100, 100), 2), ((512, 512), 1), ((128, 128), 1), ((127, 127), 2), ((64, 64), 2),
    ((48, 32), 4), ((200, 64), 2), ((1, 1), 128),
])
def test_factor_brings_the_short_side_to_at_least_128(size, factor):
    assert G.upscale_factor(*size) == factor
    assert min(size) * factor >= MIN_TILE_SIDE == 128
    assert factor == 1 or min(size) * (factor - 1) < MIN_TILE_SIDE  # the smallest such factor


def test_nearest_neighbour_keeps_every_pixel_value():
    tile = random_tile(16, 16, 0)
    big = G.upscale(tile, 8)
    assert big.size == (128, 128)
    assert np.array_equal(np.asarray(big), enlarged(tile, 8))
    colours = {tuple(c) for c in np.asarray(tile).reshape(-1, 3)}
    assert {tuple(c) for c in np.asarray(big).reshape(-1, 3)} == colours


def test_factor_one_returns_the_image_untouched():
    tile = random_tile(512, 512, 1)
    assert G.upscale(tile, 1) is tile


def test_fit_lines_wraps_within_the_width_and_marks_what_is_cut():
    font = G.label_font()
    text = "an aerial view of many dense buildings and a straight road beside some bare sandy land"
    lines = G.fit_lines(text, font, 100, 2)
    assert len(lines) == 2 and all(font.getlength(line) <= 100 for line in lines)
    assert lines[-1].endswith(G.ELLIPSIS) and not lines[0].endswith(G.ELLIPSIS)
    assert " ".join(G.fit_lines(text, font, 100, 50)) == text  # room enough: every word, in order, nothing cut
    assert G.fit_lines("fields", font, 100, 3) == ["fields"]
    word = G.fit_lines("x" * 200, font, 60, 3)
    assert len(word) == 1 and word[0].endswith(G.ELLIPSIS) and font.getlength(word[0]) <= 60


def test_bitmap_font_is_the_fallback_and_draws_any_text(monkeypatch):
    """A Pillow whose load_default takes no size gives the bitmap font, which cannot encode non-Latin-1 text."""
    bitmap = ImageFont.load_default_imagefont()

    def sizeless_load_default():
        """load_default before Pillow 10.1: no size argument."""
        return bitmap

    monkeypatch.setattr(G.ImageFont, "load_default", sizeless_load_default)
    assert G.label_font() is bitmap
    assert G.printable("农田 farmland é", bitmap) == "?? farmland é"
    sheet = G.labelled_grid([[random_tile(16, 16, 2)]], ["农田 farmland"], ["步骤 1"])
    assert is_dark(np.asarray(sheet)[:, :G.PAD + 20])


def layout_of(tile_side: int, rows: int, columns: int, row_labels, column_labels):
    """Where the tiles must be, computed here from the documented rule, not from grid_layout."""
    font = G.label_font()
    label_width = G.row_label_width(row_labels, font)
    left = G.PAD + label_width + G.PAD if label_width else G.PAD
    top = G.PAD + G.line_height(font) + G.PAD if column_labels else G.PAD
    size = (left + columns * (tile_side + G.PAD), top + rows * (tile_side + G.PAD))
    return left, top, size


def test_grid_layout_puts_each_enlarged_tile_exactly_in_its_cell():
    tiles = [[random_tile(16, 16, 10 * r + c) for c in range(3)] for r in range(2)]
    prompts, steps = ["a river", "green fields and a road"], ["base", "step 100", "step 200"]
    sheet = np.asarray(G.labelled_grid(tiles, prompts, steps))
    left, top, (width, height) = layout_of(128, 2, 3, prompts, steps)
    assert sheet.shape == (height, width, 3)
    for r in range(2):
        for c in range(3):
            x, y = left + c * (128 + G.PAD), top + r * (128 + G.PAD)
            assert np.array_equal(sheet[y:y + 128, x:x + 128], enlarged(tiles[r][c], 8)), (r, c)


def test_labels_are_drawn_in_the_margins_and_nowhere_else():
    tiles = [[random_tile(16, 16, 10 * r + c) for c in range(2)] for r in range(2)]
    prompts, steps = ["a river", "green fields"], ["base", "step 4"]
    sheet = np.asarray(G.labelled_grid(tiles, prompts, steps))
    left, top, _ = layout_of(128, 2, 2, prompts, steps)
    for r in range(2):
        y = top + r * (128 + G.PAD)
        assert is_dark(sheet[y:y + 128, :left - G.PAD]), f"row {r} label"
    for c in range(2):
        x = left + c * (128 + G.PAD)
        assert is_dark(sheet[:top - G.PAD, x:x + 128]), f"column {c} label"
    assert (sheet[:G.PAD] == 255).all() and (sheet[top - G.PAD:top] == 255).all()  # text stays in its margin
    assert (sheet[:, left - G.PAD:left] == 255).all() and (sheet[top + 128:top + 128 + G.PAD] == 255).all()


def test_without_labels_there_is_no_margin_and_no_text():
    tiles = [[random_tile(16, 16, 5), random_tile(16, 16, 6)]]
    sheet = np.asarray(G.labelled_grid(tiles))
    assert sheet.shape == (G.PAD + 128 + G.PAD, G.PAD + 2 * (128 + G.PAD), 3)
    sheet = sheet.copy()
    sheet[G.PAD:G.PAD + 128, G.PAD:G.PAD + 128] = 255
    sheet[G.PAD:G.PAD + 128, 2 * G.PAD + 128:2 * G.PAD + 256] = 255
    assert (sheet == 255).all()


def test_a_512_px_tile_stays_native_and_a_short_row_stays_white():
    big = random_tile(512, 512, 7)
    sheet = np.asarray(G.labelled_grid([[big, big], [big]], ["a", "b"], ["image 1", "image 2"]))
    left, top, (width, height) = layout_of(512, 2, 2, ["a", "b"], ["image 1", "image 2"])
    assert sheet.shape == (height, width, 3)
    assert np.array_equal(sheet[top:top + 512, left:left + 512], np.asarray(big))
    y, x = top + 512 + G.PAD, left + 512 + G.PAD
    assert (sheet[y:y + 512, x:x + 512] == 255).all()


def test_non_square_tiles_scale_by_their_short_side():
    tile = random_tile(48, 32, 8)
    sheet = np.asarray(G.labelled_grid([[tile]]))
    assert sheet.shape == (G.PAD + 128 + G.PAD, G.PAD + 192 + G.PAD, 3)
    assert np.array_equal(sheet[G.PAD:G.PAD + 128, G.PAD:G.PAD + 192], enlarged(tile, 4))


def test_long_row_labels_wrap_within_the_capped_margin():
    prompt = "an aerial view of many dense buildings and a straight road ."
    font = G.label_font()
    assert font.getlength(prompt) > G.MAX_ROW_LABEL_WIDTH
    assert G.row_label_width([prompt, "a"], font) == G.MAX_ROW_LABEL_WIDTH
    assert G.row_label_width(["a river"], font) < G.MAX_ROW_LABEL_WIDTH
    assert G.row_label_width([], font) == 0
    sheet = np.asarray(G.labelled_grid([[random_tile(16, 16, 9)]], [prompt]))
    lines = (sheet[G.PAD:G.PAD + 128, :G.PAD + G.MAX_ROW_LABEL_WIDTH].max(axis=-1) < DARK).any(axis=1)
    # Dark rows of pixels in at least two separate bands: the prompt took two lines or more.
    assert np.count_nonzero(np.diff(lines.astype(int)) == 1) + int(lines[0]) >= 2
