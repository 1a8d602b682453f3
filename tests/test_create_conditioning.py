"""create.py + format.py with ControlNet conditioning, end to end on real files: LoveDA's images_png/ + masks_png/
layout (as users run it, a subprocess), Parquet palette masks, webdataset SAR bands, JSONL paths; alignment with the
image, failures per row, resume, --append, conditioning.json and usage errors (in-process: main())."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from diffusion_model import create, format as format_script
from diffusion_model.conditioning import apply_geometry, plan_geometry, scale_geometry
from diffusion_model.imaging import RESAMPLE
from test_create import read_captions, read_report
from utils.cli import UsageError

CREATE = "diffusion_model/create.py"
PALETTE = np.array([[255, 255, 255], [255, 0, 0], [255, 255, 0], [0, 0, 255], [159, 129, 183], [0, 255, 0],
                    [255, 195, 128]], np.uint8)  # LoveDA's seven colours
SIDE = 16


def layout(seed: int, width: int = 48, height: int = 32, classes: int = 7) -> np.ndarray:
    """A random class layout of 8 px blocks, (height, width) uint8."""
    grid = np.random.default_rng(seed).integers(0, classes, (height // 8, width // 8)).astype(np.uint8)
    return np.kron(grid, np.ones((8, 8), np.uint8))


def file_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """Image file bytes of an array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def expected_mask(mask: np.ndarray, mode: str = "center_crop") -> np.ndarray:
    """The mask as create.py must write it: the image's geometry, nearest neighbour."""
    geometry = plan_geometry(mask.shape[1], mask.shape[0], SIDE, mode)
    return np.asarray(apply_geometry(Image.fromarray(mask), geometry, Image.Resampling.NEAREST))


def agreement(jpeg_path: Path, classes: np.ndarray) -> float:
    """Share of the written image's pixels whose nearest palette colour is the written mask's class."""
    pixels = np.asarray(Image.open(jpeg_path).convert("RGB")).astype(int)
    nearest = np.abs(pixels[:, :, None, :] - PALETTE[None, None].astype(int)).sum(-1).argmin(-1)
    return float((nearest == classes).mean())


def write_loveda(root: Path) -> list:
    """images_png/N.png (the layout in LoveDA colours) + masks_png/N.png, an index.csv, and hostile rows; returns
    the expected reason per row (None = kept)."""
    (root / "images_png").mkdir(parents=True)
    (root / "masks_png").mkdir()
    outcomes, lines = [], ["file_name,text"]
    for number in range(1, 8):
        mask = layout(number)
        Image.fromarray(PALETTE[mask]).save(root / "images_png" / f"{number}.png")
        lines.append(f"images_png/{number}.png,scene {number}")
        reason = {3: "conditioning_missing_image", 4: "conditioning_aspect_ratio",
                  5: "conditioning_class_out_of_range", 7: "conditioning_undecodable"}.get(number)
        outcomes.append(reason)
        if number == 3:
            continue
        if number == 4:
            mask = mask[:, :32]
        if number == 5:
            mask = np.where(mask == mask[0, 0], 9, mask).astype(np.uint8)
        if number == 6:  # a TIFF mask, as OpenEarthMap ships
            Image.fromarray(mask).save(root / "masks_png" / f"{number}.tif")
        elif number == 7:
            (root / "masks_png" / f"{number}.png").write_bytes(b"\x89PNG not really")
        else:
            Image.fromarray(mask).save(root / "masks_png" / f"{number}.png")
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    return outcomes


@pytest.fixture(scope="module")
def loveda(tmp_path_factory, run_script):
    """create.py on a LoveDA-style folder (CSV index of images_png/, --conditioning_dir masks_png/), then format.py."""
    root = tmp_path_factory.mktemp("loveda")
    outcomes = write_loveda(root / "Train" / "Urban")
    urban, out = root / "Train" / "Urban", root / "out"
    args = ["--input", urban / "index.csv", "--images_dir", urban, "--conditioning_dir", urban / "masks_png",
            "--conditioning_type", "mask", "--num_classes", 7, "--output_dir", out, "--resolution", SIDE,
            "--num_workers", 2]
    result = run_script(CREATE, args)
    assert result.returncode == 0, result.stderr
    assert format_script.main(["--caption_file", str(out / "captions.txt"),
                               "--output_file", str(out / "metadata.jsonl")]) == 0
    return urban, out, outcomes, [str(a) for a in args], result


def test_loveda_bad_rows_fail_with_their_reason_and_good_rows_are_kept(loveda):
    _, out, outcomes, _, result = loveda
    report = read_report(out)
    assert {f["row"]: f["reason"] for f in report["failures"]} == {n + 1: r for n, r in enumerate(outcomes) if r}
    assert all(f["detail"] for f in report["failures"])
    kept = [n + 1 for n, r in enumerate(outcomes) if r is None]
    assert [int(name[-10:-4]) for name, _ in read_captions(out)] == kept
    assert sorted(p.name for p in (out / "conditioning_images").iterdir()) == [f"image_{n:06d}.png" for n in kept]
    assert f"{len(kept)}/7 rows ok" in result.stdout


def test_loveda_masks_are_lossless_aligned_class_maps(loveda):
    urban, out, outcomes, _, _ = loveda
    for number in (n + 1 for n, r in enumerate(outcomes) if r is None):
        written = Image.open(out / "conditioning_images" / f"image_{number:06d}.png")
        assert (written.format, written.mode, written.size) == ("PNG", "L", (SIDE, SIDE))
        classes = np.asarray(written)
        assert np.array_equal(classes, expected_mask(layout(number))), "the image's crop, nearest neighbour"
        image = out / "rsicd_images" / f"image_{number:06d}.jpg"
        aligned, flipped = agreement(image, classes), agreement(image, classes[:, ::-1])
        assert aligned > 0.8 and aligned > flipped + 0.2, (aligned, flipped)


def test_loveda_metadata_names_each_conditioning_image(loveda):
    _, out, outcomes, _, _ = loveda
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    kept = [n + 1 for n, r in enumerate(outcomes) if r is None]
    assert [r["conditioning_image"] for r in records] == [f"conditioning_images/image_{n:06d}.png" for n in kept]
    assert all((out / r["conditioning_image"]).is_file() for r in records)
    report = json.loads((out / "format_report.json").read_text())
    assert report["images_with_conditioning"] == len(kept) and report["unlisted_images"] == []


def test_loveda_conditioning_json_describes_the_masks(loveda):
    _, out, outcomes, _, _ = loveda
    document = json.loads((out / "conditioning.json").read_text())
    kept = [n + 1 for n, r in enumerate(outcomes) if r is None]
    pixels = np.bincount(np.concatenate([expected_mask(layout(n)).ravel() for n in kept]), minlength=7)
    assert (document["type"], document["channels"], document["classes"]) == ("mask", 1, 7)
    assert document["rows"] == len(kept) and document["class_pixels"] == pixels.tolist()
    assert document["directory"] == "conditioning_images" and document["palette"] is None


def test_loveda_rerun_reuses_and_a_lost_mask_is_made_again(loveda):
    _, out, _, args, _ = loveda
    before = {name: (out / name).read_bytes() for name in ("conditioning_files.jsonl", "conditioning.json")}
    (out / "conditioning_images" / "image_000002.png").unlink()
    assert create.main(args) == 0
    report = read_report(out)
    assert (report["images_reused"], report["images_written"]) == (2, 1)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert np.array_equal(np.asarray(Image.open(out / "conditioning_images" / "image_000002.png")),
                          expected_mask(layout(2)))


def test_loveda_rerun_with_another_conditioning_is_refused_and_overwrite_without_one_clears_it(loveda, tmp_path):
    urban, out, _, args, _ = loveda
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.rglob("*"):
        target = copy / path.relative_to(out)
        target.mkdir(exist_ok=True) if path.is_dir() else target.write_bytes(path.read_bytes())
    moved = [str(copy) if a == str(out) else a for a in args]
    with pytest.raises(UsageError, match="conditioning"):
        create.main([a for a in moved if a != "--num_classes" and a != "7"])
    plain = ["--input", str(urban / "index.csv"), "--images_dir", str(urban), "--output_dir", str(copy),
             "--resolution", str(SIDE), "--num_workers", "1", "--overwrite"]
    assert create.main(plain) == 0
    assert not (copy / "conditioning.json").exists() and not (copy / "conditioning_files.jsonl").exists()
    assert list((copy / "conditioning_images").iterdir()) == []


def write_parquet(path: Path, rows: list) -> Path:
    """A Parquet of image bytes, text and a conditioning {bytes, path} struct."""
    schema = pa.schema([("image", pa.binary()), ("text", pa.string()),
                        ("mask", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_parquet_palette_masks_and_append(tmp_path):
    (tmp_path / "palette.json").write_text(json.dumps(PALETTE.tolist()))
    rows = [{"image": file_bytes(PALETTE[layout(n)]), "text": f"scene {n}",
             "mask": {"bytes": file_bytes(PALETTE[layout(n)]), "path": None}} for n in range(3)]
    rows[1]["mask"]["bytes"] = file_bytes(np.full((32, 48, 3), 7, np.uint8))
    first = write_parquet(tmp_path / "a.parquet", rows)
    second = write_parquet(tmp_path / "b.parquet", [rows[0], {**rows[2], "mask": None}])
    common = ["--output_dir", str(tmp_path / "o"), "--conditioning_column", "mask", "--conditioning_type", "mask",
              "--mask_palette", str(tmp_path / "palette.json"), "--resolution", str(SIDE), "--num_workers", "1"]
    assert create.main(["--input", str(first), *common]) == 0
    assert create.main(["--input", str(second), "--append", *common]) == 0
    report = read_report(tmp_path / "o")
    failures = {f["row"]: f["reason"] for f in report["failures"] + report["other_sources_failures"]}
    assert failures == {2: "conditioning_unknown_colour", 5: "conditioning_missing_image"}
    for number, scene in ((1, 0), (3, 2), (4, 0)):
        written = np.asarray(Image.open(tmp_path / "o" / "conditioning_images" / f"image_{number:06d}.png"))
        assert np.array_equal(written, expected_mask(layout(scene)))
    lines = (tmp_path / "o" / "conditioning_files.jsonl").read_text().splitlines()
    assert [json.loads(line)["file_name"] for line in lines] == [f"rsicd_images/image_{n:06d}.jpg" for n in (1, 3, 4)]
    document = json.loads((tmp_path / "o" / "conditioning.json").read_text())
    assert document["rows"] == 3 and document["palette"] == {str(i): c for i, c in enumerate(PALETTE.tolist())}
    assert document["classes"] == 7


def band_tiff(values: np.ndarray) -> bytes:
    """A float32 (height, width, bands) TIFF."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values, photometric="minisblack", planarconfig="contig")
    return buffer.getvalue()


def sar(number: int) -> np.ndarray:
    """Two SAR-like bands (VV, VH in dB) for scene number, 16 x 24."""
    rng = np.random.default_rng(number)
    return np.dstack([rng.normal(-10, 3, (16, 24)), rng.normal(-18, 4, (16, 24))]).astype(np.float32)


def write_shard(path: Path, count: int) -> None:
    """A webdataset shard: key.png image, key.txt caption, key.sar.tif bands (the last sample has none)."""
    with tarfile.open(path, "w") as tar:
        for number in range(count):
            members = {"png": file_bytes(PALETTE[layout(number, 24, 16)]), "txt": f"scene {number}".encode()}
            if number < count - 1:
                members["sar.tif"] = band_tiff(sar(number))
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{number:05d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_sar_bands_are_float32_with_folder_statistics(tmp_path):
    write_shard(tmp_path / "train-000.tar", 4)
    out = tmp_path / "o"
    assert create.main(["--input", str(tmp_path / "train-000.tar"), "--output_dir", str(out), "--conditioning_column",
                        "sar.tif", "--conditioning_type", "bands", "--conditioning_bands", "2,1", "--conditioning_norm",
                        "zscore", "--resolution", "16", "--resize_mode", "stretch", "--num_workers", "2"]) == 0
    assert {f["row"]: f["reason"] for f in read_report(out)["failures"]} == {4: "conditioning_missing_image"}
    written = [np.load(out / "conditioning_images" / f"image_{n + 1:06d}.npy") for n in range(3)]
    for number, array in enumerate(written):
        geometry = plan_geometry(24, 16, 16, "stretch")
        expected = [np.asarray(apply_geometry(Image.fromarray(sar(number)[..., b]), geometry,
                                              Image.Resampling.BILINEAR, 0.0)) for b in (1, 0)]
        assert array.dtype == np.float32 and array.shape == (2, 16, 16)
        assert np.array_equal(array, np.stack(expected)), "bands 2,1 in that order, float32, bilinear"
    document = json.loads((out / "conditioning.json").read_text())
    values = np.stack(written).transpose(1, 0, 2, 3).reshape(2, -1).astype(np.float64)
    assert (document["type"], document["channels"], document["bands"]) == ("bands", 2, [2, 1])
    assert document["normalisation"]["mode"] == "zscore"
    assert document["normalisation"]["offset"] == pytest.approx(values.mean(1).tolist())
    assert document["normalisation"]["scale"] == pytest.approx(values.std(1).tolist())
    assert [b["min"] for b in document["statistics"]["bands"]] == pytest.approx(values.min(1).tolist())
    records = [json.loads(line) for line in (out / "conditioning_files.jsonl").read_text().splitlines()]
    assert [r["conditioning_image"] for r in records] == [f"conditioning_images/image_{n:06d}.npy" for n in (1, 2, 3)]


def test_jsonl_conditioning_paths_resolve_like_images_and_cannot_escape(tmp_path):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    (src / "hint").mkdir()
    (tmp_path / "secret.png").write_bytes(file_bytes(np.zeros((32, 48, 3), np.uint8)))
    hints = []
    for number in range(3):
        Image.fromarray(PALETTE[layout(number)]).save(src / "img" / f"{number}.png")
        hint = np.random.default_rng(number).integers(0, 256, (16, 24, 3), dtype=np.uint8)  # half size
        Image.fromarray(hint).save(src / "hint" / f"{number}.png")
        hints.append(hint)
    entries = [{"file_name": f"img/{n}.png", "text": f"scene {n}", "hint": h} for n, h in
               enumerate(["hint/0.png", "../secret.png", "hint/missing.png"])]
    (src / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = tmp_path / "o"
    assert create.main(["--input", str(src / "index.jsonl"), "--output_dir", str(out), "--conditioning_column", "hint",
                        "--resolution", str(SIDE), "--num_workers", "1"]) == 0
    assert {f["row"]: f["reason"] for f in read_report(out)["failures"]} == {
        2: "conditioning_unsafe_path", 3: "conditioning_missing_image"}
    written = np.asarray(Image.open(out / "conditioning_images" / "image_000001.png"))
    geometry = plan_geometry(48, 32, SIDE, "center_crop")
    expected = apply_geometry(Image.fromarray(hints[0]), scale_geometry(geometry, (48, 32), (24, 16)), RESAMPLE)
    assert written.shape == (SIDE, SIDE, 3) and np.array_equal(written, np.asarray(expected))
    assert json.loads((out / "conditioning.json").read_text())["channels"] == 3


@pytest.mark.parametrize("extra, named", [
    (["--conditioning_column", "mask", "--conditioning_dir", "."], "not both"),
    (["--conditioning_column", "nope"], "'nope'"),
    (["--conditioning_column", "mask", "--mask_palette", "p.json"],
     "--mask_palette p.json needs --conditioning_type mask"),
    (["--conditioning_column", "mask", "--conditioning_bands", "1,2"], "--conditioning_bands"),
    (["--conditioning_column", "mask", "--conditioning_norm", "zscore"], "--conditioning_norm zscore"),
    (["--conditioning_column", "mask", "--conditioning_type", "mask", "--mask_palette", "bad.json"], "bad.json"),
    (["--conditioning_column", "mask", "--conditioning_type", "mask", "--mask_palette", "none.json"], "none.json"),
    (["--conditioning_column", "mask", "--conditioning_type", "mask", "--num_classes", "0"], "--num_classes"),
    (["--conditioning_column", "mask", "--conditioning_type", "mask", "--num_classes", "2", "--mask_palette",
      "p.json"], "class 2"),
    (["--conditioning_type", "mask"], "needs --conditioning_column or --conditioning_dir"),
    (["--conditioning_dir", "missing_dir"], "missing_dir"),
    (["--conditioning_dir", "empty_dir"], "empty_dir"),
])
def test_usage_errors(tmp_path, monkeypatch, extra, named):
    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path / "s.parquet", [{"image": file_bytes(PALETTE[layout(0)]), "text": "a",
                                           "mask": {"bytes": file_bytes(layout(0)), "path": None}}])
    (tmp_path / "p.json").write_text("[[0, 0, 0], [1, 1, 1], [2, 2, 2]]")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UsageError, match=named.replace("(", r"\(")):
        create.main(["--input", "s.parquet", "--output_dir", "o", *extra])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("form, extra", [("webdataset", ["--conditioning_column", "mask.png"]),
                                         ("csv", ["--conditioning_column", "mask"])])
def test_a_column_or_member_the_source_lacks_is_a_usage_error(tmp_path, form, extra):
    if form == "webdataset":
        write_shard(tmp_path / "s.tar", 2)
        source = tmp_path / "s.tar"
    else:
        Image.fromarray(PALETTE[layout(0)]).save(tmp_path / "0.png")
        (tmp_path / "s.csv").write_text("file_name,text\n0.png,a\n")
        source = tmp_path / "s.csv"
    with pytest.raises(UsageError, match="mask"):
        create.main(["--input", str(source), "--output_dir", str(tmp_path / "o"), *extra])


def test_the_usage_error_is_one_line_exit_two_as_users_see_it(tmp_path, run_script):
    """The script itself (not only main()) turns a conditioning usage error into one line and exit 2."""
    write_parquet(tmp_path / "s.parquet", [])
    result = run_script(CREATE, ["--input", tmp_path / "s.parquet", "--output_dir", tmp_path / "o",
                                 "--conditioning_column", "mask", "--conditioning_dir", tmp_path])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "not both" in result.stderr


def test_sample_layout_scenes_make_a_mask_conditioned_folder(tmp_path):
    """sample_data.py --masks -> create.py --conditioning_column mask: every row kept, its mask aligned with it."""
    from diffusion_model.sample_data import LAYOUT_CLASSES, make_sample_parquet

    source = make_sample_parquet(tmp_path / "s.parquet", 4, seed=1, masks=True)
    out = tmp_path / "o"
    assert create.main(["--input", str(source), "--output_dir", str(out), "--conditioning_column", "mask",
                        "--conditioning_type", "mask", "--num_classes", str(len(LAYOUT_CLASSES)), "--resolution", "32",
                        "--num_workers", "1"]) == 0
    assert read_report(out)["rows_failed"] == 0
    colours = np.array([colour for _, colour in LAYOUT_CLASSES], int)
    for number in range(1, 5):
        classes = np.asarray(Image.open(out / "conditioning_images" / f"image_{number:06d}.png"))
        pixels = np.asarray(Image.open(out / "rsicd_images" / f"image_{number:06d}.jpg").convert("RGB")).astype(int)
        nearest = np.abs(pixels[:, :, None] - colours[None, None]).sum(-1).argmin(-1)
        assert (nearest == classes).mean() > 0.8
    assert json.loads((out / "conditioning.json").read_text())["classes"] == len(LAYOUT_CLASSES)
