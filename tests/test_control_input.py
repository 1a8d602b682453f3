"""utils/control_input.py: conditioning files -> the ControlNet's (C, H, W) input, as conditioning.json says."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from utils.control_input import (ControlInputError, ControlSpec, control_array, false_colour, load_spec, prepare,
                                 resize_raw, spec_from_document)

MASK_DOC = {"type": "mask", "classes": 4, "palette": None, "bands": None, "normalisation": None}
BANDS_DOC = {"type": "bands", "classes": None, "bands": [2, 3],
             "normalisation": {"mode": "minmax", "offset": [10.0, -5.0], "scale": [20.0, 10.0], "clip": True}}


def test_spec_from_documents():
    """Type, classes, bands and normalisation come from the document; channels follow from them."""
    assert spec_from_document({"type": "image"}).channels == 3
    assert spec_from_document(MASK_DOC).channels == 4
    bands = spec_from_document(BANDS_DOC)
    assert (bands.channels, bands.bands, bands.offset, bands.scale, bands.clip) == (2, (2, 3), (10.0, -5.0),
                                                                                   (20.0, 10.0), True)


@pytest.mark.parametrize("document", [{"type": "depth"}, {"type": "mask"}])
def test_bad_documents_are_named(document):
    """An unknown type, or a mask without its class count, is refused with a message, not a KeyError."""
    with pytest.raises(ControlInputError):
        spec_from_document(document)


def test_load_spec_from_folder_and_file(tmp_path):
    """A folder's conditioning.json or the file itself; an unreadable one is a ControlInputError."""
    (tmp_path / "conditioning.json").write_text(json.dumps(MASK_DOC))
    assert load_spec(tmp_path).num_classes == load_spec(tmp_path / "conditioning.json").num_classes == 4
    with pytest.raises(ControlInputError, match="missing.json"):
        load_spec(tmp_path / "missing.json")


def test_mask_becomes_one_hot_and_resizes_without_new_classes(tmp_path):
    """A class-index PNG -> one channel per class; resizing keeps only existing classes (nearest neighbour)."""
    classes = np.array([[0, 1], [3, 3]], dtype=np.uint8)
    Image.fromarray(classes, mode="L").save(tmp_path / "m.png")
    spec = spec_from_document(MASK_DOC)
    out = control_array(tmp_path / "m.png", spec)
    assert out.shape == (4, 2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out.argmax(0), classes)
    assert out.sum(0).min() == out.sum(0).max() == 1
    bigger = control_array(tmp_path / "m.png", spec, size=4)
    assert set(np.unique(bigger.argmax(0))) == {0, 1, 3} and bigger.sum(0).max() == 1
    np.testing.assert_array_equal(bigger.argmax(0)[::2, ::2], classes)


def test_mask_palette_and_out_of_range_class(tmp_path):
    """An RGB mask maps through the palette; an unknown colour or a class >= K is refused, naming the file."""
    spec = spec_from_document({**MASK_DOC, "palette": {"0": [0, 0, 0], "2": [255, 0, 0]}})
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = [255, 0, 0]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert control_array(tmp_path / "c.png", spec).argmax(0)[0, 0] == 2
    rgb[1, 1] = [1, 2, 3]
    Image.fromarray(rgb).save(tmp_path / "u.png")
    with pytest.raises(ControlInputError, match="u.png"):
        control_array(tmp_path / "u.png", spec)
    with pytest.raises(ControlInputError, match="class 4"):
        prepare(np.array([[4]]), spec_from_document(MASK_DOC))


def test_bands_from_npy_and_tiff_are_normalised_alike(tmp_path):
    """create.py's .npy and a user's GeoTIFF with the chosen bands give the same normalised, clipped input."""
    values = np.stack([np.full((3, 3), 7.0), np.full((3, 3), 20.0), np.full((3, 3), 0.0)]).astype(np.float32)
    np.save(tmp_path / "b.npy", values[1:])  # create.py keeps the chosen bands (2, 3) only
    tifffile.imwrite(tmp_path / "b.tif", values.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig")
    spec = spec_from_document(BANDS_DOC)
    from_npy = control_array(tmp_path / "b.npy", spec)
    from_tiff = control_array(tmp_path / "b.tif", spec)
    np.testing.assert_allclose(from_npy, from_tiff)
    np.testing.assert_allclose(from_npy[:, 0, 0], [0.5, 0.5])  # (20-10)/20 and (0+5)/10


def test_band_count_mismatch_is_refused():
    """An input with another band count than the ControlNet's normalisation is refused, not broadcast."""
    with pytest.raises(ControlInputError, match="3 bands"):
        prepare(np.zeros((3, 2, 2), np.float32), spec_from_document(BANDS_DOC))


def test_band_count_without_normalisation_is_checked_against_the_bands():
    """With no normalisation statistics the band list still fixes the count: 3 bands for a 2-band ControlNet."""
    spec = spec_from_document({"type": "bands", "bands": [1, 2]})
    with pytest.raises(ControlInputError, match="3 bands, the ControlNet was trained on 2"):
        prepare(np.zeros((3, 2, 2), np.float32), spec)


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((4, 4), np.float32), r"shape \(4, 4\), not \(bands, height, width\)"),
    (np.zeros((2, 0, 4), np.float32), r"shape \(2, 0, 4\)"),
    (np.array([[[np.nan, 1.0]], [[2.0, 3.0]]], np.float32), "NaN or infinite"),
])
def test_malformed_band_arrays_are_refused(tmp_path, array, fragment):
    """A .npy that is not (bands, H, W), or holds NaN: a ControlInputError naming it (a bad row in training)."""
    np.save(tmp_path / "b.npy", array)
    with pytest.raises(ControlInputError, match=fragment):
        control_array(tmp_path / "b.npy", spec_from_document(BANDS_DOC))


def test_rgb_scaled_to_unit_range(tmp_path):
    """An RGB conditioning is 0..1 (not -1..1, as diffusers' ControlNet scripts give it), channels first."""
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "i.png")
    out = control_array(tmp_path / "i.png", ControlSpec())
    assert out.shape == (3, 2, 3)
    np.testing.assert_allclose(out[:, 0, 0], [1.0, 0.0, 0.0])


def test_resize_bands_bilinear():
    """Bands resize bilinearly per band, keeping float values between the originals."""
    raw = np.stack([np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)])
    out = resize_raw(raw, spec_from_document(BANDS_DOC), 4)
    assert out.shape == (1, 4, 4) and 0 < out[0, 0, 1] < 1


def test_false_colour_shows_classes_and_bands():
    """Masks get one colour per class (the palette's when given); bands are stretched to the full range."""
    spec = spec_from_document({**MASK_DOC, "palette": {"1": [1, 2, 3]}})
    picture = np.asarray(false_colour(prepare(np.array([[1, 0]]), spec), spec))
    assert tuple(picture[0, 0]) == (1, 2, 3) and tuple(picture[0, 1]) != (1, 2, 3)
    bands = np.stack([np.array([[0.2, 0.4]], np.float32)])
    shown = np.asarray(false_colour(bands, spec_from_document(BANDS_DOC)))
    assert shown.shape == (1, 2, 3) and shown[0, 0, 0] == 0 and shown[0, 1, 0] == 255
