"""Silence known, harmless third-party notices at their source, so users see our lines and real warnings.

Each notice is named by the logger that emits it and a fragment of its text (or, for a Python warning, its category
and how it starts): only those are dropped, and every other warning of the same libraries still shows. A logger's
filter sees the records created on it whether or not the library has been imported yet, so silence_notices() runs
when the `utils` package is first imported (utils/__init__.py): every script, the process `accelerate launch` starts
and its dataloader workers import the project's modules before they load these libraries.
"""

import contextlib
import logging
import re
import warnings

# (logger name, fragment of the message): notices that tell our users nothing they can act on.
NOTICES = (
    # bitsandbytes on a CPU with AVX512-BF16 tries to fetch an optional 4-bit kernel we never use (we use 8-bit AdamW).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # transformers without torchvision (it has no CPU build for our torch) falls back to the PIL image processors,
    # which is what we want; diffusers touches CLIPImageProcessor for the safety checker we never load.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    # diffusers warns on every dtype cast of a model even when it keeps no module in fp32 (the list is empty), so
    # each fp16/bf16 run printed it for the frozen VAE (seen on the GPU check); a non-empty list still shows.
    ("diffusers.models.modeling_utils", "that should be kept in float32: []."),
    # diffusers' EMAModel.from_pretrained, which our EMA resume calls, loads the UNet with the EMA's own state in its
    # config and warns twice that those keys are ignored; only an EMA save carries 'optimization_step'.
    ("diffusers.configuration_utils", "'optimization_step'"),
)

# (category, start of the message): Python warnings about a library's own internals.
WARNINGS = (
    # diffusers' EMAModel.from_pretrained, which our EMA resume calls, passes a path to from_config itself.
    (FutureWarning, "It is deprecated to pass a pretrained model name or path to `from_config`"),
)


class DropNotices(logging.Filter):
    """Drop a logger's records whose message contains one of the given fragments."""

    def __init__(self, fragments):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a known notice."""
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_notices() -> None:
    """Attach the NOTICES filters to their loggers and the WARNINGS filters, once per process."""
    for category, start in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)  # re-adding replaces it
    by_logger = {}
    for name, fragment in NOTICES:
        by_logger.setdefault(name, []).append(fragment)
    for name, fragments in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropNotices) for existing in logger.filters):
            logger.addFilter(DropNotices(fragments))


def quiet_loading_bars() -> None:
    """No diffusers/transformers bars for loading or saving small files (they interleave with our progress bars).

    transformers' switch also turns off huggingface_hub's download bars, which a user fetching a 4 GB base model
    wants, so those are switched back on unless the user had turned them off.
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    hub_bars_were_on = not hub_utils.are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if hub_bars_were_on:
        hub_utils.enable_progress_bars()


@contextlib.contextmanager
def no_datasets_bars():
    """datasets' own bars off for the block, then as they were: reading a local folder, its "Downloading data" and
    "Generating train split" bars only copy files the user already has, in every training run.

    Only datasets' switch is touched: our tqdm bars and huggingface_hub's download bars keep theirs. A user who set
    HF_DATASETS_DISABLE_PROGRESS_BARS=0 keeps the bars, without datasets' warning that the variable wins.
    """
    import datasets

    were_off = datasets.are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            datasets.enable_progress_bars()


def quiet_libraries() -> None:
    """For sampling scripts: diffusers/transformers at errors only, and no loading bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    quiet_loading_bars()
