"""stand_in/text_fit.py: the contrastive fit makes a random text encoder tell captions of different-looking images
apart (a random one barely does), writes it back whole, counts unusable records, and bad command lines are
one-line errors."""

import json
import shutil

import pytest
import torch
from PIL import Image

from stand_in import text_fit
from stand_in.tiny_model import build_tiny_pipeline
from utils.cli import UsageError

# Two looks, each with captions that share most of their characters with the other look's captions.
LOOKS = {
    "red": ((200, 40, 30), ["an aerial view of red roofs .", "many red roofs in a dense area .",
                            "an aerial view of red roofs and a road ."]),
    "blue": ((30, 60, 200), ["an aerial view of blue water .", "much blue water in a calm area .",
                             "an aerial view of blue water and a road ."]),
}


@pytest.fixture()
def data_dir(tmp_path):
    """format.py's layout: images and a metadata.jsonl, three captions per look, one record per image."""
    (tmp_path / "rsicd_images").mkdir()
    lines = []
    for look, (colour, captions) in LOOKS.items():
        for i, caption in enumerate(captions):
            name = f"rsicd_images/{look}_{i}.jpg"
            Image.new("RGB", (16, 16), colour).save(tmp_path / name)
            lines.append(json.dumps({"file_name": name, "text": caption}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def cross_minus_within(text_encoder, tokenizer) -> float:
    """Mean similarity of captions across looks minus within a look (negative: the looks are told apart)."""
    red, blue = LOOKS["red"][1], LOOKS["blue"][1]
    sim = text_fit.caption_similarity(text_encoder, tokenizer, red + blue)
    n = len(red)
    within = torch.cat([sim[:n, :n][~torch.eye(n, dtype=bool)], sim[n:, n:][~torch.eye(n, dtype=bool)]]).mean()
    return float(sim[:n, n:].mean() - within)


def test_caption_of_takes_the_text_or_the_first_usable_of_a_list():
    assert text_fit.caption_of({"text": "a pond ."}) == "a pond ."
    assert text_fit.caption_of({"text": ["", "a pond .", "a lake ."]}) == "a pond ."
    assert text_fit.caption_of({"text": "  "}) is None and text_fit.caption_of({}) is None


def test_load_pairs_reads_images_and_counts_every_unusable_record(data_dir):
    with open(data_dir / "metadata.jsonl", "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"file_name": "rsicd_images/missing.jpg", "text": "a pond ."}) + "\n")
        handle.write(json.dumps({"file_name": "rsicd_images/red_0.jpg", "text": ""}) + "\n")
        handle.write(json.dumps({"text": "no file"}) + "\n")
    captions, features, skipped = text_fit.load_pairs(data_dir)
    assert len(captions) == 6 and skipped == 4
    assert features.shape == (6, 3 * text_fit.IMAGE_FEATURE_SIDE ** 2)
    assert features[0, 0] > 0.5 and features[3, 2] > 0.5  # red first, then blue, in file order


def test_a_folder_without_usable_pairs_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no metadata.jsonl"):
        text_fit.load_pairs(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="0 usable caption/image pair"):
        text_fit.load_pairs(tmp_path)


def test_the_contrastive_loss_is_lowest_when_each_caption_meets_its_own_image():
    embeds = torch.eye(4)
    assert text_fit.contrastive_loss(embeds, embeds) < text_fit.contrastive_loss(embeds, embeds.roll(1, 0))


def test_fitting_tells_the_looks_apart_where_the_random_encoder_does_not(data_dir):
    pipeline = build_tiny_pipeline(0)
    before = cross_minus_within(pipeline.text_encoder, pipeline.tokenizer)
    captions, features, _ = text_fit.load_pairs(data_dir)
    torch.manual_seed(0)
    text_fit.fit_text_encoder(pipeline.text_encoder, pipeline.tokenizer, captions, features, steps=40,
                              batch_size=6)
    after = cross_minus_within(pipeline.text_encoder, pipeline.tokenizer)
    assert before > -0.05, before  # random: across looks about as similar as within one
    assert after < before - 0.2, (before, after)


def test_main_writes_the_fitted_text_encoder_back_whole(tiny_model_dir, data_dir, tmp_path):
    from transformers import CLIPTextModel

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert text_fit.main([str(model), str(data_dir), "--steps", "3", "--batch_size", "4"]) == 0
    fitted = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    original = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    assert not torch.equal(fitted.get_input_embeddings().weight, original.get_input_embeddings().weight)
    assert sorted(p.name for p in model.iterdir() if p.name.startswith("text_encoder")) == ["text_encoder"]


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps"),
    (["--batch_size", "0"], "--batch_size"),
])
def test_bad_flags_are_one_line_errors(run_script, tiny_model_dir, data_dir, argv, message):
    done = run_script("stand_in/text_fit.py", [tiny_model_dir, data_dir, *argv])
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_a_folder_without_a_text_encoder_is_refused(run_script, data_dir, tmp_path):
    done = run_script("stand_in/text_fit.py", [tmp_path, data_dir])
    assert done.returncode == 2 and "no text_encoder/config.json" in done.stderr and "Traceback" not in done.stderr
