"""Search spaces (data in search_spaces/<method>.yaml) and the Optuna searcher that also
hands the constraints (MMLU threshold, time limit) to Optuna.

A search space maps each hyperparameter of the method to a constant or a distribution:
    learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}
    epochs: {int: [1, 3]}
    beta: {uniform: [0.05, 0.5]}
    adapter: {choice: [full, lora]}
    lora_rank: {choice: [4, 8], if: {adapter: lora}}    # sampled only when the condition holds
    batch_size: 16                                      # constant
    learning_rate:                                      # one distribution per condition: the first
      - {log_uniform: [3.0e-6, 5.0e-5], if: {adapter: full}}   # whose condition holds is sampled
      - {log_uniform: [5.0e-5, 3.0e-4], if: {adapter: lora}}   # (Optuna: learning_rate[adapter=lora])
The merge method's space names a `source_method`, `sources` (names of the models to train
and merge, each a space of overrides for the source method) and its own parameters.

A recipe (search_spaces/recipes/<name>.yaml) is a published setting as data: a method and a
value for some of its parameters (and, for merge, its sources'). A sweep that names it tries it
first, as an enqueued Optuna trial; every value must be one the sweep's space can sample, so
that the point tried is the point Optuna records.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import logging
import math
import pickle
from collections.abc import Callable
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from unlearn_sweep.corpus.compat import optuna_trial, remember_optuna_trial
from unlearn_sweep.corpus.settings import read_yaml
from unlearn_sweep.evaluation.eligibility import OBJECTIVE
from unlearn_sweep.orchestrator.config import ConfigError, SweepConfig

if TYPE_CHECKING:
    from unlearn_sweep.methods.registry import Method

# Package data: the same in an editable install, a wheel and an sdist.
SPACES_DIR = importlib.resources.files("unlearn_sweep.search_spaces")
RECIPES_DIR = SPACES_DIR / "recipes"
DISTRIBUTIONS = ("log_uniform", "uniform", "int", "log_int", "choice")
# Optuna's constraint names and the reported slacks they take (<= 0 feasible; eligibility.py: Limits)
CONSTRAINTS = {"mmlu_threshold": "objective_mmlu_slack", "time_limit_s": "objective_time_slack"}
MERGE_STAGE = "merge_stage"  # the space of a sweep's merge stage (config.py: MergeStage)
STUDY_TRIAL = "study_trial"  # the Optuna trial number in each Tune config
log = logging.getLogger(__name__)


def load_space(
    method: str,
    overrides: dict[str, Any] | None = None,
    spaces_dir: Traversable | Path = SPACES_DIR,
    config_path: Path | None = None,
) -> dict[str, Any]:
    """The method's space with overrides applied, checked against the method's parameters:
    names, distributions, and constants and choices of the parameter's type. An error in an
    override names config_path (the user's sweep config) and its field there."""
    path = spaces_dir / f"{method}.yaml"
    if not path.is_file():
        raise ConfigError(path, f"no search space for method {method!r}")
    space = read_yaml(path) or {}
    overridden = set(overrides or {})
    space = {**space, **(overrides or {})}

    def locate(name: str, prefix: str = "") -> tuple[Any, str]:
        if config_path is not None and not prefix and name in overridden:
            return (
                config_path,
                f"merge_stage.space.{name}" if method == MERGE_STAGE else f"search_space_overrides.{method}.{name}",
            )
        return path, f"{prefix}.{name}" if prefix else name

    if method == MERGE_STAGE:  # merge's own parameters over checkpoints given to it, not trained by it
        return {"params": _check("merge", space, locate, exclude={"models"})}
    if method == "merge":
        source = space.pop("source_method", None)
        sources = space.pop("sources", None)
        if source is None or not isinstance(sources, dict) or len(sources) < 2:
            path_of_sources, field = locate("sources")
            raise ConfigError(path_of_sources, "merge needs source_method and at least two named sources", field=field)
        base = load_space(source, None, spaces_dir)["params"]
        checked = {
            name: _check(source, {**base, **(entries or {})}, lambda key, name=name: locate(key, f"sources.{name}"))
            for name, entries in sources.items()
        }
        return {
            "source_method": source,
            "sources": checked,
            "params": _check(method, space, locate, exclude={"models"}),
        }
    return {"params": _check(method, space, locate)}


def _check(
    method: str, space: dict[str, Any], locate: Callable[[str], tuple[Any, str]], exclude: set[str] = frozenset()
) -> dict[str, Any]:
    from unlearn_sweep.methods.registry import get_method

    method_object = get_method(method)
    valid = {f.name for f in dataclasses.fields(method_object.Params)} - exclude
    for name, spec in space.items():
        path, where = locate(name)
        if name not in valid:
            raise ConfigError(
                path, f"not a hyperparameter of {method} (valid: {', '.join(sorted(valid))})", field=where
            )
        if isinstance(spec, list) and not (spec and all(isinstance(entry, dict) and entry.get("if") for entry in spec)):
            raise ConfigError(path, "a list holds one distribution per condition, each with its 'if'", field=where)
        for distribution in distributions(spec) or [spec]:
            _check_distribution(method_object, name, distribution, space, path, where)
        if isinstance(spec, list):
            _check_covered(name, spec, space, path, where)
    return _with_derived_conditions(method_object, space)


def _check_covered(name: str, spec: list[dict[str, Any]], space: dict[str, Any], path: Any, where: str) -> None:
    """One distribution per condition leaves no value of what the conditions read without one
    (a parameter left unsampled would train at its default, unseen)."""
    others = list(dict.fromkeys(other for entry in spec for other in entry["if"]))
    values = [possible_values(space.get(other)) for other in others]
    for other, possible in zip(others, values, strict=True):
        if possible is None:
            raise ConfigError(path, f"its conditions read {other}, which is not a choice", field=where)
    for combination in itertools.product(*values):
        assignment = dict(zip(others, combination, strict=True))
        if active_distribution(name, spec, assignment) is None:
            raise ConfigError(
                path, f"no distribution where {_condition_phrase(assignment)}: add one for it", field=where
            )


def distributions(spec: Any) -> list[dict[str, Any]]:
    """A space entry's distributions: none for a constant, one, or one per condition (a list)."""
    return spec if isinstance(spec, list) else [spec] if isinstance(spec, dict) else []


def choices_or_bounds(distribution: dict[str, Any]) -> list[Any]:
    """A distribution's choices, or its range's [low, high]."""
    return next(distribution[kind] for kind in DISTRIBUTIONS if kind in distribution)


def possible_values(spec: Any) -> list[Any] | None:
    """The values a space entry can take: a constant, or its choices; None for a range."""
    if not distributions(spec):
        return [spec]
    if not all("choice" in distribution for distribution in distributions(spec)):
        return None
    return list(dict.fromkeys(value for distribution in distributions(spec) for value in distribution["choice"]))


def _check_distribution(
    method_object: Method, name: str, spec: Any, space: dict[str, Any], path: Any, where: str
) -> None:
    """A constant or one distribution of the parameter `name`."""
    from unlearn_sweep.methods.registry import ParamError, check_value

    constants = (
        [spec] if not isinstance(spec, dict) else spec.get("choice") if isinstance(spec.get("choice"), list) else []
    )
    for value in constants:  # a wrong type would fail every trial that samples it
        try:
            check_value(method_object, name, value)
        except ParamError as error:
            raise ConfigError(path, str(error), field=where) from None
    if not isinstance(spec, dict):
        return
    kinds = [key for key in spec if key in DISTRIBUTIONS]
    if len(kinds) != 1 or set(spec) - set(DISTRIBUTIONS) - {"if"}:
        raise ConfigError(path, f"expected one of {', '.join(DISTRIBUTIONS)} (and optionally 'if')", field=where)
    values = spec[kinds[0]]
    if kinds[0] == "choice":
        if not isinstance(values, list) or not values:
            raise ConfigError(path, "choice needs a non-empty list", field=where)
    elif not (
        isinstance(values, list)
        and len(values) == 2
        and all(isinstance(v, (int, float)) for v in values)
        and values[0] <= values[1]
    ):
        raise ConfigError(path, f"{kinds[0]} needs [low, high] with low <= high", field=where)
    elif kinds[0].startswith("log") and values[0] <= 0:
        raise ConfigError(path, "a log scale needs low > 0", field=where)
    condition = spec.get("if")
    if condition is not None and (not isinstance(condition, dict) or set(condition) - set(space)):
        raise ConfigError(path, "'if' must map other parameters of this space to values", field=where)


def _with_derived_conditions(method: Method, space: dict[str, Any]) -> dict[str, Any]:
    """The method's own conditions (Method.conditions) on each distribution that states none,
    the parameters they depend on moved first so that they are sampled before."""
    conditions = method.conditions()
    derived = {
        name: {**spec, "if": conditions[name]}
        if isinstance(spec, dict) and "if" not in spec and name in conditions and set(conditions[name]) <= set(space)
        else spec
        for name, spec in space.items()
    }
    first = {other for spec in derived.values() for entry in distributions(spec) for other in entry.get("if") or {}}
    return {**{name: derived[name] for name in space if name in first}, **derived}


def recipe_names(recipes_dir: Traversable | Path = RECIPES_DIR) -> list[str]:
    return sorted(entry.name[: -len(".yaml")] for entry in recipes_dir.iterdir() if entry.name.endswith(".yaml"))


def load_recipe(
    name: str, spaces: dict[str, dict[str, Any]], recipes_dir: Traversable | Path = RECIPES_DIR
) -> dict[str, Any]:
    """The recipe as an Optuna point of the sweep's spaces ({"method": ..., "<method>/<param>": value}),
    or a ConfigError naming the recipe's file and field."""
    path = recipes_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(path, f"no recipe {name!r} (recipes: {', '.join(recipe_names(recipes_dir))})")
    recipe = read_yaml(path) or {}
    method = recipe.get("method")
    if method not in spaces:
        raise ConfigError(
            path, f"method {method!r} is not among the sweep's methods ({', '.join(sorted(spaces))})", field="method"
        )
    space = spaces[method]
    point = {"method": method}
    groups = [("params", space["params"], recipe.get("params") or {}, method)]
    for source, values in (recipe.get("sources") or {}).items():
        if source not in space.get("sources", {}):
            raise ConfigError(path, f"{method} has no source {source!r}", field=f"sources.{source}")
        groups.append((f"sources.{source}", space["sources"][source], values, f"{method}/{source}"))
    for where, entries, values, prefix in groups:
        for key, value in values.items():
            name = _check_reachable(path, f"{where}.{key}", entries, key, value, values)
            if name is not None:  # a constant of the space is not an Optuna parameter
                point[f"{prefix}/{name}"] = value
    return point


def _check_reachable(
    path: Path, field: str, space: dict[str, Any], key: str, value: Any, values: dict[str, Any]
) -> str | None:
    """The space samples exactly `value` for `key` when the recipe's other values hold; the
    Optuna name it is sampled under (None for a constant of the space)."""
    spec = space.get(key)
    if spec is None:
        raise ConfigError(path, "not searched by the sweep's space: add it there (search_space_overrides)", field=field)
    if not distributions(spec):
        if spec != value:
            raise ConfigError(path, f"the sweep's space holds it at {spec!r}", field=field)
        return None
    known = {**{name: entry for name, entry in space.items() if not distributions(entry)}, **values}
    sampled = active_distribution(key, spec, known)
    if sampled is None:
        wanted = " or ".join(_condition_phrase(entry.get("if") or {}) for entry in distributions(spec))
        raise ConfigError(path, f"sampled only when {wanted}", field=field)
    name, distribution = sampled
    if "choice" in distribution:
        reachable = value in distribution["choice"]
    else:
        low, high = choices_or_bounds(distribution)
        reachable = isinstance(value, (int, float)) and low <= value <= high
    if not reachable:
        raise ConfigError(path, f"{value!r} is outside the sweep's space {distribution}", field=field)
    return name


def active_distribution(name: str, spec: Any, values: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The distribution the parameter `name` is sampled from where `values` hold (of a list, the
    first whose condition holds), and the Optuna name it is sampled under (a list's alternatives
    are distinct Optuna parameters, `learning_rate[adapter=full]`); None where no condition holds."""
    for distribution in distributions(spec):
        condition = distribution.get("if") or {}
        if all(values.get(other) in _wanted(condition[other]) for other in condition):
            return (f"{name}[{_condition_label(condition)}]" if isinstance(spec, list) else name), distribution
    return None


def _wanted(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _condition_phrase(condition: dict[str, Any]) -> str:
    return " and ".join(f"{other} is {wanted!r}" for other, wanted in condition.items())


def _condition_label(condition: dict[str, Any]) -> str:
    return ",".join(f"{other}={'|'.join(map(str, _wanted(wanted)))}" for other, wanted in condition.items())


def sources_can_recur(space: dict[str, Any]) -> bool:
    """Whether two merge trials can draw the same source (each a whole trained model): only if no
    source setting is sampled from a continuous range. The default space's are (the learning
    rates, NPO's beta and weights), so a cache of trained sources would only grow."""
    return not any(
        "uniform" in distribution or "log_uniform" in distribution
        for source in space.get("sources", {}).values()
        for spec in source.values()
        for distribution in distributions(spec)
    )


def distinct_settings(space: dict[str, Any], cap: int) -> int:
    """How many distinct settings a space of choices and integer ranges can draw, its conditions
    followed (a parameter no condition holds for is not drawn), counted up to `cap`."""
    entries = list(space.items())

    def count(index: int, values: dict[str, Any]) -> int:
        if index == len(entries):
            return 1
        name, entry = entries[index]
        if not distributions(entry):
            options = [entry]
        elif (sampled := active_distribution(name, entry, values)) is None:
            options = [None]
        else:
            low_high = choices_or_bounds(sampled[1])
            options = low_high if "choice" in sampled[1] else range(int(low_high[0]), int(low_high[1]) + 1)
        total = 0
        for option in options:
            total += count(index + 1, {**values, name: option})
            if total >= cap:
                return cap
        return total

    return count(0, {})


def _sample(trial: optuna.Trial, space: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Constants as they are, distributions sampled in order, conditions on earlier values."""
    values: dict[str, Any] = {}
    for name, entry in space.items():
        if not distributions(entry):
            values[name] = entry
            continue
        sampled = active_distribution(name, entry, values)
        if sampled is None:
            continue
        key, spec = f"{prefix}/{sampled[0]}", sampled[1]
        if "choice" in spec:
            values[name] = trial.suggest_categorical(key, spec["choice"])
        elif "int" in spec or "log_int" in spec:
            low, high = spec.get("int") or spec["log_int"]
            values[name] = trial.suggest_int(key, int(low), int(high), log="log_int" in spec)
        else:
            low, high = spec.get("uniform") or spec["log_uniform"]
            values[name] = trial.suggest_float(key, float(low), float(high), log="log_uniform" in spec)
    return values


class DefineByRun:
    """The Optuna define-by-run function: the method (a choice when there are several), then
    its parameters. Returns the trial's whole configuration as constants, so that the Tune
    config holds exactly what the trial runs with, and the Optuna trial's number. A class,
    not a closure: Tune pickles the searcher to resume it."""

    def __init__(self, spaces: dict[str, dict[str, Any]], links: dict[str, Any] | None = None):
        self.spaces, self.links = spaces, links or {}  # links: added to every setup (a merge stage's source runs)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        methods = sorted(self.spaces)
        method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
        space = self.spaces[method]
        setup: dict[str, Any] = {"method": method, "params": _sample(trial, space["params"], method)}
        if "sources" in space:
            setup["source_method"] = space["source_method"]
            setup["sources"] = {
                name: _sample(trial, entries, f"{method}/{name}") for name, entries in space["sources"].items()
            }
        return {"setup": {**setup, **self.links}, STUDY_TRIAL: trial.number}


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch over a persistent study (an RDB storage) that sets the constraints on the
    Optuna trial before it is told its result (Ray's OptunaSearch drops constraints). A trial is
    told its objective (its best eligible final score so far, see eligibility.py) with the
    constraints of the epoch that objective came from: `objective_mmlu_slack` = threshold -
    MMLU and `objective_time_slack` (training time over the limit), <= 0 feasible. A trial that
    ends without a report (failed before its first epoch was scored) is infeasible. Optuna
    trials are reached through the study's storage by their number (which each Tune config
    carries), not through OptunaSearch's private state."""

    def __init__(self, *args: Any, storage_url: str, study_name: str, **kwargs: Any):
        self.study_storage, self.study_name, self.study_trials = optuna.storages.RDBStorage(storage_url), study_name, {}
        super().__init__(*args, storage=self.study_storage, study_name=study_name, **kwargs)

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            self.study_trials[trial_id] = config[STUDY_TRIAL]
        return config

    def restore(self, checkpoint_path: str) -> None:
        """Resume: Optuna trials the stopped driver had asked for but Tune never recorded stay
        RUNNING in the database; they are closed as failed so the study holds no phantom runs.

        A driver killed while Ray's own copy wrote this file into storage left it cut short (the
        sweep now copies whole files: compat.local_storage_copies; older sweeps may hold one).
        Tune then "restarts the experiment" with its trial counter and concurrency limit restored
        from their own file, and waits forever for trials it no longer runs (seen: a resumed
        sweep hung). The study's database holds what matters, so the searcher continues from it:
        each restored trial is found again there by the study number its config carries."""
        try:
            super().restore(checkpoint_path)
        except (EOFError, pickle.UnpicklingError) as error:
            log.warning(
                "the searcher state %s is unreadable (%s): continuing from the Optuna study in %s",
                checkpoint_path,
                error,
                self.study_storage.url,
            )
            return  # which RUNNING study trials Tune still holds is unknown: none is closed
        study, known = self.study(), set(self.study_trials.values())
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in known:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.study_storage)

    def _found_again(self, trial_id: str, result: dict | None) -> bool:
        """Whether OptunaSearch knows the Tune trial, after looking it up by the study number in
        its config where the searcher's saved state was lost (restore)."""
        if trial_id not in self.study_trials and result and STUDY_TRIAL in result.get("config", {}):
            number = result["config"][STUDY_TRIAL]
            self.study_trials[trial_id] = number
            remember_optuna_trial(self, trial_id, optuna_trial(self.study(), self._optuna_id(number)))
        return trial_id in self.study_trials

    def _optuna_id(self, number: int) -> int:
        storage = self.study_storage
        return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study_name), number)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._found_again(trial_id, result):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not self._found_again(trial_id, result):
            log.warning("trial %s ended unknown to the searcher (its state was lost): not told to Optuna", trial_id)
            return
        number = self.study_trials.get(trial_id)
        if number is not None:
            optuna_id = self._optuna_id(number)
            if self.study_storage.get_trial(optuna_id).state == optuna.trial.TrialState.RUNNING:
                trial = optuna_trial(self.study(), optuna_id)
                for constraint, slack_metric in CONSTRAINTS.items():
                    slack = (result or {}).get(slack_metric)
                    trial.set_constraint(constraint, slack if slack is not None and math.isfinite(slack) else 1.0)
        super().on_trial_complete(trial_id, result, error)


def study_exists(config: SweepConfig) -> bool:
    """Whether the sweep's Optuna study is already in its storage (a fresh sweep must not
    continue someone else's)."""
    if config.study_storage.startswith("sqlite:///") and not Path(config.study_storage[len("sqlite:///") :]).exists():
        return False  # nothing to look in, and nothing is created by looking
    return config.name in optuna.study.get_all_study_names(storage=config.study_storage)


def _sampler(config: SweepConfig, trials: int) -> optuna.samplers.BaseSampler:
    if config.searcher == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    startup = max(2, min(10, trials // 3))
    if config.searcher == "tpe_grouped":
        # Every method's parameters are conditional on the method: multivariate TPE over each
        # group of parameters sampled together, and a constant liar for the trials still running.
        return optuna.samplers.TPESampler(
            seed=config.seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=True
        )
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=startup)


def make_searcher(config: SweepConfig) -> ConstrainedOptunaSearch:
    spaces = {
        method: load_space(method, config.search_space_overrides.get(method), config_path=config.source)
        for method in config.methods
    }
    sampler = _sampler(config, config.trials)
    if config.study_storage.startswith("sqlite:///"):
        Path(config.study_storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    # The recipes first, then every method without one (random start-up sampling missed one of two methods in 8 trials).
    first = [load_recipe(name, spaces) for name in config.recipes]
    first += [{"method": method} for method in sorted(set(spaces) - {point["method"] for point in first})]
    if len(spaces) == 1:  # no method parameter to fix
        first = [{key: value for key, value in point.items() if key != "method"} for point in first]
    return ConstrainedOptunaSearch(
        space=DefineByRun(spaces),
        metric=OBJECTIVE,
        mode="max",
        sampler=sampler,
        seed=config.seed,
        points_to_evaluate=[point for point in first if point] or None,
        storage_url=config.study_storage,
        study_name=config.name,
    )


def merge_stage_searcher(config: SweepConfig, models: list[str], source_runs: list[str]) -> ConstrainedOptunaSearch:
    """The merge stage's search: merge's parameters over fixed source checkpoints, in a study of
    its own (`<name>-merge`, same storage). Each setup names the source runs it merges."""
    from unlearn_sweep.methods.merge import MergeParams

    space = {"merge": {"params": {**config.merge_stage.space, "models": MergeParams.models_setting(models)}}}
    return ConstrainedOptunaSearch(
        space=DefineByRun(space, {"source_runs": source_runs}),
        metric=OBJECTIVE,
        mode="max",
        sampler=_sampler(config, config.merge_stage.trials),
        seed=config.seed,
        storage_url=config.study_storage,
        study_name=f"{config.name}-merge",
    )


class InTrialOrder(Searcher):
    """Optuna told the trials' results in the order they were suggested, and trial k suggested
    only once trials 0..k-lag have ended and been told, trials k-lag+1..k-1 still running to it
    however many have ended: every suggestion is made from the same state on every run. With
    `lag` twice the concurrent trials a slot waits only behind a trial that many places late
    (Ray's ConcurrencyLimiter in batch mode, the library's way, makes every slot wait for the
    slowest trial of its batch: the demo's search took 15 min 48 s so, 9 min 54 s in this order,
    on other trials)."""

    def __init__(self, searcher: Searcher, lag: int, trials: int):
        self.searcher, self.lag, self.trials = searcher, lag, trials
        self.order: list[str] = []  # trial ids as suggested
        self.ended: dict[str, tuple[dict | None, bool]] = {}  # results not yet told
        self.told = 0  # how many of `order` Optuna was told, a prefix
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def _tell(self, up_to: int) -> None:
        while self.told < min(up_to, len(self.order)) and self.order[self.told] in self.ended:
            trial_id = self.order[self.told]
            result, error = self.ended.pop(trial_id)
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            self.told += 1

    def suggest(self, trial_id: str) -> dict | None:
        ready = len(self.order) - self.lag + 1  # trials 0..k-lag, for trial k
        self._tell(ready)
        if self.told < ready:
            return None  # Tune asks again when a trial ends
        config = self.searcher.suggest(trial_id)
        if isinstance(config, dict):
            self.order.append(trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)  # intermediate values: TPE samples from final ones

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.order:  # suggested before this state was lost: the searcher finds it again
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        self.ended[trial_id] = (result, error)
        if len(self.order) >= self.trials:  # every trial suggested: nothing waits on the order any more
            self._tell(self.trials)

    def get_state(self) -> dict:  # saved by Tune beside the searcher's own state, restored on --resume
        return {"order": list(self.order), "ended": dict(self.ended), "told": self.told}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def search_algorithm(config: SweepConfig, searcher: Searcher | None, concurrency: int, trials: int) -> Searcher | None:
    """What a stage's Tuner is given to search with. Optuna suggests from the results it was told
    and the trials still running, so with several trials at a time the order they end in
    changes the next suggestions, and two runs of one sweep differ; `reproducible_search` puts
    them in trial order (InTrialOrder)."""
    if searcher is None or not config.reproducible_search:
        return searcher
    return InTrialOrder(searcher, lag=2 * concurrency, trials=trials)
