"""train_text_to_image_lora.py: diffusers' LoRA command line translated onto train_text_to_image.py's flags."""

import pytest

from train_text_to_image_lora import translate
from trainer.args import parse_args

DATA = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]


def test_reference_defaults():
    """No LoRA flags: rank 4, the reference's output dir and validation interval, no validation prompt."""
    args = parse_args(translate(DATA))
    assert args.lora_rank == 4 and args.lora_alpha is None
    assert args.output_dir == "sd-model-finetuned-lora" and args.validation_epochs == 1
    assert args.validation_prompts is None


def test_rank_prompt_and_image_count():
    """--rank=8; one --validation_prompt drawn --num_validation_images times (default 4; 0 = no validation)."""
    args = parse_args(translate(DATA + ["--rank=8", "--validation_prompt", "a river"]))
    assert args.lora_rank == 8 and args.validation_prompts == ["a river"] * 4
    args = parse_args(translate(DATA + ["--validation_prompt=a river", "--num_validation_images", "2"]))
    assert args.validation_prompts == ["a river", "a river"]
    assert parse_args(translate(DATA + ["--validation_prompt", "x", "--num_validation_images=0"])).validation_prompts \
        is None


def test_given_values_win_and_our_flags_pass_through():
    """A given --output_dir/--validation_epochs is kept (either spelling); our own LoRA flags still work."""
    args = parse_args(translate(DATA + ["--output_dir=out", "--validation_epochs", "3", "--lora_alpha", "8",
                                        "--use_ema"]))
    assert args.output_dir == "out" and args.validation_epochs == 3
    assert args.lora_alpha == 8 and args.use_ema and args.lora_rank == 4


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank must be at least 1, got 0"),
    (["--num_validation_images", "-1"], "--num_validation_images must not be negative"),
    (["--rank", "four"], "--rank"),
])
def test_bad_values_are_one_line(flags, message, capsys):
    """Exit 2 and one line naming the reference flag."""
    with pytest.raises(SystemExit) as exit_info:
        translate(DATA + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_script_help_and_refusal(run_script, tmp_path):
    """The script itself: --help lists both flag sets; a bad --rank exits 2 with one line, no traceback."""
    done = run_script("train_text_to_image_lora.py", ["--help"])
    assert done.returncode == 0 and "--rank" in done.stdout and "--lora_alpha" in done.stdout
    done = run_script("train_text_to_image_lora.py", DATA + ["--rank", "-3"])
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--rank" in done.stderr
