"""format.py: line checks, grouping, relative names, atomic all-or-nothing output, and loading with datasets."""

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from diffusion_model.metadata import (accept_conditioning, accept_metadata, build_record, image_files, parse_line,
                                      parse_lines, relative_name, sidecar_entries, unsafe_name_reason)
from format_cases import CASES, build_case, golden, outputs
from parquet_cases import write_odd_shards

CREATE, FORMAT = "diffusion_model/create.py", "diffusion_model/format.py"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("../x.jpg", "'..' in path"),
        ("rsicd_images/../../x.jpg", "'..' in path"),
        ("a\\..\\b.jpg", "'..' in path"),
        ("/etc/passwd", "absolute path"),
        ("http://example.com/x.jpg", "URL scheme or drive"),
        ("s3://bucket/x.jpg", "URL scheme or drive"),
        ("C:\\images\\x.jpg", "URL scheme or drive"),
        ("rsicd_images/image_000001.jpg", None),
        ("odd..name.jpg", None),
    ],
)
def test_unsafe_names(name, reason):
    assert unsafe_name_reason(name) == reason


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"no tab here", "no tab"),
        (b"\ta caption", "empty image name"),
        (b"a.jpg\t   ", "empty caption"),
        (b"a.jpg\t\xff\xfe caption", "UTF-8"),
        (b"../a.jpg\tcaption", "unsafe"),
    ],
)
def test_parse_line_rejects(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_line(raw)


def test_parse_line_strips_and_keeps_unicode():
    assert parse_line("a.jpg\t  été 河流 \r".encode()) == ("a.jpg", "été 河流")


def test_parse_line_collapses_whitespace_inside_a_caption_as_create_does():
    """A tab, a run of spaces or a line separator inside a caption become one space, as create.py writes them."""
    from diffusion_model.captions import clean_caption

    raw = "a pond\tnear  a road\u2028and\x0bfields "
    assert parse_line(f"a.jpg\t{raw}\r".encode()) == ("a.jpg", "a pond near a road and fields")
    assert parse_line(f"a.jpg\t{raw}".encode())[1] == clean_caption(raw)


def test_parse_lines_numbers_good_lines_and_records_bad_ones():
    lines = [b"b.jpg\tb one", b"a.jpg\ta one", b"", b"b.jpg\tb two", b"bad line"]
    problems = []
    assert list(parse_lines(lines, problems)) == [(1, "b.jpg", "b one"), (2, "a.jpg", "a one"), (4, "b.jpg", "b two")]
    assert [(p.line, p.text) for p in problems] == [(5, "bad line")]


def test_build_record_text_type_and_relative_names(tmp_path):
    assert build_record("i/a.jpg", ["x"], False) == {"file_name": "i/a.jpg", "text": "x"}
    assert build_record("i/b.jpg", ["y", "z"], True) == {"file_name": "i/b.jpg", "text": ["y", "z"]}
    assert build_record("a.jpg", ["x"], True, None, {}, None, True) == {"file_name": "a.jpg", "text": ["x"],
                                                                         "source_file": None}
    assert relative_name("./i/a.jpg", tmp_path / "sub", tmp_path) == "sub/i/a.jpg"


def test_image_files_finds_what_rglob_finds(tmp_path):
    """Image suffixes in any case, symlinks to files; not a folder named like an image, nor a symlinked folder."""
    for name in ("a.jpg", "sub/b.PNG", "sub/deep/c.tiff", "x.jpg/d.webp", "notes.txt", ".hidden.gif", ".jpg", "..png",
                 "e."):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    (tmp_path / "linked_dir").symlink_to(tmp_path / "sub")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    expected = {p for p in tmp_path.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".tiff", ".webp", ".gif")
                and p.is_file()}
    assert set(map(Path, image_files(str(tmp_path)))) == expected and len(expected) == 7


def load_imagefolder(data_dir: Path, cache_dir: Path):
    """Load DATA_DIR with the datasets imagefolder loader, offline, caching under cache_dir."""
    return datasets.load_dataset("imagefolder", data_dir=str(data_dir), cache_dir=str(cache_dir), split="train")


def test_create_then_format_loads_with_imagefolder(tmp_path, run_script):
    write_odd_shards(tmp_path / "shards")
    output_dir = tmp_path / "out"
    created = run_script(CREATE, ["--parquet_path", tmp_path / "shards", "--output_dir", output_dir, "--resolution", 32,
                                  "--caption_mode", "all", "--num_workers", 2])
    assert created.returncode == 0, created.stderr
    formatted = run_script(FORMAT, ["--caption_file", "out/captions.txt", "--output_file", "out/metadata.jsonl"],
                           cwd=tmp_path)
    assert formatted.returncode == 0, formatted.stderr
    records = [json.loads(line) for line in (output_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 10 and all(isinstance(r["text"], list) for r in records)
    assert records[7] == {"file_name": "rsicd_images/image_000013.jpg",
                          "text": ["河流 und Flußufer — été", "second caption ."], "source_file": "rsicd_images/unicode.jpg"}
    assert "河流" in (output_dir / "metadata.jsonl").read_text(encoding="utf-8"), "ensure_ascii must be off"
    assert json.loads((output_dir / "format_report.json").read_text())["source_files"] == 10

    dataset = load_imagefolder(output_dir, tmp_path / "cache")
    assert dataset.num_rows == 10 and dataset.column_names == ["image", "text", "source_file"]
    assert dataset[0]["source_file"] == "rsicd_images/gray.jpg"
    assert dataset[7]["text"] == ["河流 und Flußufer — été", "second caption ."]
    assert isinstance(dataset[0]["image"], Image.Image) and dataset[0]["image"].size == (32, 32)


def make_folder(root: Path, lines: list) -> Path:
    """A data folder with images a, b, c under rsicd_images/ and a captions.txt of the given lines."""
    (root / "rsicd_images").mkdir(parents=True)
    for letter in "abc":
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "rsicd_images" / f"{letter}.jpg")
    (root / "captions.txt").write_bytes(b"\n".join(lines) + b"\n")
    return root


BAD_LINES = [
    b"rsicd_images/a.jpg\ta first caption",
    b"just words without a tab",
    b"\tno name",
    b"rsicd_images/a.jpg\t   ",
    b"../outside.jpg\tescape",
    b"/abs/path.jpg\tabsolute",
    b"https://example.com/x.jpg\turl",
    b"rsicd_images/missing.jpg\tnot there",
    b"rsicd_images/b.jpg\tb caption",
]


def test_bad_lines_fail_and_write_nothing(tmp_path, run_script):
    folder = make_folder(tmp_path / "d", BAD_LINES)
    (folder / "metadata.jsonl").write_text("previous\n")
    result = run_script(FORMAT, ["--caption_file", folder / "captions.txt", "--output_file", folder / "metadata.jsonl"])
    assert result.returncode == 1
    for line in range(2, 9):
        assert f"line {line}:" in result.stderr
    assert "line 1:" not in result.stderr and "line 9:" not in result.stderr
    assert (folder / "metadata.jsonl").read_text() == "previous\n"
    assert not (folder / "format_report.json").exists()


def test_skip_invalid_reports_and_goes_on(tmp_path, run_script):
    folder = make_folder(tmp_path / "d", BAD_LINES)
    args = ["--caption_file", folder / "captions.txt", "--output_file", folder / "metadata.jsonl", "--skip_invalid"]
    result = run_script(FORMAT, args)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert records == [{"file_name": "rsicd_images/a.jpg", "text": "a first caption"},
                       {"file_name": "rsicd_images/b.jpg", "text": "b caption"}]
    report = json.loads((folder / "format_report.json").read_text())
    assert [p["line"] for p in report["skipped_lines"]] == list(range(2, 9))
    assert report["skipped_lines"][6]["reason"] == "image not found"
    assert report["unlisted_images"] == ["rsicd_images/c.jpg"]
    assert "rsicd_images/c.jpg" in result.stderr
    assert list((folder).glob("*.tmp")) == []


def test_output_above_caption_folder_rewrites_names(tmp_path, run_script):
    folder = make_folder(tmp_path / "data" / "part", [b"rsicd_images/a.jpg\tonly a", b"rsicd_images/b.jpg\tonly b",
                                                      b"rsicd_images/c.jpg\tonly c"])
    result = run_script(FORMAT, ["--caption_file", folder / "captions.txt", "--output_file", tmp_path / "data" / "m.jsonl"])
    assert result.returncode == 0, result.stderr
    names = [json.loads(line)["file_name"] for line in (tmp_path / "data" / "m.jsonl").read_text().splitlines()]
    assert names == ["part/rsicd_images/a.jpg", "part/rsicd_images/b.jpg", "part/rsicd_images/c.jpg"]


@pytest.mark.parametrize(
    "caption_file, output_file, named",
    [
        ("nope/captions.txt", "d/metadata.jsonl", "nope/captions.txt"),
        ("d/captions.txt", "elsewhere/metadata.jsonl", "elsewhere/metadata.jsonl"),
    ],
)
def test_usage_errors(tmp_path, run_script, caption_file, output_file, named):
    make_folder(tmp_path / "d", [b"rsicd_images/a.jpg\ta"])
    result = run_script(FORMAT, ["--caption_file", caption_file, "--output_file", output_file], cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content", [b"", b"\n \n\r\n"])
def test_empty_caption_file_is_a_usage_error(tmp_path, run_script, content):
    """A captions.txt with no line at all (or only blank ones) is one line naming it, exit 2, nothing written."""
    (tmp_path / "captions.txt").write_bytes(content)
    result = run_script(FORMAT, ["--caption_file", tmp_path / "captions.txt", "--output_file",
                                 tmp_path / "metadata.jsonl"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "captions.txt") in lines[0] and "empty" in lines[0]
    assert not (tmp_path / "metadata.jsonl").exists()


def test_source_files_join_metadata_and_an_image_without_one_gets_null(tmp_path, run_script):
    """source_files.jsonl beside captions.txt: each record gets its image's source_file (null when the sidecar does
    not name it, so every line has the same keys); a broken sidecar line is counted in the report and logged."""
    folder = make_folder(tmp_path / "d", [b"rsicd_images/a.jpg\tfirst", b"rsicd_images/b.jpg\tsecond",
                                          b"rsicd_images/c.jpg\tthird"])
    sidecar = [json.dumps({"file_name": "rsicd_images/a.jpg", "source_file": "airport_1.jpg"}), "{broken",
               json.dumps({"file_name": "rsicd_images/c.jpg", "source_file": "farmland_2009_00.jpg"})]
    (folder / "source_files.jsonl").write_text("\n".join(sidecar) + "\n")
    values = [json.dumps({"file_name": "rsicd_images/b.jpg", "metadata": {"gsd": 0.6, "date": "2021"}}),
              json.dumps({"file_name": "rsicd_images/c.jpg", "metadata": [1]})]
    (folder / "metadata_values.jsonl").write_text("\n".join(values) + "\n")
    result = run_script(FORMAT, ["--caption_file", folder / "captions.txt", "--output_file", folder / "metadata.jsonl"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["source_file"] for r in records] == ["airport_1.jpg", None, "farmland_2009_00.jpg"]
    assert [r.get("metadata") for r in records] == [None, {"gsd": 0.6, "date": "2021"}, None]
    assert "metadata" not in records[0], "an image without metadata has no key, not zeros"
    report = json.loads((folder / "format_report.json").read_text())
    assert report["source_files"] == 2 and report["source_files_bad_lines"] == [2]
    assert report["images_with_metadata"] == 1 and report["metadata_values_bad_lines"] == [2]
    assert "source_files.jsonl line 2" in result.stderr and "metadata_values.jsonl line 2" in result.stderr


def test_without_source_files_metadata_keeps_its_two_keys(tmp_path, run_script):
    """A folder from an older create.py (or hand-made): no sidecar, no source_file key."""
    folder = make_folder(tmp_path / "d", [b"rsicd_images/a.jpg\tfirst"])
    (folder / "rsicd_images" / "b.jpg").unlink()
    (folder / "rsicd_images" / "c.jpg").unlink()
    result = run_script(FORMAT, ["--caption_file", folder / "captions.txt", "--output_file", folder / "metadata.jsonl"])
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "metadata.jsonl").read_text()) == {"file_name": "rsicd_images/a.jpg", "text": "first"}


def test_metadata_values_join_only_the_images_that_have_some():
    lines = ['{"file_name": "a.jpg", "metadata": {"gsd": 0.6}}', "", '{"file_name": "b.jpg"}', "[]",
             '{"file_name": "c.jpg", "metadata": {}}']
    bad = []
    values = dict(sidecar_entries(lines, "metadata", accept_metadata, bad))
    assert values == {"a.jpg": {"gsd": 0.6}, "c.jpg": {}} and bad == [3, 4]
    records = [build_record(name, [text], False, metadata=values.get(name))
               for name, text in (("a.jpg", "x"), ("b.jpg", "y"), ("c.jpg", "z"))]
    assert records == [{"file_name": "a.jpg", "text": "x", "metadata": {"gsd": 0.6}},
                       {"file_name": "b.jpg", "text": "y"}, {"file_name": "c.jpg", "text": "z"}]


def test_conditioning_sidecar_refuses_unsafe_and_broken_lines():
    lines = ['{"file_name": "a.jpg", "conditioning_image": "conditioning_images/a.png", "class_counts": [3]}', "",
             '{"file_name": "b.jpg", "conditioning_image": "../b.png"}', "{broken",
             '{"file_name": "c.jpg", "conditioning_image": null}']
    bad = []
    names = dict(sidecar_entries(lines, "conditioning_image", accept_conditioning, bad))
    assert names == {"a.jpg": "conditioning_images/a.png"} and bad == [3, 4, 5]


def test_conditioning_sidecar_gives_every_line_its_conditioning_image_and_a_missing_one_is_a_bad_line(tmp_path):
    """format.py run in-process (create.py's end-to-end tests run it on real create.py folders)."""
    from diffusion_model.format import main

    folder = make_folder(tmp_path / "d", [b"rsicd_images/a.jpg\tfirst", b"rsicd_images/b.jpg\tsecond",
                                          b"rsicd_images/c.jpg\tthird"])
    (folder / "conditioning_images").mkdir()
    for letter in "ab":
        Image.new("L", (8, 8), 1).save(folder / "conditioning_images" / f"{letter}.png")
    (folder / "conditioning_files.jsonl").write_text("".join(
        json.dumps({"file_name": f"rsicd_images/{c}.jpg", "conditioning_image": f"conditioning_images/{c}.png"}) + "\n"
        for c in "abc"))
    arguments = ["--caption_file", str(folder / "captions.txt"), "--output_file", str(folder / "metadata.jsonl")]
    assert main(arguments) == 1 and not (folder / "metadata.jsonl").exists(), "c's conditioning file is missing"
    assert main(arguments + ["--skip_invalid"]) == 0
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert records == [{"file_name": f"rsicd_images/{c}.jpg", "text": text,
                        "conditioning_image": f"conditioning_images/{c}.png"} for c, text in (("a", "first"), ("b", "second"))]
    report = json.loads((folder / "format_report.json").read_text())
    assert report["skipped_lines"][0]["reason"] == "conditioning image conditioning_images/c.png not found"
    assert report["unlisted_images"] == ["rsicd_images/c.jpg"], "the conditioning images are listed, not strays"


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_matches_the_in_memory_implementation_byte_for_byte(tmp_path, capsys, case):
    """Tricky folders (tests/format_cases.py): metadata.jsonl, format_report.json, the exit code and the messages
    equal, byte for byte, what the format.py that held every line in memory wrote (tests/golden/format/)."""
    from diffusion_model.format import main

    arguments = build_case(case, tmp_path / "case")
    returncode = main(arguments)
    printed = capsys.readouterr()
    assert outputs(tmp_path / "case", returncode, printed.err + printed.out) == golden(case)


def test_memory_does_not_grow_with_the_lines(tmp_path):
    """3,000 images with a source_files.jsonl: Python's peak allocations stay under 1 MiB (0.5 here; the format.py
    that held every line in memory peaked at 7.3 MiB, about 2 KB a line); SQLite's own memory, not traced, is bounded
    by its page cache (metadata_store.CACHE_KIB)."""

    import gc
    import tracemalloc

    from diffusion_model.format import main

    (tmp_path / "img").mkdir()
    with open(tmp_path / "captions.txt", "w") as captions, open(tmp_path / "source_files.jsonl", "w") as sources:
        for number in range(3000):
            (tmp_path / "img" / f"{number:06d}.jpg").touch()
            captions.write(f"img/{number:06d}.jpg\tscene {number} of a river beside farmland and a road\n")
            sources.write(json.dumps({"file_name": f"img/{number:06d}.jpg", "source_file": f"s{number}.jpg"}) + "\n")
    gc.collect()  # earlier tests' garbage, whose finalizers would allocate while traced
    tracemalloc.start()
    try:
        assert main(["--caption_file", str(tmp_path / "captions.txt"), "--output_file",
                     str(tmp_path / "metadata.jsonl")]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 3000
