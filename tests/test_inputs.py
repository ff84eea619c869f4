"""A sweep's inputs fingerprinted, and a resume refused where its settings or inputs are not
those it started with (orchestrator/inputs.py); the start's record and a refused resume of a
real sweep are in test_sweep_lifecycle.py."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
from test_sweep import write_config
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.orchestrator import inputs
from unlearn_sweep.orchestrator.config import ConfigError, load_config
from unlearn_sweep.orchestrator.inputs import check_resume, check_unchanged, fingerprints, input_digests, record_start

ADVICE = "a resumed sweep runs its remaining trials as it started them: put it back, or start a new sweep"


def test_a_resume_keeps_the_settings_and_inputs_its_sweep_started_with(
    toy_task_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where things run and are kept may change, and the inputs' paths (to a copy of the same
    files); a setting of what trials do, or a file of an input, may not: each is named."""
    data = shutil.copytree(toy_task_dir / "data", tmp_path / "data")
    config = load_config(write_config(tmp_path / "sweep", toy_task_dir, data=str(data)))

    def resumed(**changes) -> None:
        changed = dataclasses.replace(config, **changes)
        check_resume(changed, input_digests(changed.trial_inputs))

    with caplog.at_level(logging.WARNING):
        resumed()  # a sweep started by an earlier version: nothing to compare with, and it says so
    assert "recorded no inputs at its start" in caplog.text
    record_start(config, input_digests(config.trial_inputs))
    assert [path.name for path in (tmp_path / "sweep" / "runs" / config.name).iterdir()] == ["started_with.json"]
    resumed()
    moved = shutil.copytree(data, tmp_path / "moved")
    resumed(data=moved, max_concurrent_trials=1, keep_checkpoints="all", gpu_memory_gb=80.0)
    with pytest.raises(ConfigError, match=rf"field 'seed': 0 at the sweep's start, 1 now; {ADVICE}"):
        resumed(seed=1)
    with pytest.raises(ConfigError, match=r"field 'search_space_overrides': \{.*\.\.\. at the sweep's start, \{"):
        resumed(search_space_overrides={"grad_diff": {"epochs": 2}})
    with pytest.raises(ConfigError, match="field 'held_out': given now, not at the sweep's start"):
        resumed(held_out=toy_task_dir / "mia" / "held_out.jsonl")
    forget = moved / "forget_train-00000-of-00001.parquet"
    forget.write_bytes(forget.read_bytes()[::-1])  # a new forget set at the same path
    with pytest.raises(ConfigError, match=rf"field 'data': {forget} changed since the sweep started; {ADVICE}"):
        resumed(data=moved)
    forget.unlink()
    with pytest.raises(ConfigError, match=rf"field 'data': {forget} is not there, and the sweep started with it"):
        resumed(data=moved)


def test_a_trial_refuses_inputs_that_are_not_the_sweeps_at_its_start(toy_task_dir: Path, tmp_path: Path) -> None:
    """On a node the start's check never saw (an autoscaler's), or after a file was replaced
    while the sweep ran: the trial fails at its start, naming the file and the field."""
    from unlearn_sweep.methods.registry import get_method
    from unlearn_sweep.orchestrator.context import TrialContext
    from unlearn_sweep.orchestrator.trial import trial_task

    data = shutil.copytree(toy_task_dir / "data", tmp_path / "data")
    config = load_config(write_config(tmp_path / "sweep", toy_task_dir, data=str(data)))
    started = fingerprints(config.trial_inputs, input_digests(config.trial_inputs))
    context = TrialContext.for_sweep(config, str(tmp_path / "runs"), "0", "parent", None, [1], started)
    method = get_method("grad_diff")
    assert len(trial_task(context, method).forget) > 0
    forget = data / "forget_train-00000-of-00001.parquet"
    forget.write_bytes(forget.read_bytes()[::-1])
    with pytest.raises(
        DataError, match=rf"{forget}: field 'data': on node [\d.]+, it is not the file the sweep started"
    ):
        trial_task(context, method)
    forget.unlink()
    with pytest.raises(DataError, match=rf"{forget}: field 'data': on node [\d.]+, it is not there; every node"):
        check_unchanged(started, "10.0.0.7")


def test_a_large_file_is_told_apart_by_its_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file over WHOLE_FILE_BYTES (a 7B model's weight shards) is read in SAMPLES blocks, not
    whole: a change in any of them, or in its size, is told; one between them is not."""
    block = inputs.SAMPLE_BYTES
    monkeypatch.setattr(inputs, "WHOLE_FILE_BYTES", 4 * block)
    weights = tmp_path / "model.safetensors"
    content = bytes(range(256)) * (40 * block // 256)
    size = len(content)

    def changed_at(offset: int) -> str:
        changed = bytearray(content)
        changed[offset] ^= 1
        weights.write_bytes(changed)
        return inputs.file_digest(weights)

    weights.write_bytes(content)
    before = inputs.file_digest(weights)
    seventh = 7 * (size - block) // (inputs.SAMPLES - 1)  # where the seventh sample starts
    for offset in (0, seventh + 5, size - 1):
        assert changed_at(offset) != before, offset
    assert changed_at(seventh + block + 5) == before  # between two samples: the file is not read whole
    weights.write_bytes(content + b"\0")
    assert inputs.file_digest(weights) != before
