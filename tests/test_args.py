"""trainer/args.py: every reference flag with its default, the prompt alias, parse-time checks, tracker config."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.args import build_parser, non_ema_revision, parse_args, tracker_config

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--pretrained_model_name_or_path", "some/model", "--train_data_dir", "data"]
NO_DEFAULT = object()

# The reference trainer's 57 flags and defaults (trainer_facts.md). store_true flags default to False.
# One deliberate difference: --dataloader_num_workers defaults to None (derived from the cores), not 0.
REFERENCE_FLAGS = {
    "pretrained_model_name_or_path": NO_DEFAULT, "revision": None, "variant": None, "non_ema_revision": None,
    "prediction_type": None, "dataset_name": None, "dataset_config_name": None, "train_data_dir": None,
    "image_column": "image", "caption_column": "text", "max_train_samples": None, "cache_dir": None,
    "resolution": 512, "center_crop": False, "random_flip": False, "image_interpolation_mode": "lanczos",
    "dataloader_num_workers": None, "output_dir": "sd-model-finetuned", "seed": None, "train_batch_size": 16,
    "num_train_epochs": 100, "max_train_steps": None, "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False, "learning_rate": 1e-4, "scale_lr": False, "lr_scheduler": "constant",
    "lr_warmup_steps": 500, "snr_gamma": None, "dream_training": False, "dream_detail_preservation": 1.0,
    "input_perturbation": 0, "noise_offset": 0, "use_8bit_adam": False, "allow_tf32": False,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0, "mixed_precision": None, "enable_xformers_memory_efficient_attention": False,
    "local_rank": -1, "use_ema": False, "offload_ema": False, "foreach_ema": False, "checkpointing_steps": 500,
    "checkpoints_total_limit": None, "resume_from_checkpoint": None, "validation_prompts": None,
    "validation_epochs": 5, "report_to": "tensorboard", "logging_dir": "logs",
    "tracker_project_name": "text2image-fine-tune", "push_to_hub": False, "hub_token": None, "hub_model_id": None,
}

REFERENCE_CHOICES = {
    "lr_scheduler": {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"},
    "image_interpolation_mode": {"nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"},
    "mixed_precision": {"no", "fp16", "bf16"},
}


def _options_by_dest() -> dict:
    """dest -> list of option strings of the real parser."""
    return {a.dest: a.option_strings for a in build_parser()._actions if a.dest != "help"}


def test_reference_table_has_57_flags():
    """The table itself is complete, so the checks below cover every reference flag."""
    assert len(REFERENCE_FLAGS) == 57


@pytest.mark.parametrize("dest", sorted(REFERENCE_FLAGS))
def test_flag_exists_with_reference_name(dest):
    """Each reference flag is accepted under its own name, stored under the same dest."""
    assert f"--{dest}" in _options_by_dest().get(dest, [])


@pytest.mark.parametrize("dest,default", [(k, v) for k, v in REFERENCE_FLAGS.items() if v is not NO_DEFAULT])
def test_reference_default(dest, default):
    """Defaults match the reference, value and type."""
    value = getattr(parse_args(REQUIRED if dest != "train_data_dir" else REQUIRED[:2] + ["--dataset_name", "x"]),
                    dest)
    assert value == default and type(value) is type(default)


@pytest.mark.parametrize("dest,choices", sorted(REFERENCE_CHOICES.items()))
def test_reference_choices(dest, choices):
    """Choice lists match the reference's."""
    action = next(a for a in build_parser()._actions if a.dest == dest)
    assert set(action.choices) == choices


def test_model_is_required(capsys):
    """Omitting the base model is a one-line usage error, exit 2."""
    with pytest.raises(SystemExit) as info:
        parse_args(["--train_data_dir", "d"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--pretrained_model_name_or_path" in err and err.count("\n") == 1


@pytest.mark.parametrize("spelling", ["--validation_prompt", "--validation_prompts"])
def test_both_validation_prompt_spellings(spelling):
    """Singular (train.sh) and plural (reference) both give a list under validation_prompts."""
    args = parse_args(REQUIRED + [spelling, "A satellite image of a crop field", "a harbour"])
    assert args.validation_prompts == ["A satellite image of a crop field", "a harbour"]


def test_repeated_flag_last_wins():
    """train.sh appends user overrides after its defaults, so the last occurrence must win."""
    args = parse_args(REQUIRED + ["--resolution=512", "--max_train_steps=3500", "--report_to=wandb",
                                  "--resolution=64", "--max_train_steps=2", "--report_to=tensorboard",
                                  "--validation_prompt", "first", "--validation_prompt", "second"])
    assert (args.resolution, args.max_train_steps, args.report_to) == (64, 2, "tensorboard")
    assert args.validation_prompts == ["second"]


def _usage_error(argv, capsys) -> str:
    """Parse argv expecting a usage error; return its single stderr line."""
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_needs_dataset_or_folder(capsys):
    """Neither --dataset_name nor --train_data_dir: the reference's message, at parse time."""
    err = _usage_error(["--pretrained_model_name_or_path", "m"], capsys)
    assert "Need either a dataset name or a training folder." in err


@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_hub_token_with_wandb_rejected(report_to, capsys):
    """A token on the command line next to wandb could be uploaded with the run config."""
    err = _usage_error(REQUIRED + ["--hub_token", "hf_secret123", f"--report_to={report_to}"], capsys)
    assert "security risk" in err and "hf_secret123" not in err


def test_hub_token_with_tensorboard_allowed():
    """Only the wandb combination is rejected, like the reference."""
    assert parse_args(REQUIRED + ["--hub_token", "hf_x"]).hub_token == "hf_x"


@pytest.mark.parametrize("flag", ["--train_batch_size", "--gradient_accumulation_steps", "--checkpointing_steps",
                                  "--validation_epochs", "--max_train_steps", "--cache_chunk_rows"])
def test_non_positive_counts_rejected(flag, capsys):
    """A zero count would divide by zero or loop forever hours into the run."""
    err = _usage_error(REQUIRED + [f"{flag}=0"], capsys)
    assert flag in err and "0" in err


@pytest.mark.parametrize("argv,named", [(["--mixed_precision=fp32"], "fp32"), (["--lr_scheduler=cosin"], "cosin"),
                                        (["--report_to=wandbb"], "wandbb"), (["--resolution=abc"], "abc"),
                                        (["--text_cache=maybe"], "maybe"), (["--text_cache_budget_gb=-1"], "-1")])
def test_bad_values_name_the_value(argv, named, capsys):
    """Typos fail at parse time, naming the bad value."""
    assert named in _usage_error(REQUIRED + argv, capsys)


@pytest.mark.parametrize("argv,named", [(["--cache_latents"], "--center_crop"),
                                        (["--use_8bit_adam", "--optimizer_impl=fused"], "fused"),
                                        (["--vae_batch_size=0"], "--vae_batch_size"),
                                        (["--validation_guidance_scale=nan"], "--validation_guidance_scale"),
                                        (["--optimizer_impl=apex"], "apex")])
def test_cache_and_optimizer_flags_checked(argv, named, capsys):
    """Random crop with the cache, an AdamW kernel with 8-bit Adam, a zero batch: one line naming the problem."""
    assert named in _usage_error(REQUIRED + argv, capsys)


def test_cache_and_memory_flags_parse():
    """The new flags parse with centre crop; the cache dir is not the reference's --cache_dir."""
    args = parse_args(REQUIRED + ["--cache_latents", "--center_crop", "--latents_cache_dir", "lc",
                                  "--optimizer_impl", "foreach", "--dataloader_num_workers", "3"])
    assert (args.cache_latents, args.latents_cache_dir, args.cache_dir) == (True, "lc", None)
    assert (args.optimizer_impl, args.dataloader_num_workers, args.vae_batch_size) == ("foreach", 3, None)


def test_local_rank_accepted_and_args_not_mutated(monkeypatch):
    """--local_rank parses; LOCAL_RANK in the env does not rewrite the parsed value."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert parse_args(REQUIRED + ["--local_rank=0"]).local_rank == 0


def test_non_ema_revision_falls_back_to_revision():
    """The trained UNet's revision defaults to --revision, derived without mutating args."""
    args = parse_args(REQUIRED + ["--revision", "main"])
    assert non_ema_revision(args) == "main" and args.non_ema_revision is None
    assert non_ema_revision(parse_args(REQUIRED + ["--revision", "a", "--non_ema_revision", "b"])) == "b"


def test_tracker_config_is_flat_and_safe():
    """No token, no lists, no None: tensorboard hparams accept every value."""
    args = parse_args(REQUIRED + ["--hub_token", "hf_secret123", "--validation_prompt", "a", "b"])
    config = tracker_config(args)
    assert "hub_token" not in config and "validation_prompts" not in config
    assert "hf_secret123" not in repr(config)
    assert all(isinstance(v, (bool, int, float, str)) for v in config.values())
    assert config["seed"] == "None" and config["resolution"] == 512
    assert args.validation_prompts == ["a", "b"] and args.hub_token == "hf_secret123"


def test_format_help_mentions_every_flag():
    """In-process --help lists every flag, both prompt spellings included."""
    text = build_parser().format_help()
    for dest in REFERENCE_FLAGS:
        assert f"--{dest}" in text
    assert "--validation_prompt " in text or "--validation_prompt," in text


def test_args_module_imports_nothing_heavy():
    """--help must answer instantly: the args module pulls in no torch/diffusers."""
    code = "import sys, trainer.args; print(any(m in sys.modules for m in ('torch', 'diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(not (REPO_ROOT / "train_text_to_image.py").exists(), reason="entry script not written yet")
def test_entry_script_help():
    """`python train_text_to_image.py --help` exits 0 and lists the flags."""
    out = subprocess.run([sys.executable, "train_text_to_image.py", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--pretrained_model_name_or_path" in out.stdout and "--validation_prompt" in out.stdout


def test_cache_scaling_defaults():
    """Chunks of 1,024 rows; text states cached when they fit 5 GB; all three text cache modes accepted."""
    args = parse_args(REQUIRED)
    assert (args.cache_chunk_rows, args.text_cache, args.text_cache_budget_gb) == (1024, "auto", 5.0)
    for mode in ("auto", "on", "off"):
        assert parse_args(REQUIRED + ["--text_cache", mode]).text_cache == mode
