"""Shared fixtures: the miniature task built once per session, and the real data if present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def toy_task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unlearn_sweep.corpus.toy_task import write_toy_task

    prebuilt = os.environ.get("UNLEARN_SWEEP_TEST_TOY_TASK")  # a developer's shortcut: reuse a built task
    if prebuilt:
        return Path(prebuilt)
    return write_toy_task(tmp_path_factory.mktemp("toy") / "task", seed=0)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test where that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
