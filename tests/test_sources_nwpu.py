"""diffusion_model.sources.nwpu: shape detection, raw_N order, per-class folders or a flat one."""

import json

from diffusion_model.sources.base import SourceOptions
from diffusion_model.sources.nwpu import is_nwpu, open_nwpu, raw_captions


def test_shape_detection():
    assert is_nwpu({"airport": [{"filename": "a.jpg", "raw": "x", "split": "train"}]})
    assert not is_nwpu({"images": [{"filename": "a.jpg", "raw": "x"}]})
    assert not is_nwpu({"airport": {"filename": "a.jpg"}}) and not is_nwpu({})
    assert is_nwpu({"airport": ["junk first", {"filename": "a.jpg", "raw": "x"}]})


def test_raw_captions_in_number_order():
    item = {"raw_10": "ten", "raw": "zero", "raw_2": "two", "raw_1": "one", "rawness": "no"}
    assert raw_captions(item) == ["zero", "one", "two", "ten"]


def test_flat_image_folder_is_found_too(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a_1.jpg").write_bytes(b"1")
    doc = {"a": [{"filename": "a_1.jpg", "split": "train", "raw": "one"}, "junk"],
           "b": [{"filename": "b_1.jpg", "split": "test", "raw": "two"}]}
    (tmp_path / "n.json").write_text(json.dumps(doc))
    source = open_nwpu(tmp_path / "n.json", doc, SourceOptions(images_dir=str(tmp_path)))
    rows = list(source.rows())
    assert [(r.number, r.filename, r.image, r.failure and r.failure[0]) for r in rows] == [
        (1, "a/a_1.jpg", b"1", None), (2, "a[1]", None, "bad_entry")]
    assert source.details["splits_not_read"] == {"test": 1}
