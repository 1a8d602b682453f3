"""Stand-ins for what cannot be downloaded here: tiny random SD-shaped pipelines, and short fits that give their
frozen VAE and text encoder a little of what a pretrained one knows (the demo and the tests use them; not the
trainer)."""

import utils  # noqa: F401,E402 -- silences known third-party notices before any module here loads them
