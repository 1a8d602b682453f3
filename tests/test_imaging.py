"""The pure image core: decode with its failure reasons, orientation, mode conversion, resize modes, encode."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

import odd_images as odd
from diffusion_model import imaging
from utils.image_errors import REASON_TRUNCATED, ImageRejected
from diffusion_model.imaging import decode, encode, orient, prepare, resize, to_rgb
from utils.constants import ALPHA_BACKGROUND

BIG = 10**8


def pixel(image: Image.Image, x: int, y: int) -> tuple:
    """RGB value at (x, y)."""
    return image.convert("RGB").getpixel((x, y))


def near(actual, expected, tolerance: int = 12) -> bool:
    """Colours equal within JPEG noise."""
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "null_image"),
        (b"", "empty_image"),
        (odd.junk_bytes(), "undecodable"),
        (odd.truncated_jpeg(), "truncated"),
        (odd.save(odd.noisy_rgb(8, 8), "JPEG")[:30], "undecodable"),  # cut in its header: no pixel decoded
        (odd.png_claiming_size(50000, 50000), "too_large"),
        (odd.jpeg_claiming_size(5000, 4000), "too_large"),
    ],
)
def test_decode_failures_have_reasons(data, reason):
    with pytest.raises(ImageRejected) as caught:
        decode(data, max_pixels=10**7)
    assert caught.value.reason == reason


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    data, loaded = odd.jpeg_claiming_size(300, 300), []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self))
    with pytest.raises(ImageRejected, match="too_large"):
        decode(data, max_pixels=300 * 300 - 1)
    assert loaded == [], "an oversized image must be refused from its header alone"


def test_pixel_limit_allows_exact_size():
    assert decode(odd.portrait_jpeg(), max_pixels=40 * 80).size == (40, 80)


def test_exif_orientation_applied():
    image = orient(decode(odd.exif_rotated_jpeg(), BIG))
    assert image.size == (32, 64)
    assert near(pixel(image, 16, 8), (255, 0, 0)) and near(pixel(image, 16, 56), (0, 0, 255))


@pytest.mark.parametrize(
    "maker, left, right",
    [
        (odd.grayscale_jpeg, (100, 100, 100), (100, 100, 100)),
        (odd.cmyk_jpeg, (0, 255, 255), (0, 255, 255)),
        (odd.palette_png, (0, 0, 255), (255, 255, 0)),
        (lambda: odd.palette_png(transparent=True), ALPHA_BACKGROUND, (255, 255, 0)),
        (odd.rgba_png, (255, 0, 0), ALPHA_BACKGROUND),
        (odd.la_png, (200, 200, 200), ALPHA_BACKGROUND),
    ],
)
def test_modes_become_rgb(maker, left, right):
    image = to_rgb(decode(maker(), BIG))
    assert image.mode == "RGB"
    assert near(pixel(image, 4, 24), left, 3) and near(pixel(image, 44, 24), right, 3)


def test_sixteen_bit_is_scaled_not_saturated():
    image = to_rgb(decode(odd.gray16_png(), BIG))
    row = np.asarray(image)[0, :, 0].astype(int)
    assert image.mode == "RGB"
    assert row[0] == 0 and row[-1] == 255
    assert abs(row[32] - 130) <= 2, "the middle of a 0..65535 ramp must land mid-grey, not 255"
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 50


def test_int32_mode_with_16bit_values_is_scaled():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.int32))
    assert image.mode == "I"
    assert pixel(to_rgb(image), 0, 0) == (128, 128, 128)


def test_8bit_values_in_int_mode_are_kept():
    image = Image.fromarray(np.full((4, 4), 77, dtype=np.int32))
    assert pixel(to_rgb(image), 0, 0) == (77, 77, 77)


def test_center_crop_keeps_the_middle_of_a_portrait():
    image = resize(decode(odd.portrait_jpeg(), BIG), 64, "center_crop")
    assert image.size == (64, 64)
    assert near(pixel(image, 32, 2), (0, 255, 0)) and near(pixel(image, 32, 61), (0, 255, 0))


def test_stretch_keeps_everything():
    image = resize(decode(odd.portrait_jpeg(), BIG), 64, "stretch")
    assert image.size == (64, 64)
    assert near(pixel(image, 32, 2), (255, 0, 0)) and near(pixel(image, 32, 61), (0, 0, 255))


def test_pad_letterboxes_with_background():
    image = resize(decode(odd.portrait_jpeg(), BIG), 64, "pad")
    assert image.size == (64, 64)
    assert pixel(image, 1, 32) == ALPHA_BACKGROUND and pixel(image, 62, 32) == ALPHA_BACKGROUND
    assert near(pixel(image, 32, 2), (255, 0, 0))


def test_resize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="squash"):
        resize(Image.new("RGB", (4, 4)), 8, "squash")


def test_encode_is_jpeg_with_requested_quality():
    image = odd.noisy_rgb(64, 64)
    low, high = encode(image, 30), encode(image, 95)
    assert Image.open(io.BytesIO(high)).format == "JPEG"
    assert len(low) < len(high)


@pytest.mark.parametrize(
    "maker",
    [odd.grayscale_jpeg, odd.rgba_png, odd.palette_png, odd.cmyk_jpeg, odd.gray16_png, odd.exif_rotated_jpeg],
)
def test_prepare_gives_8bit_rgb_jpeg_at_resolution(maker):
    image = Image.open(io.BytesIO(prepare(maker(), 96, "center_crop", 90, BIG)))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 96))


def test_prepare_rejects_with_reason():
    with pytest.raises(ImageRejected) as caught:
        prepare(odd.truncated_jpeg(), 96, "center_crop", 90, BIG)
    assert caught.value.reason == REASON_TRUNCATED


def tiff_bytes(image: Image.Image) -> bytes:
    """The image saved as a TIFF by Pillow (the kind UCM-Captions ships)."""
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("data, expected", [(b"II*\x00\x08\x00", True), (b"MM\x00*\x00\x00", True),
                                            (b"II+\x00\x08\x00", True), (b"MM\x00+\x00\x08", True),
                                            (b"\xff\xd8\xff\xe0\x00\x10", False), (b"\x89PNG\r\n", False),
                                            (b"II", False), (b"", False), (None, False)])
def test_is_tiff(data, expected):
    assert imaging.is_tiff(data) is expected


def test_plain_rgb_tiff_pixels_are_unchanged():
    source = odd.noisy_rgb(48, 32)
    image = imaging.decode_rgb(tiff_bytes(source), BIG)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(source))


def test_tiff_goes_through_the_band_reader(monkeypatch):
    from diffusion_model import geotiff

    seen = []
    monkeypatch.setattr(geotiff, "multiband_to_rgb", lambda tiff, settings: seen.append(settings) or
                        np.zeros(tiff.pixels.shape[:2] + (3,), np.uint8))
    settings = geotiff.MultibandSettings(bands=(3, 2, 1))
    imaging.decode_rgb(tiff_bytes(odd.noisy_rgb(8, 8)), BIG, settings)
    assert seen == [settings]


def test_palette_tiff_still_converts_through_pillow():
    palette = decode(odd.palette_png(), BIG)
    image = imaging.decode_rgb(tiff_bytes(palette), BIG)
    assert near(pixel(image, 4, 24), (0, 0, 255), 3) and near(pixel(image, 44, 24), (255, 255, 0), 3)


def test_prepare_reads_a_twelve_band_geotiff():
    from diffusion_model.sample_geotiff import SENTINEL2_BANDS, encode_geotiff

    bands = np.random.default_rng(0).integers(1000, 4000, (40, 40, 12)).astype(np.uint16)
    image = Image.open(io.BytesIO(prepare(encode_geotiff(bands, "sentinel2", names=SENTINEL2_BANDS), 32,
                                          "center_crop", 90, BIG)))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))


def test_tiff_failures_have_reasons():
    from diffusion_model.sample_geotiff import encode_geotiff

    bands = np.zeros((8, 8, 4), np.uint16)
    with pytest.raises(ImageRejected, match="all_nodata"):
        prepare(encode_geotiff(bands, "sentinel2", nodata=0), 32, "center_crop", 90, BIG)
    with pytest.raises(ImageRejected, match="undecodable"):
        prepare(b"MM\x00*" + b"\x01" * 40, 32, "center_crop", 90, BIG)


def test_prepare_applies_the_band_settings():
    from diffusion_model.geotiff import MultibandSettings
    from diffusion_model.sample_geotiff import encode_geotiff

    bands = np.stack([np.full((16, 16), value, np.uint8) for value in (10, 60, 110, 200)], axis=-1)
    jpeg = prepare(encode_geotiff(bands, "naip"), 16, "center_crop", 95, BIG, MultibandSettings(bands=(4, 1, 2)))
    assert near(pixel(Image.open(io.BytesIO(jpeg)), 8, 8), (200, 10, 60), 3)


def test_transparent_tiff_pixels_are_background():
    image = Image.new("RGBA", (48, 48), (255, 0, 0, 255))
    image.paste((0, 255, 0, 0), (24, 0, 48, 48))
    rgb = imaging.decode_rgb(tiff_bytes(image), BIG)
    assert pixel(rgb, 4, 24) == (255, 0, 0) and pixel(rgb, 44, 24) == ALPHA_BACKGROUND
