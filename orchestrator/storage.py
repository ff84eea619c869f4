"""What a sweep holds on storage_path at most, planned before it starts, and refused where the
file system cannot hold it: a 7B sweep fills hundreds of GiB, and a disk found full at its
tenth trial fails that trial and every one after it.

A checkpoint is a whole model (`Method.checkpoint_bytes`: OLMo-2 7B is 27 GiB in float32).
Each stage keeps its ended trials' checkpoints that can still matter (`retention.py`: the
`keep_checkpoints` best distinct configurations and the merge stage's picks; every one with
`keep_checkpoints: all`), the confirmation keeps all of its `top_k`, and a running trial
holds its best epoch's and, while Tune copies a better one in, that one too. A merge search
whose sources can recur caches each distinct source it trains until the sweep completes.
Beside, a running trial keeps in its node's TMPDIR the epoch being scored and those screening
holds, a task vector's fine-tuned model while it is negated, a merge's uncached sources:
checked on this machine for a local Ray, and on each node of a cluster that can run trials
(nodes.py: its TMPDIR's free space, against the trials it holds at once). Not counted: the
champion's copy in MLflow's artifact store."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_sweep.corpus.scratch import free_bytes, nearest_folder
from unlearn_sweep.methods.memory_plan import GIB, ModelShape
from unlearn_sweep.methods.registry import get_method
from unlearn_sweep.orchestrator.config import STAGE_SELECTORS, ConfigError, SweepConfig
from unlearn_sweep.orchestrator.context import caches_sources
from unlearn_sweep.orchestrator.nodes import Scratch
from unlearn_sweep.orchestrator.plan import worst_cases
from unlearn_sweep.orchestrator.search import distinct_settings, load_space

RUNNING_COPIES = 2  # a running trial's best checkpoint and the better one Tune copies in before removing it


@dataclass(frozen=True)
class Held:
    """Checkpoints of one kind a sweep may hold at once."""

    what: str  # "search", "merge stage", "confirmation", "merge sources"
    count: int
    size: int  # bytes of the largest of them

    @property
    def total(self) -> int:
        return self.count * self.size


@dataclass(frozen=True)
class StoragePlan:
    held: tuple[Held, ...]  # those of ended trials, and cached sources
    running: int  # bytes one running trial holds on storage_path at most
    local: int  # bytes one running trial holds on its node's TMPDIR at most

    def need(self, concurrent: int) -> int:
        """Bytes on storage_path at most, with `concurrent` trials running."""
        return sum(held.total for held in self.held) + concurrent * self.running


def _worst_cases(config: SweepConfig, method: str, space: dict[str, Any]) -> list[Any]:
    """The memory plan's worst cases of the space, as the sweep's trials run them (a
    multi-worker trial's ZeRO stage, bf16 on GPUs)."""
    return worst_cases(method, space, config.workers, on_gpu=config.resources_per_trial.gpu > 0)


def _largest_checkpoint(config: SweepConfig, shape: ModelShape, method: str, space: dict[str, Any]) -> int:
    method_object = get_method(method)
    return max(method_object.checkpoint_bytes(shape, params) for params in _worst_cases(config, method, space))


def plan_storage(config: SweepConfig) -> StoragePlan:
    shape = ModelShape.from_config(config.model)
    kept = config.checkpoints_kept
    # an epoch being scored, those screening holds until the next decision (evaluation/staged.py)
    scored = 1 + (config.eval.screen_hold if config.eval.screen else 0)
    held = []
    searched, local, sources = 0, 0, None
    for method in config.methods:
        space = load_space(method, config.search_space_overrides.get(method))
        if "sources" not in space:
            method_object = get_method(method)
            for params in _worst_cases(config, method, space["params"]):
                size = method_object.checkpoint_bytes(shape, params)
                searched = max(searched, size)
                local = max(local, scored * size + method_object.export_scratch_bytes(shape, params))
            continue
        merged = get_method(method).checkpoint_bytes(shape, None)
        trained = [
            _largest_checkpoint(config, shape, space["source_method"], entries) for entries in space["sources"].values()
        ]
        searched = max(searched, merged)
        if caches_sources(config):
            # each trial draws one setting of every source
            distinct = sum(distinct_settings(entries, config.trials) for entries in space["sources"].values())
            sources = Held("merge sources", distinct, max(trained))
            local = max(local, merged)  # a merge is scored once
        else:  # trained into the trial's own folder, removed when its merge is done
            local = max(local, merged + sum(trained))
    stage = config.merge_stage
    picks = sum(source in STAGE_SELECTORS for source in stage.sources) if stage else 0
    held.append(Held("search", min(config.trials, config.trials if kept is None else kept + picks), searched))
    largest = searched
    if stage is not None:
        merged = get_method("merge").checkpoint_bytes(shape, None)
        held.append(Held("merge stage", min(stage.trials, stage.trials if kept is None else kept), merged))
        largest = max(largest, merged)
        local = max(local, merged)
    if config.confirm is not None:
        held.append(Held("confirmation", config.confirm.top_k, largest))
    if sources is not None:
        held.append(sources)
        largest = max(largest, sources.size)
    return StoragePlan(tuple(held), RUNNING_COPIES * largest, local)


def format_storage(plan: StoragePlan, config: SweepConfig, concurrent: int | None) -> str:
    """The plan's line: what the sweep holds at most on storage_path, and the free space there."""
    running = (
        f"{concurrent} running"
        if concurrent
        else f"one running; each further one +{plan.running / GIB:.1f} GiB (max_concurrent_trials unset)"
    )
    scratch = Path(tempfile.gettempdir())
    return (
        f"storage_path {config.storage_path}: at most {plan.need(concurrent or 1) / GIB:.1f} GiB at once "
        f"({_parts(plan)}, {running}); {free_bytes(Path(config.storage_path)) / GIB:.1f} GiB free; "
        f"each running trial also holds up to {plan.local / GIB:.1f} GiB in its node's TMPDIR "
        f"({nearest_folder(scratch)} here: {free_bytes(scratch) / GIB:.1f} GiB free)"
    )


def _parts(plan: StoragePlan) -> str:
    held = ", ".join(f"{held.what} {held.count} x {held.size / GIB:.2f} GiB" for held in plan.held)
    return f"{held}, {RUNNING_COPIES} x {plan.running / RUNNING_COPIES / GIB:.2f} GiB per running trial"


def used_bytes(folder: Path) -> int:
    """What a folder holds already (a resumed sweep's checkpoints count against its plan)."""
    if not folder.exists():
        return 0
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def check_storage(config: SweepConfig, plan: StoragePlan, concurrent: int) -> None:
    """A ConfigError where storage_path's file system cannot hold what the sweep may hold at
    once (a resumed sweep's stage folders already hold part of it), or, on a local Ray, where
    this machine's TMPDIR cannot hold what its running trials keep there (beside storage_path's
    share where both are one file system)."""
    used = sum(used_bytes(folder) for folder in config.stage_folders)
    need = plan.need(concurrent)
    storage = Path(config.storage_path)
    free = free_bytes(storage)
    if need - used > free:
        already = f", {used / GIB:.1f} GiB of it there already" if used else ""
        raise ConfigError(
            config.source,
            f"{config.storage_path} has {free / GIB:.1f} GiB free, and the sweep may hold {need / GIB:.1f} GiB "
            f"there at once ({_parts(plan)}, {concurrent} running{already}); lower keep_checkpoints or "
            "max_concurrent_trials, or use a larger file system",
            field="storage_path",
        )
    if config.ray_address != "local":
        return  # the trials' nodes' disks are not this machine's: check_scratch, from each node
    scratch = nearest_folder(Path(tempfile.gettempdir()))
    shared = scratch.stat().st_dev == nearest_folder(storage).stat().st_dev
    beside = max(0, need - used) if shared else 0
    _check_scratch(config, plan, Scratch("", str(scratch), free_bytes(scratch), concurrent), beside)


def check_scratch(config: SweepConfig, plan: StoragePlan, nodes: list[Scratch], concurrent: int) -> None:
    """A ConfigError where a cluster node's TMPDIR cannot hold what the trials it runs at once
    (at most `concurrent`) keep there."""
    for node in nodes:
        _check_scratch(config, plan, dataclasses.replace(node, trials=min(node.trials, concurrent)), 0)


def _check_scratch(config: SweepConfig, plan: StoragePlan, scratch: Scratch, beside: int) -> None:
    """The error where `scratch.trials` running trials' share of TMPDIR, and `beside` bytes
    storage_path may add on the same disk, exceed its free space."""
    local = scratch.trials * plan.local
    if local + beside <= scratch.free:
        return
    where = f"on node {scratch.node}, " if scratch.node else ""
    trials = f"{scratch.trials} running trial{'s' if scratch.trials > 1 else ''}"
    also = f", beside the {beside / GIB:.1f} GiB storage_path may add on the same disk" if beside else ""
    raise ConfigError(
        config.source,
        f"{where}TMPDIR {scratch.folder} has {scratch.free / GIB:.1f} GiB free, and {trials} may hold "
        f"{local / GIB:.1f} GiB there (each up to {plan.local / GIB:.1f} GiB: the epoch being scored and those "
        f"screening holds){also}; lower max_concurrent_trials or eval.screen_hold, or point TMPDIR at a larger disk",
        field="max_concurrent_trials",
    )
