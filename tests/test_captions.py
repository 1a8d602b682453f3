"""Caption cleaning: whitespace, junk, near-duplicates, modes."""

import pytest

from diffusion_model.captions import clean_caption, dedup_key, select_captions


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  a road .  ", "a road ."),
        ("two\tfields\nand\r\na river", "two fields and a river"),
        ("line\u2028separator\x85next\x0bvertical", "line separator next vertical"),
        ("many   spaces", "many spaces"),
        ("中文 河流", "中文 河流"),
        ("ein Fluß über Äcker", "ein Fluß über Äcker"),
    ],
)
def test_clean_caption_normalises_whitespace(raw, expected):
    assert clean_caption(raw) == expected


@pytest.mark.parametrize("raw", [" .", "", "   ", "ab.", "1 2 3 4", None, 42, b"bytes caption"])
def test_clean_caption_drops_junk(raw):
    assert clean_caption(raw) is None


def test_clean_caption_keeps_three_letters():
    assert clean_caption(" abc ") == "abc"


def test_dedup_key_ignores_case_and_punctuation():
    assert dedup_key("Large green fields are near lakes.") == dedup_key("large green fields are near lakes .")
    assert dedup_key("a road") != dedup_key("a roads")


def test_select_first_skips_junk():
    assert select_captions([" .", "  A pond\t.", "a pond"], "first") == ["A pond\t.".replace("\t", " ")]


def test_select_all_dedups_in_first_seen_order():
    raw = ["b river .", " .", "A field .", "B River.", "a field", "c road"]
    assert select_captions(raw, "all") == ["b river .", "A field .", "c road"]


def test_select_accepts_string_and_null():
    assert select_captions("one caption", "all") == ["one caption"]
    assert select_captions(None, "all") == []
    assert select_captions([None, " ."], "first") == []


def test_select_rejects_unknown_mode():
    with pytest.raises(ValueError, match="sometimes"):
        select_captions(["a road"], "sometimes")
