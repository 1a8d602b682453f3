"""The create job's pieces: naming, chunking, clean-up of stale files, the settings guard."""

import io
import json

import pytest

from diffusion_model.create_job import (SETTINGS_FILENAME, JobTally, chunked, clear_images, guard_settings,
                                        image_name, kept_caption_lines, plan_chunk, settle_chunk, summary_line)
from diffusion_model.parquet_source import Row
from utils.cli import UsageError


def rows_of(sizes):
    """Rows numbered from 1 whose images have the given byte sizes."""
    return [Row(i + 1, None, b"x" * size, ["a road ."]) for i, size in enumerate(sizes)]


def test_image_name_is_row_number_padded():
    assert image_name(7) == "image_000007.jpg"
    assert image_name(1234567) == "image_1234567.jpg"


def test_chunked_by_rows_and_bytes():
    by_rows = [len(c) for c in chunked(rows_of([1] * 10), max_rows=4, max_bytes=100)]
    assert by_rows == [4, 4, 2]
    by_bytes = [[r.number for r in c] for c in chunked(rows_of([40, 40, 40, 200, 10]), max_rows=10, max_bytes=100)]
    assert by_bytes == [[1, 2], [3], [4], [5]], "an oversized row travels alone, never dropped"


def test_plan_chunk_sends_only_rows_with_captions():
    rows = [Row(1, "a", b"1", [" .", "a field ."]), Row(2, "b", b"2", [" ."]), Row(3, "c", None, "a road")]
    plans, work = plan_chunk(rows, "first")
    assert [captions for _, captions in plans] == [["a field ."], [], ["a road"]]
    assert work == [(1, b"1", False, None), (3, None, False, None)]


def test_clear_images_removes_only_our_temporaries_unless_overwriting(tmp_path):
    for name in ["image_000001.jpg", "image_000002.jpg.tmp", "notes.txt", "other.jpg.tmp"]:
        (tmp_path / name).write_bytes(b"x")
    assert clear_images(tmp_path, finished_too=False) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_000001.jpg", "notes.txt", "other.jpg.tmp"]
    assert clear_images(tmp_path, finished_too=True) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other.jpg.tmp"]


def test_guard_settings(tmp_path):
    wanted = {"resolution": 512, "inputs": ["/a.parquet"]}
    guard_settings(tmp_path, wanted, overwrite=False)
    (tmp_path / SETTINGS_FILENAME).write_text(json.dumps(wanted))
    guard_settings(tmp_path, wanted, overwrite=False)
    changed = {**wanted, "resolution": 256}
    with pytest.raises(UsageError, match="resolution=512"):
        guard_settings(tmp_path, changed, overwrite=False)
    guard_settings(tmp_path, changed, overwrite=True)


def test_guard_reads_a_folder_from_before_source_forms_as_parquet(tmp_path):
    (tmp_path / SETTINGS_FILENAME).write_text(json.dumps({"resolution": 512, "inputs": ["/a.parquet"]}))
    guard_settings(tmp_path, {"resolution": 512, "inputs": ["/a.parquet"], "format": "parquet", "split": None}, False)
    with pytest.raises(UsageError, match="format='parquet'"):
        guard_settings(tmp_path, {"resolution": 512, "format": "csv"}, False)


def test_a_row_failed_by_its_reader_is_not_sent_and_keeps_its_reason():
    rows = [Row(1, "a", b"x", ["a road ."]), Row(2, "b", None, ["a road ."], ("missing_image", "b not found"))]
    plans, work = plan_chunk(rows, "first")
    assert [number for number, *_ in work] == [1]
    tally = JobTally()
    settle_chunk(plans, [(1, "written", "")], tally, io.StringIO())
    assert tally.failures == [{"row": 2, "filename": "b", "reason": "missing_image", "detail": "b not found"}]


def test_kept_caption_lines_are_those_outside_the_run(tmp_path):
    lines = [f"rsicd_images/{image_name(n)}\tcaption {n}\n" for n in (1, 2, 5, 9)] + ["hand/edited.jpg\tx"]
    (tmp_path / "c.txt").write_text("".join(lines))
    assert list(kept_caption_lines(tmp_path / "c.txt", range(2, 6), True)) == [lines[0], "hand/edited.jpg\tx\n"]
    assert list(kept_caption_lines(tmp_path / "c.txt", range(2, 6), False)) == [lines[3]]
    assert list(kept_caption_lines(tmp_path / "none.txt", range(1, 2), True)) == []


def test_clear_images_of_some_rows_only(tmp_path):
    for number in (1, 2, 3):
        (tmp_path / image_name(number)).write_bytes(b"x")
    assert clear_images(tmp_path, finished_too=True, rows=range(2, 4)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [image_name(1)]


def test_summary_counts_the_caption_file_and_this_source_apart(tmp_path):
    """After --append the file holds other sources' lines too: the line gives its total and this source's share."""
    caption_file, report = tmp_path / "captions.txt", tmp_path / "create_report.json"
    alone = JobTally(rows_processed=4, images_written=4, caption_lines=4)
    assert "; 4 caption lines in " + str(caption_file) + ";" in summary_line(alone, caption_file, report, 1.0)
    appended = JobTally(rows_processed=6, images_written=6, caption_lines=6, kept_caption_lines=4)
    line = summary_line(appended, caption_file, report, 1.0, "webdataset")
    assert f"; 10 caption lines in {caption_file} (6 from this source, 4 from the folder's other sources);" in line


def test_settled_rows_name_their_source_file_beside_their_captions():
    """A written or reused row's image and source file name go to source_files.jsonl; a failed row's do not, and a
    row whose source gives no name gets no line."""
    rows = [Row(1, "rsicd_images/airport_1.jpg", b"x", ["a runway ."]), Row(2, "pond_2.jpg", b"x", ["a pond ."]),
            Row(3, None, b"x", ["a road ."]), Row(4, "river_4.jpg", b"x", ["a river ."])]
    plans, _ = plan_chunk(rows, "first")
    captions, sources = io.StringIO(), io.StringIO()
    settle_chunk(plans, [(1, "written", ""), (2, "undecodable", ""), (3, "written", ""), (4, "reused", "")],
                 JobTally(), captions, sources)
    assert [json.loads(line) for line in sources.getvalue().splitlines()] == [
        {"file_name": "rsicd_images/image_000001.jpg", "source_file": "rsicd_images/airport_1.jpg"},
        {"file_name": "rsicd_images/image_000004.jpg", "source_file": "river_4.jpg"}]


def test_kept_source_file_lines_are_those_outside_the_run(tmp_path):
    """--append keeps the other sources' source_files.jsonl lines as it keeps their caption lines."""
    from diffusion_model.create_job import kept_source_lines

    lines = [json.dumps({"file_name": f"rsicd_images/{image_name(n)}", "source_file": f"s_{n}.jpg"}) + "\n"
             for n in (1, 2, 5, 9)] + ["{broken\n"]
    (tmp_path / "s.jsonl").write_text("".join(lines))
    assert list(kept_source_lines(tmp_path / "s.jsonl", range(2, 6), True)) == [lines[0], "{broken\n"]
    assert list(kept_source_lines(tmp_path / "s.jsonl", range(2, 6), False)) == [lines[3]]


def test_settled_rows_get_their_metadata_lines_with_the_gsd_corrected(caplog):
    """Row values over GeoTIFF values over literals, GSD scaled by source/output pixels, bad values reported per row,
    a GeoTIFF in a CRS we cannot read warned about once and counted, an image without metadata left out."""
    from diffusion_model.create_job import MetadataPlan, build_report
    from diffusion_model.georef import Location

    rows = [Row(1, "a.tif", b"x", ["a field ."], metadata={"gsd": "0.3", "lat": "95", "cloud": 10}),
            Row(2, "b.tif", b"x", ["a pond ."]), Row(3, "c.tif", b"x", ["a road ."]),
            Row(4, "d.jpg", b"x", ["a dam ."], metadata={"gsd": None})]
    plans, work = plan_chunk(rows, "first", {"sensor": "naip"})
    assert [item[2] for item in work] == [True, True, True, True]
    statuses = [(1, "written", "", (1024, 768, Location(0.6, 37.7, -122.4))),
                (2, "reused", "", (224, 224, Location(0.5, None, None, 2154))),
                (3, "written", "", (224, 224, Location(0.5, None, None, 2154))), (4, "reused", "", None)]
    tally, metadata = JobTally(), io.StringIO()
    plan = MetadataPlan({"sensor": "naip"}, 256, "center_crop")
    settle_chunk(plans, statuses, tally, io.StringIO(), io.StringIO(), metadata, plan)
    assert [json.loads(line) for line in metadata.getvalue().splitlines()] == [
        {"file_name": "rsicd_images/image_000001.jpg",
         "metadata": {"gsd": 0.9, "lat": 37.7, "lon": -122.4, "cloud": 10.0, "sensor": "naip"}},
        {"file_name": "rsicd_images/image_000002.jpg", "metadata": {"gsd": 0.4375, "sensor": "naip"}},
        {"file_name": "rsicd_images/image_000003.jpg", "metadata": {"gsd": 0.4375, "sensor": "naip"}},
        {"file_name": "rsicd_images/image_000004.jpg", "metadata": {"sensor": "naip"}}]
    assert tally.metadata_problems == [{"row": 1, "field": "lat", "value": "95", "reason": "outside [-90, 90]"}]
    assert [r.message.count("EPSG:2154") for r in caplog.records] == [1], "one warning per CRS, not per row"
    summary = build_report(tally, 1.0, [], 4, {})["metadata"]
    assert summary == {"rows_with_metadata": 4, "fields": {"gsd": 3, "lat": 1, "lon": 1, "cloud": 1, "sensor": 4},
                       "bad_values": 1, "bad_values_by_field": {"lat": 1},
                       "rows_without_location_by_epsg": {"2154": 2}}
    assert ("; metadata on 4 rows (gsd 3, lat 1, lon 1, cloud 1, sensor 4), 1 bad values dropped, 2 GeoTIFF rows "
            "without location (EPSG 2154);") in summary_line(tally, io.StringIO(), "r.json", 1.0)
    assert "metadata" not in summary_line(JobTally(), "c.txt", "r.json", 1.0)


def test_workers_read_the_georeference_and_size_of_reused_images_too(tmp_path):
    """A resumed row is not decoded again, yet its metadata needs the source size and GeoTIFF tags."""
    from diffusion_model.create_job import ImageSettings, init_worker, process_chunk, source_facts
    from diffusion_model.sample_geotiff import geotiff_row

    tiff = geotiff_row(3, 0, "naip")["image"]["bytes"]
    init_worker(str(tmp_path), ImageSettings(32, "center_crop", 90, 10 ** 8), False)
    first = process_chunk([(1, tiff, False, None)])
    again = process_chunk([(1, tiff, False, None)])
    assert [s[1] for s in first + again] == ["written", "reused"]
    width, height, location = again[0][3]
    assert (width, height) == (224, 224) and location.gsd == pytest.approx(0.6)
    assert location.lat == pytest.approx(37.7659, abs=1e-4) and location.lon == pytest.approx(-122.4210, abs=1e-4)
    jpeg = (tmp_path / image_name(1)).read_bytes()
    assert source_facts(jpeg, False) is None, "an image without metadata costs no header read"
    assert source_facts(jpeg, True) == (32, 32, None)
    assert source_facts(b"junk", True) is None


def test_kept_metadata_lines_are_those_outside_the_run(tmp_path):
    """--append keeps the other sources' metadata_values.jsonl lines (the same rule as source_files.jsonl)."""
    from diffusion_model.create_job import kept_source_lines, metadata_line

    lines = [metadata_line(f"rsicd_images/{image_name(n)}", {"gsd": float(n)}) for n in (1, 3, 7)]
    (tmp_path / "m.jsonl").write_text("".join(lines))
    assert list(kept_source_lines(tmp_path / "m.jsonl", range(2, 5), True)) == lines[:1]
    assert list(kept_source_lines(tmp_path / "m.jsonl", range(2, 5), False)) == lines[2:]


def test_workers_lift_pillow_s_pixel_limit_only_while_reading_and_apply_max_pixels(tmp_path, monkeypatch):
    """--max_pixels, not Pillow's guard, decides what is too large; the process keeps Pillow's limit afterwards,
    also when a row's write fails (a worker run in process: the way the suite once lost the limit)."""
    from PIL import Image

    import odd_images as odd
    from diffusion_model.create_job import ImageSettings, init_worker, process_chunk

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image is a "bomb" to Pillow at this limit
    init_worker(str(tmp_path), ImageSettings(8, "center_crop", 90, 1000), False)
    rows = [(1, odd.save(odd.noisy_rgb(16, 16), "PNG"), False, None), (2, odd.png_claiming_size(100, 100), False, None)]
    statuses = process_chunk(rows)
    assert [s[:3] for s in statuses] == [(1, "written", ""), (2, "too_large", "100x100 exceeds 1000 pixels")]
    assert Image.MAX_IMAGE_PIXELS == 100
    init_worker(str(tmp_path / "gone"), ImageSettings(8, "center_crop", 90, 1000), False)
    with pytest.raises(OSError):
        process_chunk(rows[:1])
    assert Image.MAX_IMAGE_PIXELS == 100
