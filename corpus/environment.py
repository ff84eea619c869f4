"""Environment variables: set for a while around one call (what a library reads from the
environment, or hands to the processes it starts), or once for a command that loads models."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def quiet_model_libraries() -> None:
    """For a command that loads models, before it does (its child processes and Ray's workers
    inherit the variables): DeepSpeed is told it runs on the CPU where torch sees no GPU
    (guessing, it warns on the console at every import), and the weight-loading,
    shard-writing and MLflow artifact bars are shown on a terminal only."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Inside, the variables hold these values; after, what they held before (or nothing)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
