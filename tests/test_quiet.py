"""utils/quiet.py: the known third-party notices are dropped at their source; other warnings still show."""

import subprocess
import sys
from pathlib import Path

from utils.quiet import NOTICES, WARNINGS, no_datasets_bars

REPO = Path(__file__).resolve().parents[1]
# Reproduces the notices as the libraries emit them: transformers' torchvision fallback on first access of an image
# processor; bitsandbytes' kernel notice by re-running its CPU backend as on a CPU with AVX512-BF16; diffusers'
# from_config deprecation and ignored-config notice as EMAModel.from_pretrained raises them; diffusers' fp32-modules
# notice on a VAE dtype cast.
# Then one real warning on each of the same loggers, and a FutureWarning, which must still show.
SCRIPT = '''import importlib, logging, warnings
import utils  # what every project package imports first
import transformers
transformers.CLIPImageProcessor
import bitsandbytes, bitsandbytes.functional
bitsandbytes.functional.has_avx512bf16 = lambda: True
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the reload re-registers bitsandbytes' kernels
    importlib.reload(bitsandbytes.backends.cpu.ops)
from diffusers.utils import deprecate
deprecate("config-passed-as-path", "1.0.0", "It is deprecated to pass a pretrained model name or path to "
          "`from_config`. (as diffusers' EMAModel.from_pretrained does)", standard_warn=False)
import torch
from diffusers import AutoencoderKL
AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
              up_block_types=("UpDecoderBlock2D",)).to("cpu", dtype=torch.bfloat16)  # as the trainer casts the VAE
from diffusers import UNet2DConditionModel
UNet2DConditionModel.extract_init_dict({"decay": 0.9999, "optimization_step": 4})  # as EMAModel.from_pretrained
for name in ("transformers.utils.import_utils", "bitsandbytes.backends.cpu.ops", "diffusers.models.modeling_utils",
             "diffusers.configuration_utils"):
    logging.getLogger(name).warning("a real warning from %s", name)
warnings.warn("a real FutureWarning", FutureWarning)
'''
# The notices as the issue (and a resumed run's log) quote them.
QUOTED = ("Failed to load CPU gemm_4bit_forward from kernels-community", "CLIPImageProcessor` requires torchvision",
          "It is deprecated to pass a pretrained model name or path to `from_config`",
          "There are modules in AutoencoderKL that should be kept in float32",
          "were passed to UNet2DConditionModel, but are not expected")


def test_notices_silenced_real_warnings_kept():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in QUOTED + tuple(fragment for _, fragment in NOTICES):
        assert text not in done.stderr, done.stderr[-3000:]
    for _, start in WARNINGS:
        assert start not in done.stderr, done.stderr[-3000:]
    for name, _ in NOTICES:
        assert f"a real warning from {name}" in done.stderr
    assert "a real FutureWarning" in done.stderr


def test_no_datasets_bars_restores_the_switch_and_spares_the_hub():
    """Off inside the block, as before after it (on, or off when the user had turned them off); hub bars untouched."""
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled

    hub_bars_off = are_progress_bars_disabled()
    for before_off in (False, True):
        if before_off:
            datasets.disable_progress_bars()
        else:
            datasets.enable_progress_bars()
        with no_datasets_bars():
            assert datasets.are_progress_bars_disabled() and are_progress_bars_disabled() == hub_bars_off
        assert datasets.are_progress_bars_disabled() == before_off
    datasets.enable_progress_bars()
