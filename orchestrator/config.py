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
merge_stage: null               # after the search, merges of checkpoints already trained (no retraining):
                                # {trials: 8, sources: [most_forgetting, least_forgetting]} (this sweep's
                                # eligible trials by forget mean) or checkpoint folders; space: overrides of
                                # search_spaces/merge_stage.yaml (combination, density, weights, scale, t)
max_concurrent_trials: null     # default: what the cluster's resources allow
resources_per_trial: {cpu: 1, gpu: 0}   # + workers: N for a multi-worker (DeepSpeed) trial
gpu_memory_gb: null             # memory of one GPU: a trial planned not to fit is refused
seed: 0
searcher: tpe                   # tpe (constrained TPE) | random (Optuna's random sampler, same constraint handling)
asha: {grace_period: 1, reduction_factor: 2}    # null: no early stopping (every trial runs all its epochs)
eval: {batch_size: 32, max_new_tokens: 256, dtype: bfloat16, answer_nll: false,
       backend: hf, vllm_memory: 0.4,   # vllm: the optional GPU backend, taking vllm_memory of each GPU
       screen: true, screen_fraction: 0.2, screen_margin: 0.05, screen_confidence: 0.95, screen_hold: 2}
mlflow: {tracking_uri: sqlite:///mlflow.db, experiment: null}   # experiment defaults to name
                                # relative paths, a SQLite file's included, are from this file's folder
ray_address: local              # or auto, on a cluster
storage_path: sweeps            # shared storage (NFS, S3) on a multi-node cluster
optuna_storage: null            # the Optuna study's database; default sqlite in storage_path/<name>/optuna.db
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from unlearn_sweep.corpus.checkpoints import BACKENDS, DTYPES
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.evaluation import vllm_inference
from unlearn_sweep.evaluation.eligibility import MmluThreshold
from unlearn_sweep.evaluation.options import EVAL_DEFAULTS, EvalOptions
from unlearn_sweep.orchestrator.tracking import check_store

SEARCHERS = ("tpe", "random")
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 2}


class ConfigError(DataError):
    """A bad sweep config value: names the file and the field."""


STAGE_SELECTORS = ("most_forgetting", "least_forgetting")  # this sweep's eligible trials, by forget mean


@dataclass
class MergeStage:
    """Merge trials over source checkpoints trained once, searched after the main trials."""

    trials: int
    sources: list[str]  # STAGE_SELECTORS entries or absolute checkpoint folders
    space: dict[str, Any]  # the checked merge space (search_spaces/merge_stage.yaml with overrides)


@dataclass
class SweepConfig:
    name: str
    model: Path
    data: Path
    mia: Path
    mmlu: Path
    methods: list[str]
    split: str | None = None
    held_out: Path | None = None
    mmlu_shots: int | None = None
    mmlu_threshold: MmluThreshold | None = None
    search_space_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    recipes: list[str] = field(default_factory=list)
    merge_stage: MergeStage | None = None
    trials: int = 8
    max_concurrent_trials: int | None = None
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    gpu_memory_gb: float | None = None
    seed: int = 0
    searcher: str = "tpe"
    asha: dict[str, int] | None = field(default_factory=lambda: dict(ASHA_DEFAULTS))
    eval: EvalOptions = field(default_factory=EvalOptions)
    mlflow: dict[str, str | None] = field(
        default_factory=lambda: {"tracking_uri": "sqlite:///mlflow.db", "experiment": None}
    )
    ray_address: str = "local"
    storage_path: str = "sweeps"  # absolute local path or a URI (s3://, gs://)
    optuna_storage: str | None = None  # a database URL; None: SQLite beside the sweep's Tune state
    source: Path = Path("<memory>")

    @property
    def experiment(self) -> str:
        return self.mlflow.get("experiment") or self.name

    @property
    def workers(self) -> int:
        """Ray Train workers per trial; each holds resources_per_trial's cpu and gpu."""
        return int(self.resources_per_trial.get("workers", 1))

    @property
    def study_storage(self) -> str:
        """Where the Optuna study lives: optuna-dashboard opens it, a resumed sweep continues it."""
        return self.optuna_storage or f"sqlite:///{self.storage_path}/{self.name}/optuna.db"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.get("tracking_uri") or "sqlite:///mlflow.db"


_KNOWN = {
    "name",
    "model",
    "data",
    "split",
    "mia",
    "held_out",
    "mmlu",
    "mmlu_shots",
    "mmlu_threshold",
    "methods",
    "search_space_overrides",
    "recipes",
    "merge_stage",
    "trials",
    "max_concurrent_trials",
    "resources_per_trial",
    "gpu_memory_gb",
    "seed",
    "searcher",
    "asha",
    "eval",
    "mlflow",
    "ray_address",
    "storage_path",
    "optuna_storage",
}


def _expect(path: Path, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(path, f"expected {what}, got {value!r}", field=key)
    return value


def _positive_ints(path: Path, key: str, mapping: Any, allowed: set[str]) -> dict[str, int]:
    _expect(path, key, mapping, dict, "a mapping")
    for name, value in mapping.items():
        if name not in allowed:
            raise ConfigError(path, f"unknown key {name!r} (valid: {', '.join(sorted(allowed))})", field=key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(path, f"{name} must be a positive integer, got {value!r}", field=key)
    return mapping


def config_from_dict(raw: Any, path: Path, base_dir: Path | None = None) -> SweepConfig:
    """Validate a parsed config; relative paths are taken from base_dir (the file's folder)."""
    from unlearn_sweep.methods.registry import ParamError, get_method

    base_dir = base_dir or path.parent
    if not isinstance(raw, dict):
        raise ConfigError(path, "expected a mapping of config keys")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise ConfigError(path, f"unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(_KNOWN))})")
    for key in ("name", "model", "data", "mia", "mmlu", "methods"):
        if raw.get(key) in (None, "", []):
            raise ConfigError(path, "required", field=key)
    name = _expect(path, "name", raw["name"], str, "a name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(path, "use letters, digits, '.', '_' and '-'", field="name")
    paths = {}
    for key in ("model", "data", "mia", "mmlu"):
        paths[key] = (base_dir / _expect(path, key, raw[key], str, "a path")).resolve()
        if not paths[key].exists():
            raise ConfigError(path, f"{paths[key]} does not exist", field=key)
    if not (paths["model"] / "config.json").is_file():  # all the memory plan reads; a sweep checks the weights too
        raise ConfigError(path, f"{paths['model']}: not a Hugging Face checkpoint (no config.json)", field="model")
    methods = raw["methods"] if isinstance(raw["methods"], list) else [raw["methods"]]
    for method in methods:
        try:
            get_method(_expect(path, "methods", method, str, "method names"))
        except ParamError as error:
            raise ConfigError(path, str(error), field="methods") from None
    held_out = _held_out(path, raw, paths["mia"], base_dir, methods)
    overrides = _expect(
        path,
        "search_space_overrides",
        raw.get("search_space_overrides") or {},
        dict,
        "a mapping of method to parameters",
    )
    for method, space in overrides.items():
        if method not in methods:
            raise ConfigError(path, f"method {method!r} is not among methods {methods}", field="search_space_overrides")
        _expect(path, f"search_space_overrides.{method}", space, dict, "a mapping of parameters")
    from unlearn_sweep.orchestrator.search import load_recipe, load_space, recipe_names

    # Every space checked now, with overrides, before anything starts; and every recipe against them.
    spaces = {method: load_space(method, overrides.get(method), config_path=path) for method in methods}
    recipes = _expect(path, "recipes", raw.get("recipes") or [], list, "a list of recipe names")
    for recipe in recipes:
        if _expect(path, "recipes", recipe, str, "recipe names") not in recipe_names():
            raise ConfigError(path, f"unknown recipe {recipe!r} (valid: {', '.join(recipe_names())})", field="recipes")
        try:
            load_recipe(recipe, spaces)
        except ConfigError as error:  # the recipe's file and field, after the user's
            raise ConfigError(path, str(error), field="recipes") from None
    merge_stage = None if raw.get("merge_stage") is None else _merge_stage(path, raw["merge_stage"], base_dir)
    threshold = raw.get("mmlu_threshold")
    if threshold is not None:
        try:
            threshold = MmluThreshold.parse(str(threshold))
        except ValueError as error:
            raise ConfigError(path, str(error), field="mmlu_threshold") from None
    resources = _expect(
        path, "resources_per_trial", raw.get("resources_per_trial") or {"cpu": 1, "gpu": 0}, dict, "a mapping"
    )
    for key, value in resources.items():
        if key not in ("cpu", "gpu", "workers"):
            raise ConfigError(path, f"unknown resource {key!r} (valid: cpu, gpu, workers)", field="resources_per_trial")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(path, f"{key} must be a non-negative number, got {value!r}", field="resources_per_trial")
    if resources.get("cpu", 1) <= 0:
        raise ConfigError(path, "cpu must be positive", field="resources_per_trial")
    workers = resources.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(path, f"workers must be a positive integer, got {workers!r}", field="resources_per_trial")
    if workers > 1 and "merge" in methods:
        raise ConfigError(
            path, "merge trials run in one process: use workers 1 or drop merge", field="resources_per_trial"
        )
    gpu_memory = raw.get("gpu_memory_gb")
    if gpu_memory is not None and (_expect(path, "gpu_memory_gb", gpu_memory, (int, float), "a number of GB") <= 0):
        raise ConfigError(path, "expected a positive number of GB", field="gpu_memory_gb")
    trials = _expect(path, "trials", raw.get("trials", 8), int, "a positive integer")
    if trials < 1:
        raise ConfigError(path, "expected a positive integer", field="trials")
    concurrent = raw.get("max_concurrent_trials")
    if concurrent is not None and (_expect(path, "max_concurrent_trials", concurrent, int, "a positive integer") < 1):
        raise ConfigError(path, "expected a positive integer", field="max_concurrent_trials")
    mlflow = _expect(path, "mlflow", raw.get("mlflow") or {}, dict, "a mapping")
    if set(mlflow) - {"tracking_uri", "experiment"}:
        raise ConfigError(path, "valid keys: tracking_uri, experiment", field="mlflow")
    storage = _expect(path, "storage_path", raw.get("storage_path", "sweeps"), str, "a path or URI")
    if "://" not in storage:
        storage = str((base_dir / storage).resolve())
        _require_writable(path, "storage_path", Path(storage))
    optuna_storage = raw.get("optuna_storage")
    if optuna_storage is not None and "://" not in _expect(
        path, "optuna_storage", optuna_storage, str, "a database URL"
    ):
        raise ConfigError(
            path,
            f"expected a database URL (sqlite:///..., postgresql://...), got {optuna_storage!r}",
            field="optuna_storage",
        )
    if optuna_storage is None and "://" in storage:
        raise ConfigError(
            path,
            "a remote storage_path cannot hold the Optuna study's SQLite file: set optuna_storage "
            "to a database URL (e.g. the MLflow server's PostgreSQL)",
            field="optuna_storage",
        )
    tracking_uri = absolute_tracking_uri(mlflow.get("tracking_uri") or "sqlite:///mlflow.db", base_dir)
    try:
        check_store(tracking_uri, existing=False)
    except DataError as error:
        raise ConfigError(path, str(error), field="mlflow.tracking_uri") from None
    return SweepConfig(
        name=name,
        model=paths["model"],
        data=paths["data"],
        mia=paths["mia"],
        mmlu=paths["mmlu"],
        methods=methods,
        split=raw.get("split"),
        held_out=held_out,
        mmlu_shots=None if raw.get("mmlu_shots") is None else _non_negative(path, "mmlu_shots", raw["mmlu_shots"]),
        mmlu_threshold=threshold,
        search_space_overrides=overrides,
        recipes=recipes,
        merge_stage=merge_stage,
        trials=trials,
        max_concurrent_trials=concurrent,
        resources_per_trial={"cpu": 1, "gpu": 0, **resources},
        gpu_memory_gb=gpu_memory,
        seed=_expect(path, "seed", raw.get("seed", 0), int, "an integer"),
        searcher=_one_of(path, "searcher", raw.get("searcher", "tpe"), SEARCHERS),
        asha=None
        if raw.get("asha", {}) is None
        else _positive_ints(
            path,
            "asha",
            {**ASHA_DEFAULTS, **_expect(path, "asha", raw.get("asha", {}), dict, "a mapping or null")},
            set(ASHA_DEFAULTS),
        ),
        eval=_eval_options(path, raw.get("eval") or {}),
        mlflow={"experiment": None, **mlflow, "tracking_uri": tracking_uri},
        ray_address=_expect(path, "ray_address", raw.get("ray_address", "local"), str, "local, auto or an address"),
        storage_path=storage,
        optuna_storage=optuna_storage,
        source=path,
    )


def _merge_stage(path: Path, raw: Any, base_dir: Path) -> MergeStage:
    from unlearn_sweep.orchestrator.search import load_space

    _expect(path, "merge_stage", raw, dict, "a mapping")
    unknown = sorted(set(raw) - {"trials", "sources", "space"})
    if unknown:
        raise ConfigError(
            path, f"unknown key(s) {', '.join(unknown)} (valid: trials, sources, space)", field="merge_stage"
        )
    trials = _expect(path, "merge_stage.trials", raw.get("trials", 8), int, "a positive integer")
    if trials < 1:
        raise ConfigError(path, "expected a positive integer", field="merge_stage.trials")
    sources = _expect(path, "merge_stage.sources", raw.get("sources", list(STAGE_SELECTORS)), list, "a list")
    if len(sources) < 2 or len(set(sources)) < len(sources):
        raise ConfigError(path, "name at least two different sources", field="merge_stage.sources")
    resolved = []
    for source in sources:
        if (
            _expect(path, "merge_stage.sources", source, str, f"{' or '.join(STAGE_SELECTORS)} or a checkpoint folder")
            in STAGE_SELECTORS
        ):
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
    overrides = _expect(path, "merge_stage.space", raw.get("space") or {}, dict, "a mapping of parameters")
    space = load_space("merge_stage", overrides, config_path=path)["params"]
    weights = space.get("weights")
    for value in weights.get("choice", []) if isinstance(weights, dict) else [weights] if weights else []:
        if len(str(value).split(",")) != len(resolved):
            raise ConfigError(
                path, f"weights {value!r}: one per source ({len(resolved)})", field="merge_stage.space.weights"
            )
    return MergeStage(trials, resolved, space)


def _held_out(path: Path, raw: dict, mia: Path, base_dir: Path, methods: list[str]) -> Path | None:
    """The held-out documents, checked now (readable, none in the scored MIA set) where a
    method of the sweep reads them; None where none does."""
    from unlearn_sweep.corpus.mia import default_held_out, load_held_out
    from unlearn_sweep.methods.registry import get_method

    users = [method for method in methods if get_method(method).uses_held_out]
    if raw.get("held_out") is not None:
        held_out = (base_dir / _expect(path, "held_out", raw["held_out"], str, "a path")).resolve()
    elif users:
        held_out = default_held_out(mia)
        if held_out is None:
            raise ConfigError(
                path,
                f"{', '.join(users)} needs documents the model never saw and the sweep does not score "
                f"(no {mia}/held_out.jsonl or {mia}/validation/nonmember.jsonl): name a JSONL of {{id, document}}",
                field="held_out",
            )
    else:
        return None
    try:
        load_held_out(held_out, mia)
    except DataError as error:
        raise ConfigError(path, str(error), field="held_out") from None
    return held_out


def _eval_options(path: Path, raw: Any) -> EvalOptions:
    options = {**EVAL_DEFAULTS, **_expect(path, "eval", raw, dict, "a mapping")}
    unknown = sorted(set(options) - set(EVAL_DEFAULTS))
    if unknown:
        raise ConfigError(
            path, f"unknown key(s) {', '.join(unknown)} (valid: {', '.join(EVAL_DEFAULTS)})", field="eval"
        )
    _positive_ints(
        path,
        "eval",
        {key: options[key] for key in ("batch_size", "max_new_tokens", "screen_hold")},
        {"batch_size", "max_new_tokens", "screen_hold"},
    )
    _one_of(path, "eval.dtype", options["dtype"], DTYPES)
    for key in ("answer_nll", "screen"):
        _expect(path, f"eval.{key}", options[key], bool, "true or false")
    if _one_of(path, "eval.backend", options["backend"], BACKENDS) == "vllm":
        if not vllm_inference.installed():
            raise ConfigError(path, vllm_inference.MISSING, field="eval.backend")
        if options["answer_nll"]:
            raise ConfigError(path, vllm_inference.NO_ANSWER_NLL, field="eval.answer_nll")
    ranges = {
        "vllm_memory": ("in (0, 1)", lambda v: 0 < v < 1),
        "screen_fraction": ("in (0, 1]", lambda v: 0 < v <= 1),
        "screen_margin": ("in [0, 1)", lambda v: 0 <= v < 1),
        "screen_confidence": ("in [0.5, 1)", lambda v: 0.5 <= v < 1),
    }
    for key, (interval, valid) in ranges.items():
        if not valid(_expect(path, f"eval.{key}", options[key], (int, float), "a number")):
            raise ConfigError(path, f"expected a number {interval}, got {options[key]!r}", field=f"eval.{key}")
    return EvalOptions(**options)


def _one_of(path: Path, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(path, f"expected one of {', '.join(allowed)}, got {value!r}", field=key)
    return value


def _non_negative(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(path, f"expected an integer >= 0, got {value!r}", field=key)
    return value


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
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(path, f"invalid YAML: {str(error).splitlines()[0]}") from None
    return config_from_dict(raw, path)
