"""Evaluation of a fine-tuned pipeline: held-out captions and images in, FID and CLIP score out (evaluate.py)."""

import utils  # noqa: F401 -- silences known third-party notices before any module here loads them (utils/quiet.py)
