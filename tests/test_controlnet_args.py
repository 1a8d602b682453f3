"""trainer/controlnet_args.py: diffusers' train_controlnet.py flags with their defaults, the RS flags, the validation
pairing rules and one-line refusals."""

import pytest

from trainer.controlnet_args import build_parser, parse_args, validation_pairs

BASE = ["--pretrained_model_name_or_path", "base", "--train_data_dir", "data"]
# diffusers' examples/controlnet/train_controlnet.py: every flag and its default.
REFERENCE_DEFAULTS = {
    "pretrained_model_name_or_path": "base", "controlnet_model_name_or_path": None, "revision": None,
    "variant": None, "tokenizer_name": None, "output_dir": "controlnet-model", "cache_dir": None, "seed": None,
    "resolution": 512, "train_batch_size": 4, "num_train_epochs": 1, "max_train_steps": None,
    "checkpointing_steps": 500, "checkpoints_total_limit": None, "resume_from_checkpoint": None,
    "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "learning_rate": 5e-6, "scale_lr": False,
    "lr_scheduler": "constant", "lr_warmup_steps": 500, "lr_num_cycles": 1, "lr_power": 1.0,
    "use_8bit_adam": False, "dataloader_num_workers": 0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2, "adam_epsilon": 1e-08, "max_grad_norm": 1.0, "push_to_hub": False,
    "hub_token": None, "hub_model_id": None, "logging_dir": "logs", "allow_tf32": False,
    "report_to": "tensorboard", "mixed_precision": None, "enable_xformers_memory_efficient_attention": False,
    "set_grads_to_none": False, "dataset_name": None, "dataset_config_name": None, "train_data_dir": "data",
    "image_column": "image", "conditioning_image_column": "conditioning_image", "caption_column": "text",
    "max_train_samples": None, "proportion_empty_prompts": 0, "validation_prompt": None, "validation_image": None,
    "num_validation_images": 4, "validation_steps": 100, "tracker_project_name": "train_controlnet",
}


def test_every_reference_flag_with_its_default():
    """Each of diffusers' 52 flags parses to the reference default; the crop is the reference's fixed centre crop."""
    args = parse_args(BASE)
    assert {name: getattr(args, name) for name in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    assert args.center_crop and args.image_interpolation_mode == "bilinear"
    options = {o for action in build_parser()._actions for o in action.option_strings}
    assert {f"--{name}" for name in REFERENCE_DEFAULTS} <= options
    assert "--center_crop" not in options and "--non_ema_revision" not in options and "--lora_rank" not in options


def test_rs_flags_parse():
    """The remote-sensing flags and the shared trainer's (cache, EMA, flip) parse with their values."""
    args = parse_args([*BASE, "--conditioning_type", "mask", "--num_classes", "8", "--conditioning_channels", "8",
                       "--random_flip", "--cache_latents", "--use_ema", "--mixed_precision", "bf16"])
    assert (args.conditioning_type, args.num_classes, args.conditioning_channels) == ("mask", 8, 8)
    assert args.random_flip and args.cache_latents and args.use_ema and args.mixed_precision == "bf16"
    assert parse_args(BASE).conditioning_type is None  # read from the data folder


@pytest.mark.parametrize("prompts, images, pairs", [
    (["a", "b"], ["x", "y"], [("a", "x"), ("b", "y")]),
    (["a", "b"], ["x"], [("a", "x"), ("b", "x")]),
    (["a"], ["x", "y"], [("a", "x"), ("a", "y")]),
    (None, None, []),
])
def test_validation_pairing_is_the_references(prompts, images, pairs):
    """N:N zipped, N prompts on one image, one prompt on N images."""
    assert validation_pairs(prompts, images) == pairs


@pytest.mark.parametrize("extra, fragment", [
    (["--validation_prompt", "a"], "--validation_prompt needs --validation_image"),
    (["--validation_image", "x.png"], "--validation_image needs --validation_prompt"),
    (["--validation_prompt", "a", "b", "--validation_image", "x", "y", "z"], "2 --validation_prompt values and 3"),
    (["--num_classes", "0"], "--num_classes must be at least 1, got 0"),
    (["--conditioning_channels", "0"], "--conditioning_channels must be at least 1"),
    (["--max_train_steps", "-1"], "--max_train_steps must be at least 0, got -1"),
    (["--conditioning_type", "bands", "--num_classes", "3"], "--num_classes applies to --conditioning_type mask"),
    (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts must be in [0, 1], got 1.5"),
    (["--dream_training"], "--dream_training does not work with a ControlNet"),
    (["--conditioning_type", "edges"], "invalid choice: 'edges'"),
])
def test_bad_values_are_one_line_exit_2(extra, fragment, capsys):
    """Each mistake: one stderr line naming it, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*BASE, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_zero_steps_is_accepted_and_documented():
    """--max_train_steps 0 (the initial ControlNet, as diffusers' script writes it) parses, and --help says what it
    does; train_text_to_image.py still refuses 0 (tests/test_args.py)."""
    from trainer.controlnet_args import build_parser

    assert parse_args([*BASE, "--max_train_steps", "0"]).max_train_steps == 0
    assert "0 trains nothing" in " ".join(build_parser().format_help().split())
