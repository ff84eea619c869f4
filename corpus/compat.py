"""Every use of a dependency's private API, in one place (tests/test_compat.py pins each), so
that an upgrade that changes one fails there first. It lives in `corpus`, the layer every other
imports; each dependency is imported only when its function is called.

Why each is needed:
- Transformers keeps the active DeepSpeed config behind a module-level weak reference; rank 0
  of a ZeRO-3 run must load whole models and generate alone to evaluate an epoch.
- Accelerate's state is a process-wide singleton: a Ray actor reused for the next trial must
  start it again with that trial's settings.
- vLLM frees an engine's GPU memory only when its engine core is shut down.
- Ray's OptunaSearch keeps the Optuna trial of each Tune trial in a private map: a searcher
  whose saved state was lost finds its trials again through the study.
- Ray Tune ends a trial its scheduler stopped by raising SystemExit inside `tune.report` (and
  the trials still running at Ctrl-C the same way: a trial tells them apart by the interrupt
  the driver recorded on the sweep's run, orchestrator/tracking.py).
- Ray copies Tune's experiment state and a reported checkpoint into storage_path with pyarrow,
  which truncates each file before writing it: on local storage each file is replaced whole
  instead, and a checkpoint's weights are hard-linked (the trial deletes its own copy next).
- Ray decides whether a local instance is for this machine alone (listening on 127.0.0.1) by a
  constant read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported; the processes
  `ray.init` starts read the variable itself.
- Transformers' Trainer wraps the model in nn.DataParallel over every visible GPU when a lone
  process sees several; it sets TrainingArguments' private `_n_gpu` to 1 itself to avoid that
  for model parallelism, and so does `one_gpu_per_process`.
- MLflow logs a Transformers checkpoint from its folder (no load into memory) by reading
  `transformers.pipelines.check_task(task)[1]["impl"]` as a class; Transformers 5 names it by
  its dotted path, so the call fails without `pipeline_classes_for_mlflow`."""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unlearn_sweep.corpus.environment import environment

# What `tune.report` raises in a trial's function when its scheduler (ASHA) stops it.
TUNE_STOPPED_TRIAL: type[BaseException] = SystemExit


@contextlib.contextmanager
def without_hf_deepspeed_config() -> Iterator[None]:
    """Inside, Transformers acts as if no DeepSpeed (ZeRO-3) run were active."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so the next Trainer sets it up anew."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def one_gpu_per_process(args: Any) -> None:
    """A Trainer with these TrainingArguments trains on one GPU (its device), never wraps the
    model in nn.DataParallel over the others it sees (several GPUs train as ranks, each its own)."""
    args.n_gpu  # noqa: B018 -- resolves the device, which sets _n_gpu to the visible GPU count
    args._n_gpu = min(args._n_gpu, 1)


LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_on_loopback() -> Iterator[None]:
    """A local Ray instance started inside listens on 127.0.0.1 only: its GCS, raylet, workers
    and agents (the dashboard's too). Never around joining a cluster, whose nodes must reach
    this one."""
    from ray._private import ray_constants

    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environment(**{LOOPBACK_VARIABLE: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant


def shutdown_vllm_engine(engine: Any) -> None:
    """Stop a vLLM engine's core process, which holds the engine's GPU memory."""
    engine.llm_engine.engine_core.shutdown()


def optuna_trial(study: Any, trial_id: int) -> Any:
    """The live `optuna.trial.Trial` of a study's trial, by its storage id (to set a constraint
    on a trial that is still running; Optuna builds these itself in `ask`)."""
    import optuna

    return optuna.trial.Trial(study, trial_id)


def remember_optuna_trial(searcher: Any, tune_trial_id: str, trial: Any) -> None:
    """Tell Ray's OptunaSearch which Optuna trial a Tune trial is."""
    searcher._ot_trials[tune_trial_id] = trial


# Files written once at export and never changed after: safe to share between two folders.
LINKABLE = ("*.safetensors", "*.bin", "*.safetensors.index.json")


@contextlib.contextmanager
def local_storage_copies() -> Iterator[None]:
    """While inside, Ray's copies from one local path into another (Tune's experiment state,
    synced from the driver's staging folder by a background thread, and a reported checkpoint,
    into a storage_path on this machine) replace each file whole: written under a temporary name
    beside it, then renamed over it. Ray 2.60 copies with pyarrow, which truncates the old file
    first: a driver killed mid-copy left `search_gen_state-*.json` empty, and the resumed sweep
    restarted instead of resuming. Weights on the same disk are hard-linked rather than copied
    (a trial deletes its own folder after the report: at 7B, 14-28 GB written for nothing per new
    best epoch). Anywhere else (S3, GCS) Ray copies as before; an object store replaces an object
    whole. Tune's and Ray Train's storage each have the copy."""
    from ray.train._internal import storage as tune_storage
    from ray.train.v2._internal.execution import storage as train_storage

    modules = (tune_storage, train_storage)
    originals = [module._pyarrow_fs_copy_files for module in modules]

    def whole_files(copy_files):
        def copy(source, destination, source_filesystem=None, destination_filesystem=None, **kwargs):
            if not _copied_whole(source, destination, source_filesystem, destination_filesystem):
                copy_files(source, destination, source_filesystem, destination_filesystem, **kwargs)

        return copy

    for module, original in zip(modules, originals, strict=True):
        module._pyarrow_fs_copy_files = whole_files(original)
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module._pyarrow_fs_copy_files = original


def _local(path: str, filesystem: Any) -> bool:
    """Whether pyarrow would reach path on this machine's filesystem (None: inferred from path)."""
    import pyarrow.fs

    return isinstance(filesystem, pyarrow.fs.LocalFileSystem) or (filesystem is None and "://" not in str(path))


def _copied_whole(source: str, destination: str, source_filesystem: Any, destination_filesystem: Any) -> bool:
    """Copy the file or folder source into destination, each file replaced whole, where both are
    local; False (nothing done) elsewhere. Every file is written first and renamed after, so a
    stop leaves the old set or the new one but for the instant of the renames."""
    if not (_local(source, source_filesystem) and _local(destination, destination_filesystem)):
        return False
    source_path, target_path = Path(source), Path(destination)
    if source_path.is_file():
        pairs = [(source_path, target_path)]
    elif source_path.is_dir():
        pairs = []
        target_path.mkdir(parents=True, exist_ok=True)
        for path in sorted(source_path.rglob("*")):
            if path.is_dir():  # an empty one too, as pyarrow copies it
                (target_path / path.relative_to(source_path)).mkdir(exist_ok=True)
            else:
                pairs.append((path, target_path / path.relative_to(source_path)))
    else:
        return False
    written = []
    try:
        for path, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            # An earlier copy of this file killed mid-way left its partial one (at 7B, up to 5 GB
            # a shard where weights are copied): nothing else writes this file.
            for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
                stale.unlink(missing_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.partial")
            written.append((partial, target))
            _link_or_copy(path, partial)
        for partial, target in written:
            os.replace(partial, target)
    finally:
        for partial, _ in written:
            partial.unlink(missing_ok=True)
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link weights where the disk allows it, copy everything else (a checkpoint's scores
    may be rewritten in place after it was reported)."""
    if any(source.match(pattern) for pattern in LINKABLE):
        with contextlib.suppress(OSError):  # another device, or a filesystem without hard links
            os.link(source, target)
            return
    shutil.copy2(source, target)


@contextlib.contextmanager
def pipeline_classes_for_mlflow() -> Iterator[None]:
    """Inside, `transformers.pipelines.check_task` gives a task's pipeline as the class MLflow
    3.17 reads (`mlflow.transformers.flavor_config.build_flavor_config_from_local_checkpoint`),
    not Transformers 5's dotted path to it."""
    from transformers import pipelines

    original = pipelines.check_task

    def check_task(task: str) -> Any:
        name, metadata, options = original(task)
        if isinstance(metadata.get("impl"), str):
            module, _, attribute = metadata["impl"].rpartition(".")
            metadata = {**metadata, "impl": getattr(importlib.import_module(module), attribute)}
        return name, metadata, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original
