"""utils/quiet.py: the known third-party notices are dropped at their source; other warnings still show."""

import subprocess
import sys
from pathlib import Path

from utils.quiet import NOTICES

REPO = Path(__file__).resolve().parents[1]
# Reproduces both notices as the libraries emit them: transformers' torchvision fallback on first access of an image
# processor, and bitsandbytes' kernel notice by re-running its CPU backend as on a CPU with AVX512-BF16.
# Then one real warning on each of the same loggers, which must still show.
SCRIPT = '''import importlib, logging, warnings
import utils  # what every project package imports first
import transformers
transformers.CLIPImageProcessor
import bitsandbytes, bitsandbytes.functional
bitsandbytes.functional.has_avx512bf16 = lambda: True
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the reload re-registers bitsandbytes' kernels
    importlib.reload(bitsandbytes.backends.cpu.ops)
for name in ("transformers.utils.import_utils", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(name).warning("a real warning from %s", name)
'''
# The notices as the issue quotes them.
QUOTED = ("Failed to load CPU gemm_4bit_forward from kernels-community", "CLIPImageProcessor` requires torchvision")


def test_notices_silenced_real_warnings_kept():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in QUOTED + tuple(fragment for _, fragment in NOTICES):
        assert text not in done.stderr, done.stderr[-3000:]
    for name, _ in NOTICES:
        assert f"a real warning from {name}" in done.stderr
