"""evaluation.report: the small-N warning, bad-row summary, the report's stand-in flag, and the HTML sheet."""

from argparse import Namespace

import pytest
from PIL import Image

from evaluation.data import BadRow, EvalRow
from evaluation.report import bad_row_summary, build_report, small_n_warning, write_sheet


def test_small_n_is_warned_about_with_the_literature_figures():
    assert "N=64 is small" in small_n_warning(64) and "66 at N=1093" in small_n_warning(64)
    assert small_n_warning(1093) is None


def test_bad_rows_are_listed_and_counted_by_reason():
    summary = bad_row_summary([BadRow(3, "undecodable", "x"), BadRow(7, "undecodable"), BadRow(9, "missing_image")])
    assert summary["count"] == 3
    assert summary["by_reason"] == {"undecodable": 2, "missing_image": 1}
    assert summary["rows"][0] == {"row": 3, "reason": "undecodable", "detail": "x"}


SCENE = {"num_samples": 30, "scene_accuracy": 0.6, "scene_accuracy_real_trained": 0.5, "scene_accuracy_real": 0.9,
         "chance": 0.2, "num_classes": 5, "left_out": {"count": 2, "reason": "no_class", "rows": [3, 8]}}


def report_for(standard_inception: bool, stand_in_clip: bool, pairs: int = 1093) -> dict:
    """A report with the given model flags."""
    args = Namespace(num_samples=None, model="m", base_model=None, weights="auto", data_dir=None,
                     parquet_path="test.parquet", caption_index=0, batch_size=1, resolution=512)
    return build_report(args, settings={"seed": 0}, rows_read=pairs, pairs=pairs, bad=[],
                        figures={"fid": 65.7, "clip_score": 27.8, "clip_cosine": 0.278, "scene": SCENE},
                        inception={"path": "i.pth", "sha256": "ab", "matches_standard_name": standard_inception},
                        clip={"path": "clip", "stand_in": stand_in_clip}, device="cpu", timings={})


def test_report_flags_stand_in_models_and_warns():
    assert report_for(True, False)["stand_in_models"] is False and report_for(True, False)["warnings"] == []
    for flags in ((False, False), (True, True)):
        report = report_for(*flags)
        assert report["stand_in_models"] is True
        assert any("stand-in" in w for w in report["warnings"])
    assert any("N=64" in w for w in report_for(True, False, pairs=64)["warnings"])


def test_scene_figures_stand_beside_fid_with_their_details():
    report = report_for(True, False)
    assert (report["scene_accuracy"], report["scene_accuracy_real"], report["chance"], report["num_classes"],
            report["scene_num_samples"]) == (0.6, 0.9, 0.2, 5, 30)
    assert report["scene_details"]["left_out"]["rows"] == [3, 8]
    assert "LogisticRegression" in report["scene_details"]["classifier"]
    assert any("trained on the generated" in line for line in report["scene_details"]["directions"])


def test_sheet_pairs_captions_escaped_with_relative_paths(tmp_path):
    rows = [EvalRow(4, "a <b>road</b> & ponds", None), EvalRow(6, "fields", None)]
    reals = [Image.new("RGB", (8, 8), (1, 2, 3)), Image.new("RGB", (8, 8))]
    sheet = write_sheet(tmp_path, rows, reals, "model <x>").read_text()
    assert "a &lt;b&gt;road&lt;/b&gt; &amp; ponds" in sheet and "<b>" not in sheet
    assert "src='sheet/real_000004.png'" in sheet and "src='generated/000006.png'" in sheet
    assert Image.open(tmp_path / "sheet" / "real_000004.png").getpixel((0, 0)) == (1, 2, 3)
    assert str(tmp_path) not in sheet


def test_sheet_labels_rows_by_caption_and_columns_real_and_generated(tmp_path):
    sheet = write_sheet(tmp_path, [EvalRow(4, "ponds", None)], [Image.new("RGB", (8, 8))], "m").read_text()
    assert "<th>real</th><th>generated</th>" in sheet and "<th scope='row'>ponds</th>" in sheet


@pytest.mark.parametrize("side, shown", [(16, 128), (8, 128), (100, 200), (128, 128), (512, 512)])
def test_sheet_shows_small_images_enlarged_by_a_whole_factor_without_smoothing(tmp_path, side, shown):
    """8 px -> 16x, 100 px -> 2x (200 px), 512 px as it is; both images of the pair, pixelated."""
    reals = [Image.new("RGB", (side, side))]
    sheet = write_sheet(tmp_path, [EvalRow(1, "a field", None)], reals, "m").read_text()
    assert sheet.count(f"style='width:{shown}px;height:{shown}px'") == 2
    assert "img{image-rendering:pixelated}" in sheet
    assert Image.open(tmp_path / "sheet" / "real_000001.png").size == (side, side)  # the file stays native
