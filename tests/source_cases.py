"""Writers of every caption source form from the project's sample scenes (diffusion_model/sample_data.py), each with
a few hostile rows, and the outcome each row must have: its 1-based row number -> expected failure reason (None =
a good row) and the caption create.py must keep. Each also carries per-image metadata the way its form does
(columns, .json members, fMoW-style sidecars), see scene_metadata.

Forms: Karpathy JSON (three splits, .tif images in a subfolder), NWPU-Captions JSON (per-class folders), CSV,
JSONL, and webdataset tar shards.
"""

import csv
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from diffusion_model.captions import select_captions
from diffusion_model.sample_data import make_sample_row


def scene(index: int, seed: int = 3) -> tuple:
    """(scene class, RGB image, RSICD-like captions: junk " ." and a case/punctuation repeat among them)."""
    row = make_sample_row(index, seed)
    image = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
    name = row["filename"].rpartition("/")[2]
    return name.rpartition("_")[0], image, row["captions"]


def scene_metadata(index: int) -> dict:
    """Metadata of scene `index` as a source would hold it (gsd in metres of the 224 px scene, lat, date); scene 1's
    latitude is not a number, so create.py drops that field alone and reports it."""
    return {"gsd": 0.5 * (index + 1), "lat": "north" if index == 1 else 10.0 + index, "date": f"2020-0{index + 1}-01"}


def first_caption(captions) -> str:
    """The caption create.py keeps by default."""
    return select_captions(captions)[0]


def save(image: Image.Image, path: Path, fmt: str) -> None:
    """Write an image file, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


SPLIT_OF = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


def write_karpathy(root: Path, per_split: int = 3) -> dict:
    """dataset_test.json + imgs/*.tif; splits train, val (once spelt "valid"), test.

    Returns {split: [(reason, caption), ...]} in row order. Hostile train entries: a missing file, a '..' name, an
    absolute name, sentences that are all junk; and an entry that is not an object, which has no split and so is
    a failed row of every split.
    """
    outcomes, index = [], 0
    for split in ("train", "val", "test"):
        for _ in range(per_split):
            _, image, captions = scene(index)
            name = f"{index:05d}.tif"
            save(image, root / "imgs" / name, "TIFF")
            sentences = [{"raw": c, "tokens": c.split(), "imgid": index, "sentid": 5 * index + i}
                         for i, c in enumerate(captions)]
            entry = {"filename": name, "imgid": index, "split": split, "sentences": sentences,
                     "sentids": [s["sentid"] for s in sentences]}
            if index < 2:  # fMoW's keys; the third train image has no sidecar (its row is kept, the gap reported)
                sidecar = {"gsd": 0.3 * (index + 1), "timestamp": f"2016-07-0{index + 1}T10:00:00Z",
                           "raw_location": "POLYGON ((10 40, 12 40, 12 42, 10 42, 10 40))"}
                (root / "imgs").mkdir(parents=True, exist_ok=True)
                (root / "imgs" / f"{index:05d}.json").write_text(json.dumps(sidecar), encoding="utf-8")
            outcomes.append((entry, (None, first_caption(captions))))
            index += 1
    outcomes += [({"filename": "gone.tif", "split": "train", "sentences": [{"raw": "a lost field ."}]},
                  ("missing_image", None)),
                 ({"filename": "../escape.tif", "split": "train", "sentences": [{"raw": "an escape ."}]},
                  ("unsafe_path", None)),
                 ({"filename": "/etc/passwd", "split": "train", "sentences": [{"raw": "an absolute one ."}]},
                  ("unsafe_path", None)),
                 ({"filename": "00000.tif", "split": "train", "sentences": [{"raw": " ."}, {"raw": ""}]},
                  ("no_caption", None)),
                 ("not an object", ("bad_entry", None))]
    save(scene(0)[1], root / "escape.tif", "TIFF")  # where imgs/../escape.tif leads
    first_val = outcomes[per_split]
    outcomes.append(({**first_val[0], "split": "valid"}, first_val[1]))
    images = [entry for entry, _ in outcomes]
    (root / "dataset_test.json").write_text(json.dumps({"images": images, "dataset": "sample"}), encoding="utf-8")
    return {split: [outcome for entry, outcome in outcomes
                    if not isinstance(entry, dict) or entry["split"] in SPLIT_OF[split]] for split in SPLIT_OF}


def write_nwpu(root: Path, per_class: int = 2) -> list:
    """dataset_nwpu.json + NWPU_images/<class>/<file>.jpg; all train but one test entry per class.

    Returns the train rows' [(reason, caption)] in file order; the last class holds a missing file.
    """
    doc, expected, index = {}, [], 0
    for scene_name in ("farmland", "river", "pond"):
        entries = []
        for n in range(per_class + 1):
            _, image, captions = scene(index)
            filename = f"{scene_name}_{n + 1:03d}.jpg"
            save(image, root / "NWPU_images" / scene_name / filename, "JPEG")
            raws = {"raw": captions[0], **{f"raw_{i}": c for i, c in enumerate(captions[1:5], start=1)}}
            split = "test" if n == per_class else "train"
            entries.append({"filename": filename, "split": split, **raws, "imgid": index})
            if split == "train":
                expected.append((None, first_caption(list(raws.values()))))
            index += 1
        doc[scene_name] = entries
    doc["pond"].append({"filename": "pond_999.jpg", "split": "train", "raw": "a pond that is not there ."})
    expected.append(("missing_image", None))
    (root / "dataset_nwpu.json").write_text(json.dumps(doc), encoding="utf-8")
    return expected


def table_rows(root: Path, count: int = 4) -> tuple:
    """Images under root/images/ and the index rows for them plus hostile ones: (rows, expected)."""
    rows, expected = [], []
    for index in range(count):
        _, image, captions = scene(index)
        name = f"images/scene_{index}.png"
        save(image, root / name, "PNG")
        meta = scene_metadata(index)
        rows.append({"file_name": name, "text": captions[1], "res": meta["gsd"], "latitude": meta["lat"],
                     "acquired": meta["date"]})
        expected.append((None, first_caption([captions[1]])))
    # Real images where an escaping name would lead, so a reader that follows the name would keep a bad row.
    save(scene(0)[1], root.parent / "outside.png", "PNG")
    (root / "images" / "link.png").symlink_to(root.parent / "outside.png")
    for row, reason in (({"file_name": "images/missing.png", "text": "a missing scene ."}, "missing_image"),
                        ({"file_name": "images/link.png", "text": "a link out of the folder ."}, "unsafe_path"),
                        ({"file_name": "../outside.png", "text": "an escape ."}, "unsafe_path"),
                        ({"file_name": "images/scene_0.png", "text": " ."}, "no_caption"),
                        ({"file_name": "", "text": "no name at all ."}, "bad_entry")):
        rows.append(row)
        expected.append((reason, None))
    return rows, expected


def write_csv(root: Path) -> list:
    """index.csv (file_name,text) beside images/; returns expected outcomes."""
    rows, expected = table_rows(root)
    with open(root / "index.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["file_name", "text", "res", "latitude", "acquired"])
        writer.writeheader()
        writer.writerows(rows)
    return expected


def write_jsonl(root: Path) -> list:
    """index.jsonl with keys filename and caption (a list), plus a broken line; returns expected outcomes."""
    rows, expected = table_rows(root)
    lines = [json.dumps({"filename": r["file_name"], "caption": [r["text"]],
                         **{k: r[k] for k in ("res", "latitude", "acquired") if k in r}}) for r in rows] + ["{broken"]
    (root / "index.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return expected + [("bad_entry", None)]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one in-memory file to a tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(image: Image.Image) -> bytes:
    """JPEG bytes of an image."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_webdataset(root: Path, per_shard: int = 3) -> list:
    """Two shards: captions as .caption, .txt and .json; RS5M's .img_content; a sample with no caption member and
    one with no image. Returns expected outcomes in shard order."""
    root.mkdir(parents=True, exist_ok=True)
    expected, index = [], 0
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
            for n in range(per_shard):
                _, image, captions = scene(index)
                key = f"s{shard}/{index:06d}"
                image_ext = "img_content" if n == 1 else "jpg"
                add_member(tar, f"{key}.{image_ext}", jpeg_bytes(image))
                caption = first_caption(captions)
                kind = ("caption", "txt", "json")[n % 3]
                meta = {"res": scene_metadata(index)["gsd"], "width": 224}
                payload = json.dumps({"caption": caption, **meta}) if kind == "json" else caption
                add_member(tar, f"{key}.{kind}", payload.encode("utf-8"))
                if kind != "json":  # metadata in a .json member beside the caption member
                    add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                expected.append((None, caption))
                index += 1
            if shard == 0:
                add_member(tar, "s0/nocaption.jpg", jpeg_bytes(scene(index)[1]))
                add_member(tar, "s0/nocaption.json", json.dumps({"width": 224}).encode())
                expected.append(("no_caption", None))
            else:
                add_member(tar, "s1/noimage.caption", b"a caption without its image .")
                expected.append(("missing_image", None))
    return expected
