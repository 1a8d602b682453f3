"""trainer/controlnet_validation.py in-process: validation conditioning read from PNG masks and 4-band GeoTIFFs as the
training data is, false-colour pictures, bad files as one-line usage errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.controlnet_validation import conditioning_picture, load_conditioning
from utils.cli import UsageError
from utils.control_input import spec_from_document

BANDS = {"type": "bands", "bands": [1, 2, 3, 4],
         "normalisation": {"mode": "minmax", "offset": [0, 0, 0, 0], "scale": [100, 100, 100, 1000], "clip": True}}


def test_four_band_geotiff_becomes_a_four_channel_input(tmp_path):
    """A (H, W, 4) GeoTIFF: (1, 4, 32, 32) normalised with the saved statistics, resized to the resolution."""
    from diffusion_model.sample_geotiff import encode_geotiff

    pixels = np.stack([np.full((48, 48), v, np.uint16) for v in (10, 50, 90, 500)], axis=-1)
    path = tmp_path / "sar.tif"
    path.write_bytes(encode_geotiff(pixels, "sentinel2"))
    (control,) = load_conditioning([path], spec_from_document(BANDS), 32)
    assert control.shape == (1, 4, 32, 32)
    assert torch.allclose(control[0, :, 0, 0], torch.tensor([0.1, 0.5, 0.9, 0.5]))
    assert conditioning_picture(control, spec_from_document(BANDS)).size == (32, 32)


def test_mask_png_is_one_hot_and_pictured_in_class_colours(tmp_path):
    """A class-index PNG: K one-hot channels at the resolution; the picture shows the classes, not the channels."""
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 2
    Image.fromarray(mask, mode="L").save(tmp_path / "m.png")
    spec = spec_from_document({"type": "mask", "classes": 3})
    (control,) = load_conditioning([tmp_path / "m.png"], spec, 32)
    assert control.shape == (1, 3, 32, 32) and torch.equal(control[0].argmax(0)[:, 16:], torch.full((32, 16), 2))
    picture = np.asarray(conditioning_picture(control, spec))
    assert (picture[:, :16] != picture[:, 16:]).any()


def test_an_unreadable_or_out_of_range_file_is_a_usage_error(tmp_path):
    """A class above the spec's, or a missing file: UsageError naming --validation_image."""
    Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(tmp_path / "bad.png")
    spec = spec_from_document({"type": "mask", "classes": 3})
    with pytest.raises(UsageError, match="--validation_image: .*class 7"):
        load_conditioning([tmp_path / "bad.png"], spec, 8)
    with pytest.raises(UsageError, match="--validation_image: cannot read"):
        load_conditioning([tmp_path / "missing.png"], spec, 8)
