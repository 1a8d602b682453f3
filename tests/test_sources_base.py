"""diffusion_model.sources.base: the image folder's safety and layout probe, split names, labels."""

import os

import pytest

from diffusion_model.sources.base import ImageFolder, Source, open_image_folder, split_matcher
from utils.cli import UsageError

NAME = (lambda e: e.get("name"),)


def folder_with(tmp_path):
    """root/imgs/a.jpg, a secret file beside root, and a symlink inside root pointing at it."""
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.jpg").write_bytes(b"A")
    (tmp_path / "secret.jpg").write_bytes(b"SECRET")
    os.symlink(tmp_path / "secret.jpg", root / "imgs" / "link.jpg")
    return root


def test_reads_inside_and_refuses_every_way_out(tmp_path):
    root = folder_with(tmp_path)
    folder = ImageFolder(root, root / "imgs", NAME)
    assert folder.read({"name": "a.jpg"}) == (b"A", None)
    for name, reason in (("../../secret.jpg", "unsafe_path"), ("/etc/hostname", "unsafe_path"),
                         ("link.jpg", "unsafe_path"), ("C:/x.jpg", "unsafe_path"), ("b.jpg", "missing_image")):
        data, failure = folder.read({"name": name})
        assert data is None and failure[0] == reason, name
    assert folder.read({})[1][0] == "bad_entry"
    os.mkdir(root / "imgs" / "dir.jpg")
    assert folder.read({"name": "dir.jpg"})[1][0] == "unreadable_image"


def test_probe_finds_the_subfolder_holding_the_images(tmp_path):
    root = folder_with(tmp_path)
    (root / "other").mkdir()
    assert open_image_folder(root, [{"name": "a.jpg"}], NAME).base == root / "imgs"
    assert open_image_folder(root, [{"name": "zzz.jpg"}], NAME).base == root, "nothing found: the root itself"
    with pytest.raises(UsageError, match="--images_dir"):
        open_image_folder(root / "nope", [], NAME)


def test_split_names_map_to_the_wanted_split():
    assert [split_matcher("val")(v) for v in ("val", "Valid", "validation ", "train", None)] == [
        True, True, True, False, False]
    assert split_matcher("all")(None) and not split_matcher("test")("train")


def test_label_names_the_form_the_split_and_the_file_spelling():
    source = Source("karpathy", [], 0, lambda limit: iter(()), "val", ["valid"])
    assert source.label() == "karpathy, split val (as 'valid' in the file)"
    assert Source("csv", [], 0, lambda limit: iter(())).label() == "csv"
    assert Source("nwpu", [], 0, lambda limit: iter(()), "train", ["train"]).label() == "nwpu, split train"
