"""Pins, one per use of a dependency's private API (corpus/compat.py): the behaviour each
relies on, so that an upgrade that changes it fails here first."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import optuna
import pytest
import torch
from unlearn_sweep.corpus import compat


def test_without_hf_deepspeed_config_hides_an_active_zero3_run() -> None:
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    active = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    with compat.without_hf_deepspeed_config():
        assert not is_deepspeed_zero3_enabled()
    assert is_deepspeed_zero3_enabled()
    del active


def test_reset_accelerate_state_lets_the_next_trainer_start_it_again() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert AcceleratorState().initialized and GradientState().num_steps == 2
    compat.reset_accelerate_state()
    assert not (AcceleratorState._shared_state or PartialState._shared_state or GradientState._shared_state)
    Accelerator(cpu=True, gradient_accumulation_steps=3)
    assert GradientState().num_steps == 3
    compat.reset_accelerate_state()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
def test_a_vllm_engine_has_a_core_to_shut_down() -> None:
    import inspect

    from vllm import LLM
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    assert "self.llm_engine" in inspect.getsource(LLM.__init__)
    assert "self.engine_core" in inspect.getsource(LLMEngine.__init__)
    assert callable(EngineCoreClient.shutdown)


def test_an_optuna_trial_built_from_its_id_sets_constraints_on_the_running_trial() -> None:
    study = optuna.create_study()
    asked = study.ask()
    compat.optuna_trial(study, asked._trial_id).set_constraint("limit", 0.25)
    study.tell(asked, 1.0)
    assert study.trials[0].constraints == {"limit": 0.25}


def test_ray_optuna_search_keeps_each_tune_trials_optuna_trial_in_the_map_compat_writes() -> None:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space={"x": tune.uniform(0, 1)}, metric="objective", mode="max")
    searcher.suggest("a")
    study_trial = searcher._ot_trials["a"]
    compat.remember_optuna_trial(searcher, "b", study_trial)
    searcher.on_trial_complete("b", {"objective": 0.5})
    assert searcher._ot_study.trials[0].value == 0.5


def test_one_gpu_per_process_keeps_the_trainer_from_data_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TrainingArguments count every visible GPU into the private `_n_gpu` (4 simulated here),
    and the Trainer wraps the model in nn.DataParallel when `n_gpu > 1`. The device stays the
    CPU: once DeepSpeed is imported (it sets PYTORCH_NVML_BASED_CUDA_CHECK), a CUDA build's
    `is_available` counts through the patched `device_count` and the arguments would select a
    simulated GPU (seen in a Python 3.12 venv, whose torch is PyPI's CUDA build)."""
    import inspect

    from transformers import Trainer, TrainingArguments
    from unlearn_sweep.corpus.compat import one_gpu_per_process

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert args.n_gpu == 4
    one_gpu_per_process(args)
    assert args.n_gpu == 1 and args.device.type == "cpu"
    assert "if args.n_gpu > 1:" in inspect.getsource(Trainer) and "nn.DataParallel" in inspect.getsource(Trainer)


def test_ray_takes_loopback_for_a_local_instance_while_the_cluster_constant_is_off() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a constant at import; a process it starts
    reads the variable; with the constant off a node's address is 127.0.0.1."""
    import os

    import ray
    from ray._private import ray_constants, services

    assert not ray.is_initialized()
    before = (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(compat.LOOPBACK_VARIABLE))
    with compat.ray_on_loopback():
        assert services.get_node_ip_address() == "127.0.0.1"
        assert os.environ[compat.LOOPBACK_VARIABLE] == "0"
    assert (ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(compat.LOOPBACK_VARIABLE)) == before
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == compat.LOOPBACK_VARIABLE


def test_a_checkpoint_persisted_on_the_same_disk_shares_its_weights(tmp_path: Path) -> None:
    """Tune's and Ray Train's storage copy a reported checkpoint with their module's
    `_pyarrow_fs_copy_files`: inside `local_storage_copies` the weights are the exported
    file itself (one inode, nothing written), the other files copies; outside it, copies."""
    from ray.train import Checkpoint
    from ray.train._internal.storage import StorageContext as TuneStorage
    from ray.train.v2._internal.execution.storage import StorageContext as TrainStorage

    export = tmp_path / "export"
    (export / "nested").mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"w" * 4096)
    (export / "scores.json").write_text('{"final_score": 0.5}')
    (export / "nested" / "adapter_model.safetensors").write_bytes(b"a" * 64)

    def tune_storage(index: int) -> TuneStorage:
        return TuneStorage(str(tmp_path / "runs"), "sweep", trial_dir_name="trial", current_checkpoint_index=index)

    with compat.local_storage_copies():
        persisted = [
            tune_storage(0).persist_current_checkpoint(Checkpoint.from_directory(export)),
            TrainStorage(str(tmp_path / "runs"), "train").persist_current_checkpoint(
                Checkpoint.from_directory(export), "checkpoint_0"
            ),
        ]
        # The same checkpoint persisted again into its folder (Ray's copy overwrites): replaced, not refused.
        again = tune_storage(0).persist_current_checkpoint(Checkpoint.from_directory(export))
    copied = tune_storage(1).persist_current_checkpoint(Checkpoint.from_directory(export))
    for checkpoint in [*persisted, again]:
        folder = Path(checkpoint.path)
        for weights in ("model.safetensors", "nested/adapter_model.safetensors"):
            assert (folder / weights).stat().st_ino == (export / weights).stat().st_ino, weights
        assert (folder / "scores.json").read_text() == (export / "scores.json").read_text()
        assert (folder / "scores.json").stat().st_ino != (export / "scores.json").stat().st_ino
    assert Path(copied.path, "model.safetensors").stat().st_ino != (export / "model.safetensors").stat().st_ino


def test_tunes_state_synced_into_local_storage_is_never_seen_cut_short(tmp_path: Path) -> None:
    """Tune's driver syncs its experiment state from its staging folder into storage_path in a
    background thread (`_upload_to_fs_path`, then `_pyarrow_fs_copy_files`). Ray's copy truncates
    the old file before writing the new one: a driver killed meanwhile left the file cut short.
    Inside `local_storage_copies` the file is, at every instant of the copy, the old one or the
    new one whole; nothing else is left beside it, nor what a copy killed before it left."""
    import pyarrow.fs
    from ray.train._internal.storage import _upload_to_fs_path

    staging, storage = tmp_path / "driver_artifacts", tmp_path / "storage"
    staging.mkdir()
    storage.mkdir()
    old, new = 1 << 20, 192 << 20  # the new state larger than one of pyarrow's 64 MiB chunks
    (staging / "experiment_state-now.json").write_bytes(b"n" * new)
    (staging / "trial_started").mkdir()  # empty, as pyarrow copies it
    (storage / "experiment_state-now.json").write_bytes(b"o" * old)
    (storage / ".experiment_state-now.json.4321-1.partial").write_bytes(b"n" * 7)  # a killed copy's
    sizes = set()
    with compat.local_storage_copies():
        sync = threading.Thread(
            target=_upload_to_fs_path, args=(str(staging), pyarrow.fs.LocalFileSystem(), str(storage))
        )
        sync.start()
        while sync.is_alive():
            sizes.add((storage / "experiment_state-now.json").stat().st_size)
        sync.join()
    assert sizes <= {old, new}
    assert sorted(path.name for path in storage.iterdir()) == ["experiment_state-now.json", "trial_started"]
    assert (storage / "experiment_state-now.json").stat().st_size == new


def test_mlflow_logs_a_local_checkpoint_only_with_pipeline_classes(tmp_path: Path) -> None:
    """MLflow's flavour config of a checkpoint folder reads `check_task(...)[1]["impl"]` as a
    class: with Transformers 5 it fails unless `pipeline_classes_for_mlflow` is around it."""
    from mlflow.transformers.flavor_config import build_flavor_config_from_local_checkpoint
    from unlearn_sweep.corpus.toy_model import train_tokenizer

    train_tokenizer(["a short text to learn a vocabulary from"], vocab_size=40).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["Olmo2ForCausalLM"]}')
    with pytest.raises(AttributeError, match="__name__"):
        build_flavor_config_from_local_checkpoint(str(tmp_path), "text-generation")
    with compat.pipeline_classes_for_mlflow():
        flavor = build_flavor_config_from_local_checkpoint(str(tmp_path), "text-generation")
    assert flavor["instance_type"] == "TextGenerationPipeline"
    assert flavor["pipeline_model_type"] == "Olmo2ForCausalLM"
