"""The sweep config: one YAML file, validated whole before anything starts.

name: toy-demo                  # MLflow experiment and registered model name
model: toy_task/model           # local Hugging Face checkpoint (the base model)
data: toy_task/data             # task directory, any supported layout
split: null                     # train | validation, Hugging Face parquet layout only
mia: toy_task/mia
held_out: null                  # documents never seen nor scored, for methods that calibrate on them
                                # (mia_target); default mia/held_out.jsonl or mia/validation/nonmember.jsonl
mmlu: toy_task/mmlu
mmlu_shots: null                # null: 5 where the MMLU set has dev examples (as the organizers), else 0
mmlu_threshold: 0.75x           # absolute (0.371) or relative to the base model (0.75x)
methods: [grad_diff, npo]       # searched as a choice when more than one
search_space_overrides:         # per method, entries replacing search_spaces/<method>.yaml's
  npo: {beta: {uniform: [0.05, 0.3]}}
recipes: [organizers_npo]       # published settings tried first (search_spaces/recipes/<name>.yaml)
trials: 16
time_limit_s: null              # a run whose unlearning (evaluation excluded) takes longer is ineligible
confirm: {top_k: 5, split: validation, mia: toy_task/mia/validation}   # after the search (and merge stage),
                                # the best top_k configurations run again on the held-out fold; default on
                                # where the data has the other fold, null: off
select_by: held_out             # the champion: best eligible held-out score; tuned: best on the searched fold
merge_stage: null               # after the search, merges of checkpoints already trained (no retraining):
                                # {trials: 8, sources: [most_forgetting, least_forgetting]} (this sweep's
                                # eligible trials by forget mean) or checkpoint folders; space: overrides of
                                # search_spaces/merge_stage.yaml (combination, density, weights, scale, t)
max_concurrent_trials: null     # default: what the cluster's resources allow
resources_per_trial: {cpu: 1, gpu: 0}   # + workers: N for a multi-worker (DeepSpeed) trial
gpu_memory_gb: null             # memory of one GPU: a trial planned not to fit is refused
seed: 0
searcher: tpe_grouped           # constrained TPE, multivariate over each group of parameters sampled together,
                                # a constant liar for running trials | tpe (independent) | random
reproducible_search: false      # true: Optuna told the results in trial order, each trial suggested from the same
                                # ones on every run, whichever trial ends first (a slot may wait behind a late trial)
asha: null                      # no early stopping (every trial runs all its epochs), or
                                # {grace_period: 1, reduction_factor: 2}
eval: {batch_size: 32, max_new_tokens: 256, dtype: bfloat16, answer_nll: false,
       backend: hf, vllm_memory: 0.4,   # vllm: the optional GPU backend, taking vllm_memory of each GPU
       screen: true, screen_fraction: 0.2, screen_margin: 0.05, screen_confidence: 0.95, screen_hold: 2}
mlflow: {tracking_uri: sqlite:///mlflow.db, experiment: null}   # experiment defaults to name
                                # relative paths, a SQLite file's included, are from this file's folder
ray_address: local              # or auto, on a cluster
storage_path: sweeps            # on a multi-node cluster, shared storage every node mounts (NFS)
keep_checkpoints: 5             # an ended trial's checkpoint stays on storage_path only where its configuration is
                                # among its stage's 5 best (at least confirm's top_k) or a merge stage's source;
                                # all: every trial's (OLMo-2 7B's is 27 GiB in float32)
optuna_storage: null            # the Optuna study's database; default sqlite in storage_path/<name>/optuna.db
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.settings import ConfigError, field_errors, read_section, read_yaml, setting
from unlearn_sweep.evaluation import vllm_inference
from unlearn_sweep.evaluation.eligibility import MmluThreshold
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.orchestrator.tracking import check_store

SEARCHERS = ("tpe", "tpe_grouped", "random")
SPLITS = ("train", "validation")  # the folds of the Hugging Face layout
SELECT_BY = ("held_out", "tuned")
STAGE_SELECTORS = ("most_forgetting", "least_forgetting")  # this sweep's eligible trials, by forget mean
__all__ = ["ConfigError", "SweepConfig", "load_config"]


def _positive(value: Any) -> bool:
    return value > 0


@dataclass(frozen=True)
class Resources:
    """What one trial holds, per worker (a multi-worker trial is a Ray Train DeepSpeed run)."""

    cpu: float = setting(1.0, kind=float, what="a positive number of CPUs", valid=_positive)
    gpu: float = setting(0.0, kind=float, what="a number of GPUs >= 0", valid=lambda v: v >= 0)
    workers: int = setting(1, kind=int, what="a positive integer", valid=_positive)


@dataclass(frozen=True)
class Asha:
    """Ray Tune's ASHA scheduler: a trial may be stopped at epochs grace_period x factor^k."""

    grace_period: int = setting(1, kind=int, what="a positive integer", valid=_positive)
    reduction_factor: int = setting(2, kind=int, what="an integer >= 2", valid=lambda v: v >= 2)


@dataclass(frozen=True)
class Tracking:
    tracking_uri: str = setting("sqlite:///mlflow.db", kind=str, what="an MLflow tracking URI")
    experiment: str | None = setting(None, kind=str, what="an experiment name")


@dataclass(frozen=True)
class MergeStage:
    """Merge trials over source checkpoints trained once, searched after the main trials."""

    trials: int = setting(8, kind=int, what="a positive integer", valid=_positive)
    sources: tuple[str, ...] = setting(
        STAGE_SELECTORS,
        kind=list,
        what=f"a list of {' or '.join(STAGE_SELECTORS)} or checkpoint folders",
        valid=lambda v: all(isinstance(source, str) for source in v),
    )
    space: dict[str, Any] = setting(
        factory=dict, kind=dict, what="a mapping of parameters"
    )  # merge_stage.yaml's overrides


@dataclass(frozen=True)
class Confirm:
    """The confirmation stage: the best configurations run again, from the base model, on a
    held-out fold (SemEval ran each team's code on forget and retain sets it never saw)."""

    top_k: int = setting(5, kind=int, what="a positive integer", valid=_positive)
    split: str = setting("validation", kind=str, what="train or validation", valid=lambda v: v in SPLITS)
    mia: Path | None = setting(None, kind=str, what="a path")  # default <mia>/validation for the validation fold
    # for methods that read held-out documents: none may be scored there; default the sweep's
    # held_out where it is not in the fold's MIA set, else <mia>/nonmember.jsonl (not scored there)
    held_out: Path | None = setting(None, kind=str, what="a path")


# The files trials read, by field ("section.field" inside a section)
INPUT_FIELDS = ("model", "data", "mia", "mmlu", "held_out", "confirm.mia", "confirm.held_out")


@dataclass
class SweepConfig:
    """A sweep, as its YAML file gives it (module docstring); each field's setting() says what
    the file may hold there. Paths are absolute once read."""

    name: str = setting(
        kind=str,
        what="a name of letters, digits, '.', '_' and '-'",
        required=True,
        valid=lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) is not None,
    )
    model: Path = setting(kind=str, what="a path", required=True)
    data: Path = setting(kind=str, what="a path", required=True)
    mia: Path = setting(kind=str, what="a path", required=True)
    mmlu: Path = setting(kind=str, what="a path", required=True)
    methods: list[str] = setting(kind=(list, str), what="method names", required=True)
    split: str | None = setting(None, kind=str, what="train or validation", valid=lambda v: v in SPLITS)
    held_out: Path | None = setting(None, kind=str, what="a path")
    mmlu_shots: int | None = setting(None, kind=int, what="an integer >= 0", valid=lambda v: v >= 0)
    mmlu_threshold: MmluThreshold | None = setting(None, kind=(str, float, int), what="0.371 or 0.75x")
    search_space_overrides: dict[str, dict[str, Any]] = setting(
        factory=dict, kind=dict, what="a mapping of method to parameters"
    )
    recipes: list[str] = setting(
        factory=list,
        kind=list,
        what="a list of recipe names",
        valid=lambda v: all(isinstance(recipe, str) for recipe in v),
    )
    merge_stage: MergeStage | None = setting(None, kind=dict, what="a mapping", section=MergeStage, nullable=True)
    # null: off; absent: on where the data has the other fold (the HF layout) and its MIA set
    confirm: Confirm | None = setting(None, kind=dict, what="a mapping or null", section=Confirm, nullable=True)
    # which score picks the champion: held_out (its confirmation's) or tuned (the fold searched on)
    select_by: str = setting("tuned", kind=str, what="held_out or tuned", valid=lambda v: v in SELECT_BY)
    trials: int = setting(8, kind=int, what="a positive integer", valid=_positive)
    # SemEval's rule: a run whose unlearning (evaluation excluded) takes longer is ineligible
    time_limit_s: float | None = setting(None, kind=float, what="a positive number of seconds", valid=_positive)
    max_concurrent_trials: int | None = setting(None, kind=int, what="a positive integer", valid=_positive)
    resources_per_trial: Resources = setting(factory=Resources, kind=dict, what="a mapping", section=Resources)
    gpu_memory_gb: float | None = setting(None, kind=float, what="a positive number of GB", valid=_positive)
    seed: int = setting(0, kind=int, what="an integer")
    # The defaults are the best strategy of the tabular replay (benchmarks/search_replay.py) at 32 trials:
    # grouped multivariate TPE, no early stopping.
    searcher: str = setting(
        "tpe_grouped", kind=str, what=f"one of {', '.join(SEARCHERS)}", valid=lambda v: v in SEARCHERS
    )
    # Optuna told in trial order (search.py: InTrialOrder): the same trials on every run
    reproducible_search: bool = setting(False, kind=bool, what="true or false")
    asha: Asha | None = setting(None, kind=dict, what="a mapping or null", section=Asha, nullable=True)
    eval: EvalOptions = setting(factory=EvalOptions, kind=dict, what="a mapping", section=EvalOptions)
    mlflow: Tracking = setting(factory=Tracking, kind=dict, what="a mapping", section=Tracking)
    ray_address: str = setting("local", kind=str, what="local, auto or an address")
    storage_path: str = setting("sweeps", kind=str, what="a path")  # absolute once read
    optuna_storage: str | None = setting(
        None, kind=str, what="a database URL (sqlite:///..., postgresql://...)", valid=lambda v: "://" in v
    )  # None: SQLite beside the sweep's Tune state
    # the best distinct configurations of each stage whose checkpoints stay once their trials ended (retention.py)
    keep_checkpoints: int | str = setting(
        5, kind=(int, str), what="a positive integer or all", valid=lambda v: v == "all" or (type(v) is int and v > 0)
    )
    source: Path = Path("<memory>")

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def workers(self) -> int:
        """Ray Train workers per trial; each holds resources_per_trial's cpu and gpu."""
        return self.resources_per_trial.workers

    @property
    def study_storage(self) -> str:
        """Where the Optuna study lives: optuna-dashboard opens it, a resumed sweep continues it."""
        return self.optuna_storage or f"sqlite:///{self.storage_path}/{self.name}/optuna.db"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri

    @property
    def merge_stage_name(self) -> str:
        return f"{self.name}-merge"

    @property
    def confirmation_name(self) -> str:
        return f"{self.name}-confirm"

    @property
    def stage_folders(self) -> list[Path]:
        """The Tune experiment folders of the stages the sweep may run, under storage_path."""
        names = [self.name, self.confirmation_name] + ([self.merge_stage_name] if self.merge_stage else [])
        return [Path(self.storage_path, name) for name in names]

    @property
    def trial_inputs(self) -> dict[str, Path]:
        """What trials read, by the field that names it (INPUT_FIELDS given)."""
        inputs = {}
        for field in INPUT_FIELDS:
            section, _, name = field.rpartition(".")
            path = getattr(getattr(self, section) if section else self, name, None)
            if path is not None:
                inputs[field] = path
        return inputs

    @property
    def checkpoints_kept(self) -> int | None:
        """How many of each stage's best distinct configurations keep their checkpoints (None:
        every trial's): at least the confirmation's top_k, among which the champion is chosen."""
        if self.keep_checkpoints == "all":
            return None
        return max(self.keep_checkpoints, self.confirm.top_k if self.confirm else 1)


def config_from_dict(raw: Any, path: Path, base_dir: Path | None = None) -> SweepConfig:
    """Validate a parsed config: each key against its setting(), then what relates keys to each
    other and to the files they name. Relative paths are from base_dir (the file's folder)."""
    base_dir = base_dir or path.parent
    values = read_section(path, raw, SweepConfig)
    for key in ("model", "data", "mia", "mmlu", "held_out"):
        if key in values:
            values[key] = (base_dir / values[key]).resolve()
            if not values[key].exists():
                raise ConfigError(path, f"{values[key]} does not exist", field=key)
    if not (values["model"] / "config.json").is_file():  # all the memory plan reads; a sweep checks the weights too
        raise ConfigError(path, f"{values['model']}: not a Hugging Face checkpoint (no config.json)", field="model")
    methods = values["methods"] = _methods(path, values["methods"])
    values["held_out"] = _held_out(path, values.get("held_out"), values["mia"], methods)
    _spaces(path, values.get("search_space_overrides", {}), methods, values.get("recipes", []))
    if "mmlu_threshold" in values:
        with field_errors(path, "mmlu_threshold"):
            values["mmlu_threshold"] = MmluThreshold.parse(str(values["mmlu_threshold"]))
    if values.get("merge_stage") is not None:
        values["merge_stage"] = _merge_stage(path, values["merge_stage"], base_dir)
    values["confirm"] = _confirm(path, raw, values, base_dir)
    _check_mia(path, values)
    if values.get("select_by") == "held_out" and values["confirm"] is None:
        raise ConfigError(path, "held_out needs a confirmation stage (confirm)", field="select_by")
    values.setdefault("select_by", "held_out" if values["confirm"] else "tuned")
    resources = values.get("resources_per_trial", Resources())
    if resources.workers > 1 and "merge" in methods:
        raise ConfigError(
            path, "merge trials run in one process: use workers 1 or drop merge", field="resources_per_trial"
        )
    if resources.workers > 1 and 0 < resources.gpu < 1:
        raise ConfigError(
            path,
            f"{resources.workers} workers of gpu {resources.gpu:g} would share one GPU, which NCCL refuses "
            "('Duplicate GPU detected'): give each worker a whole GPU (gpu: 1) or use workers: 1",
            field="resources_per_trial",
        )
    if "eval" in values:
        _check_backend(path, values["eval"], resources)
    storage = values.get("storage_path", "sweeps")
    if "://" in storage:
        # Ray would run it, but checkpoints in a bucket are no folders: the champion could not be
        # registered (the sweep would say no trial was eligible) nor a merge stage read its sources.
        raise ConfigError(
            path,
            f"{storage}: remote storage is not supported: the champion is registered, and merge sources read, "
            "from checkpoint folders; give a path every node mounts (NFS)",
            field="storage_path",
        )
    storage = values["storage_path"] = str((base_dir / storage).resolve())
    _require_writable(path, "storage_path", Path(storage))
    tracking = values.get("mlflow", Tracking())
    tracking_uri = absolute_tracking_uri(tracking.tracking_uri, base_dir)
    with field_errors(path, "mlflow.tracking_uri"):
        check_store(tracking_uri, existing=False)
    values["mlflow"] = Tracking(tracking_uri, tracking.experiment)
    return SweepConfig(**values, source=path)


def _methods(path: Path, raw: list | str) -> list[str]:
    from unlearn_sweep.methods.registry import get_method

    methods = raw if isinstance(raw, list) else [raw]
    for method in methods:
        if not isinstance(method, str):
            raise ConfigError(path, f"expected method names, got {method!r}", field="methods")
        with field_errors(path, "methods"):
            get_method(method)
    return methods


def _spaces(path: Path, overrides: dict[str, Any], methods: list[str], recipes: list[str]) -> None:
    """Every space checked with its overrides now (before anything starts), and every recipe
    against them."""
    from unlearn_sweep.orchestrator.search import load_recipe, load_space, recipe_names

    for method, space in overrides.items():
        if method not in methods:
            raise ConfigError(path, f"method {method!r} is not among methods {methods}", field="search_space_overrides")
        if not isinstance(space, dict):
            field = f"search_space_overrides.{method}"
            raise ConfigError(path, f"expected a mapping of parameters, got {space!r}", field=field)
    spaces = {method: load_space(method, overrides.get(method), config_path=path) for method in methods}
    for recipe in recipes:
        if recipe not in recipe_names():
            raise ConfigError(path, f"unknown recipe {recipe!r} (valid: {', '.join(recipe_names())})", field="recipes")
        with field_errors(path, "recipes"):  # the recipe's file and field, after the user's
            load_recipe(recipe, spaces)


def _merge_stage(path: Path, stage: MergeStage, base_dir: Path) -> MergeStage:
    from unlearn_sweep.orchestrator.search import load_space

    if len(stage.sources) < 2 or len(set(stage.sources)) < len(stage.sources):
        raise ConfigError(path, "name at least two different sources", field="merge_stage.sources")
    resolved = []
    for source in stage.sources:
        if source in STAGE_SELECTORS:
            resolved.append(source)
            continue
        folder = (base_dir / source).resolve()
        if not (folder / "config.json").is_file():
            raise ConfigError(
                path,
                f"{folder}: not a Hugging Face checkpoint (no config.json), nor one of {', '.join(STAGE_SELECTORS)}",
                field="merge_stage.sources",
            )
        resolved.append(str(folder))
    space = load_space("merge_stage", stage.space, config_path=path)["params"]
    weights = space.get("weights")
    for value in weights.get("choice", []) if isinstance(weights, dict) else [weights] if weights else []:
        if len(str(value).split(",")) != len(resolved):
            raise ConfigError(
                path, f"weights {value!r}: one per source ({len(resolved)})", field="merge_stage.space.weights"
            )
    return MergeStage(stage.trials, tuple(resolved), space)


def _confirm(path: Path, raw: dict, values: dict[str, Any], base_dir: Path) -> Confirm | None:
    """The confirmation stage with its paths resolved and checked, or None. Absent from the
    file, it is on where the data has the other fold and that fold's MIA set is found."""
    from unlearn_sweep.corpus.mia import check_mia_fold, load_mia
    from unlearn_sweep.corpus.semeval import hf_folds, load_held_out_fold

    tuned = values.get("split") or "train"
    confirm = values.get("confirm")
    if "confirm" not in raw:
        # Only a fold that is absent turns it off: a broken one is an error, not a silent
        # switch to selecting on the fold searched on.
        other_fold = tuned == "train" and "validation" in hf_folds(values["data"])
        if not other_fold or not (values["mia"] / "validation").is_dir():
            return None
        confirm = Confirm(split="validation")
    elif confirm is None:
        return None
    elif confirm.split == tuned:
        raise ConfigError(path, f"{confirm.split} is the fold the sweep searches on", field="confirm.split")
    with field_errors(path, "confirm.split" if "confirm" in raw else "data"):
        load_held_out_fold(values["data"], confirm.split, values.get("split"))
    mia = (base_dir / confirm.mia).resolve() if confirm.mia else values["mia"] / confirm.split
    with field_errors(path, "confirm.mia"):
        check_mia_fold(load_mia(mia), mia, values["data"], confirm.split)
    held_out = None
    if values["held_out"] is not None:
        held_out = _confirm_held_out(path, confirm, values["held_out"], values["mia"], mia, base_dir)
    return dataclasses.replace(confirm, mia=mia, held_out=held_out)


def _check_mia(path: Path, values: dict[str, Any]) -> None:
    """The MIA set is read now, refused if it holds the other fold's documents (`mia:
    <mia>/validation` for a search on train): its scores would measure forgetting of documents
    the runs never unlearned. (`confirm.mia` is checked so where `_confirm` reads it.)"""
    from unlearn_sweep.corpus.mia import check_mia_fold, load_mia

    with field_errors(path, "mia"):
        check_mia_fold(load_mia(values["mia"]), values["mia"], values["data"], values.get("split"))


def _confirm_held_out(
    path: Path, confirm: Confirm, sweep_held_out: Path, mia: Path, confirm_mia: Path, base_dir: Path
) -> Path:
    """Held-out documents for the confirmation runs: none of them scored in the fold's MIA set."""
    from unlearn_sweep.corpus.mia import load_held_out

    if confirm.held_out is not None:
        held_out = (base_dir / confirm.held_out).resolve()
        with field_errors(path, "confirm.held_out"):
            load_held_out(held_out, confirm_mia)
        return held_out
    for candidate in (sweep_held_out, mia / "nonmember.jsonl"):
        try:
            load_held_out(candidate, confirm_mia)
            return candidate
        except DataError:
            continue
    raise ConfigError(
        path,
        f"neither {sweep_held_out} nor {mia / 'nonmember.jsonl'} is free of the documents {confirm_mia} scores: "
        "name a JSONL of {id, document}",
        field="confirm.held_out",
    )


def _held_out(path: Path, held_out: Path | None, mia: Path, methods: list[str]) -> Path | None:
    """The held-out documents, checked now (readable, none in the scored MIA set) where a
    method of the sweep reads them; None where none does."""
    from unlearn_sweep.corpus.mia import default_held_out, load_held_out
    from unlearn_sweep.methods.registry import get_method

    users = [method for method in methods if get_method(method).uses_held_out]
    if held_out is None and not users:
        return None
    if held_out is None:
        held_out = default_held_out(mia)
        if held_out is None:
            raise ConfigError(
                path,
                f"{', '.join(users)} needs documents the model never saw and the sweep does not score "
                f"(no {mia}/held_out.jsonl or {mia}/validation/nonmember.jsonl): name a JSONL of {{id, document}}",
                field="held_out",
            )
    with field_errors(path, "held_out"):
        load_held_out(held_out, mia)
    return held_out


def _check_backend(path: Path, options: EvalOptions, resources: Resources) -> None:
    if options.backend == "vllm":
        if not vllm_inference.installed():
            raise ConfigError(path, vllm_inference.MISSING, field="eval.backend")
        if options.answer_nll:
            raise ConfigError(path, vllm_inference.NO_ANSWER_NLL, field="eval.answer_nll")
        if resources.gpu < 1:
            raise ConfigError(path, vllm_inference.SHARED_GPU, field="eval.backend")


def _require_writable(path: Path, key: str, folder: Path) -> None:
    """The folder, or the nearest existing folder above it, can be written: found now, not
    after the parent run is created and the base model evaluated."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    try:
        os.rmdir(
            tempfile.mkdtemp(prefix=".write-check-", dir=existing)
        )  # a real probe: access() says yes to root everywhere
    except OSError as error:
        raise ConfigError(path, f"{folder} cannot be written ({existing}: {error.strerror})", field=key) from None


def absolute_tracking_uri(uri: str, base_dir: Path) -> str:
    """A relative SQLite path made absolute from base_dir (the config file's folder, as every
    other relative path of the config), so that trials (which run in their own folders) write to
    the same store as the driver, wherever the sweep was started from."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((base_dir / uri[len(prefix) :]).resolve())
    return uri


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "config file not found")
    return config_from_dict(read_yaml(path), path)
