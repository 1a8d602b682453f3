"""evaluation.scoring: real images feed FID's real side and drop bad rows; generated ones feed FID and CLIP."""

import io

import torch
from PIL import Image

from evaluation.data import EvalRow
from evaluation.generation import image_path
from evaluation.scoring import add_generated_images, add_real_images, chunks


class Recorder:
    """A metric double that records each update's arguments."""

    def __init__(self):
        """No updates yet."""
        self.updates = []

    def update(self, batch, *args, **kwargs):
        """Record the batch and the rest."""
        self.updates.append((batch, args, kwargs))


def png(color) -> bytes:
    """PNG bytes of a 20x12 solid image."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_chunks_cover_everything_in_order():
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_real_images_go_to_the_real_side_and_bad_rows_are_reported():
    rows = [EvalRow(1, "a", png((255, 0, 0))), EvalRow(2, "b", b"junk"), EvalRow(3, "c", png((0, 255, 0))),
            EvalRow(4, "d", png((0, 0, 255)))]
    fid = Recorder()
    good, bad, kept = add_real_images(rows, fid, 8, batch_size=2, keep=1, device="cpu")
    assert [r.number for r in good] == [1, 3, 4]
    assert [(b.number, b.reason) for b in bad] == [(2, "undecodable")]
    assert len(kept) == 1 and kept[0].size == (8, 8)
    assert [u[0].shape for u in fid.updates] == [(1, 3, 8, 8), (2, 3, 8, 8)]
    assert all(u[2] == {"real": True} and u[0].dtype == torch.uint8 for u in fid.updates)
    assert fid.updates[1][0][1, 2, 0, 0] == 255  # row 4 is blue


def test_generated_images_go_to_fid_and_with_their_captions_to_clip(tmp_path):
    rows = [EvalRow(2, "a road", None), EvalRow(7, "a pond", None), EvalRow(9, "a town", None)]
    for shade, row in enumerate(rows):
        Image.new("RGB", (16, 16), (shade,) * 3).save(image_path(tmp_path, row))
    fid, clip = Recorder(), Recorder()
    add_generated_images(rows, tmp_path, fid, clip, 8, batch_size=2, device="cpu")
    assert [u[2] for u in fid.updates] == [{"real": False}] * 2
    assert [u[1][0] for u in clip.updates] == [["a road", "a pond"], ["a town"]]
    assert fid.updates[0][0].shape == (2, 3, 8, 8) and int(clip.updates[1][0][0, 0, 0, 0]) == 2
