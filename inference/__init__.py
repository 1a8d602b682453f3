"""Sampling a trained model: load a run's pipeline or a checkpoint's UNet, generate, write images with metadata."""

import utils  # noqa: F401 -- silences known third-party notices before any module here loads them (utils/quiet.py)
