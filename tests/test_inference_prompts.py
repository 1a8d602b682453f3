"""inference/prompts.py: prompts from flags and a file, and the (prompt, seed) plan with one seed per image."""

import pytest
import torch

from inference.prompts import (MAX_DRAWN_SEED, MAX_SEED, base_seed, collect_prompts, plan_images,
                               read_prompts_file)
from utils.cli import UsageError


def write(path, text: str, encoding: str = "utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_prompts_file_is_one_stripped_prompt_per_line_blank_lines_skipped(tmp_path):
    path = write(tmp_path / "p.txt", "  a harbour  \n\n   \nun champ de blé près d'une rivière\r\nlast line")
    assert read_prompts_file(str(path)) == ["a harbour", "un champ de blé près d'une rivière", "last line"]


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: d, "is a folder"),
    (lambda d: write(d / "latin1.txt", "blé", encoding="latin-1"), "is not UTF-8"),
])
def test_unreadable_prompts_file_is_a_usage_error_naming_it(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(UsageError) as caught:
        read_prompts_file(str(path))
    assert f"--prompts_file '{path}'" in str(caught.value) and expected in str(caught.value)


def test_flag_prompts_come_first_then_the_files(tmp_path):
    path = write(tmp_path / "p.txt", "from file 1\nfrom file 2\n")
    assert collect_prompts([" flag 1 ", "flag 2"], str(path)) == ["flag 1", "flag 2", "from file 1", "from file 2"]


def test_file_alone_or_flags_alone_are_enough(tmp_path):
    assert collect_prompts(None, str(write(tmp_path / "p.txt", "only\n"))) == ["only"]
    assert collect_prompts(["just this"], None) == ["just this"]


def test_blank_prompt_flag_is_refused():
    with pytest.raises(UsageError, match="--prompt '' is empty"):
        collect_prompts(["fine", "   "], None)


def test_prompts_file_of_blank_lines_is_refused(tmp_path):
    path = write(tmp_path / "blank.txt", "\n   \n\n")
    with pytest.raises(UsageError, match="holds no prompt"):
        collect_prompts(["a flag prompt does not excuse an empty file"], str(path))


def test_no_prompt_at_all_is_refused():
    with pytest.raises(UsageError, match="no prompt: pass --prompt"):
        collect_prompts(None, None)


def test_given_seed_is_kept_and_negative_refused():
    assert base_seed(0) == 0 and base_seed(1234) == 1234
    with pytest.raises(UsageError, match="--seed -1"):
        base_seed(-1)


def test_drawn_seeds_are_random_and_below_the_bound():
    drawn = [base_seed(None) for _ in range(20)]
    assert all(0 <= seed < MAX_DRAWN_SEED for seed in drawn)
    assert len(set(drawn)) > 1


def test_plan_is_prompt_major_with_seed_plus_index():
    assert plan_images(["a", "b"], 3, 10) == [("a", 10), ("a", 11), ("a", 12), ("b", 13), ("b", 14), ("b", 15)]


def test_one_image_per_prompt_plan():
    assert plan_images(["a", "b", "c"], 1, 0) == [("a", 0), ("b", 1), ("c", 2)]


@pytest.mark.parametrize("count", [0, -2])
def test_fewer_than_one_image_per_prompt_is_refused(count):
    with pytest.raises(UsageError, match=f"--num_images_per_prompt {count}"):
        plan_images(["a"], count, 0)


def test_max_seed_is_the_largest_torch_accepts():
    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises((RuntimeError, ValueError)):
        torch.Generator().manual_seed(MAX_SEED + 1)


def test_seeds_past_torchs_limit_are_a_usage_error_not_a_crash():
    assert plan_images(["a"], 1, MAX_SEED) == [("a", MAX_SEED)]
    with pytest.raises(UsageError, match=f"--seed {MAX_SEED - 1} is too large"):
        plan_images(["a", "b"], 2, MAX_SEED - 1)
