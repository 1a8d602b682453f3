"""One logger for every script: set up once in main(), fetched anywhere with get_logger()."""

import logging
import sys

LOGGER_NAME = "rsdiff"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(level: int = logging.INFO, is_main_process: bool = True) -> logging.Logger:
    """Configure the project logger; non-main processes only report warnings and errors."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if is_main_process else logging.WARNING)
    logger.propagate = False
    return logger


def get_logger() -> logging.Logger:
    """Return the project logger (configure it first with setup_logging)."""
    return logging.getLogger(LOGGER_NAME)
