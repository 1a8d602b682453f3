"""The trainer behind train_text_to_image.py: arguments, preflight, data, models, loop, checkpoints, export."""

import utils  # noqa: F401 -- silences known third-party notices before any module here loads them (utils/quiet.py)
