"""Replays search strategies against the tabular benchmark (search_table.py) hundreds of times:
the project's own searcher (its Optuna study, sampler settings, constraint handling and
enqueued first trials: orchestrator/search.py make_searcher) proposes each trial, the proposal
is snapped to the grid, and the trial's recorded epochs play out in simulated time with the
sweep's concurrency (the recorded training and evaluation seconds decide which trial ends
first), stopped where Ray's ASHAScheduler, built as the sweep builds it, says so.

    python benchmarks/search_replay.py [--table DIR] [--seeds 100] [--budget 64] [--jobs 2]

Prints per strategy the mean best eligible final score after 8, 16, 32 and 64 trials (95%
interval), the fraction of seeds that beat the best hand-set configuration, and the simulated
time to 95% of the table's best.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import multiprocessing
import statistics
import tempfile
from pathlib import Path
from typing import Any

from search_table import GRID, key_of

CHECKPOINTS = (8, 16, 32, 64)  # trials after which the best so far is reported
# The best hand-set configuration of benchmarks/methods_toy.py (docs/methods.md: adaptive RMU).
HAND_SET_BEST = 0.599
CONCURRENCY = 2  # the sweep on 2 cores: two one-CPU trials at a time
# SUGD's epochs are passes over each chunk and its epochs reported are the chunks: a run of fewer
# epochs is another curve, not this one cut short. The replay searches it at the table's.
EPOCHS_NOT_A_PREFIX = {"sugd"}
STRATEGIES: dict[str, dict[str, Any]] = {
    "random": {"searcher": "random", "asha": None},
    "TPE": {"searcher": "tpe", "asha": None},
    "TPE + ASHA (grace 1, the old default)": {"searcher": "tpe", "asha": {"grace_period": 1, "reduction_factor": 2}},
    "TPE + ASHA (grace 8, the old demo's)": {"searcher": "tpe", "asha": {"grace_period": 8, "reduction_factor": 2}},
    "grouped TPE (the default)": {"searcher": "tpe_grouped", "asha": None},
    "grouped TPE + ASHA (grace 8)": {"searcher": "tpe_grouped", "asha": {"grace_period": 8, "reduction_factor": 2}},
}


class Table:
    """The recorded configurations, looked up by a searched setup snapped to the grid."""

    def __init__(self, folder: Path):
        self.meta = json.loads((folder / "table.json").read_text())
        self.rows = {}
        for line in (folder / "table.jsonl").read_text().splitlines():
            row = json.loads(line)
            self.rows[key_of({"method": row["method"], "params": row["params"]})] = row["epochs"]
        self.best = max(epoch["objective"] for epochs in self.rows.values() for epoch in epochs)

    def lookup(self, setup: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """(the recorded epochs of the grid point nearest the setup, how many the setup trains)."""
        method, sampled = setup["method"], dict(setup["params"])
        for name, params in setup.get("sources", {}).items():
            sampled.update({f"{name}.{key}": value for key, value in params.items()})
        params = {}
        for name, values in GRID[method].items():
            if name == "epochs":
                params[name] = values[0]
            elif isinstance(values[0], str):
                params[name] = sampled[name]
            else:  # nearest on a log scale: every searched number here is a positive, log-spread one
                params[name] = min(values, key=lambda value: abs(math.log(value) - math.log(sampled[name])))
        epochs = self.rows[key_of({"method": method, "params": params})]
        if method in EPOCHS_NOT_A_PREFIX:
            return epochs, len(epochs)
        return epochs, min(int(sampled.get("epochs", 1)), len(epochs))


def replay_space(task: Path) -> dict[str, dict[str, Any]]:
    """The demo's search spaces restricted to what the table holds: the grid's parameters keep
    the demo's distributions (choices cut to the grid's), the others are the defaults the table
    was trained at."""
    from unlearn_sweep.methods.registry import get_method
    from unlearn_sweep.orchestrator.cli import TOY_TASK_SPACES
    from unlearn_sweep.orchestrator.search import distributions, load_space

    overrides = {}
    for method, grid in GRID.items():
        space = load_space(method, TOY_TASK_SPACES.get(method))
        defaults = {f.name: f.default for f in dataclasses.fields(get_method(method).Params)}
        entries = {}
        for name, spec in space["params"].items():
            if name in grid and isinstance(grid[name][0], str):
                entries[name] = {"choice": list(grid[name])}
            elif name == "epochs" and method in EPOCHS_NOT_A_PREFIX:
                entries[name] = grid[name][0]
            elif name not in grid and name not in ("epochs", "batch_size") and distributions(spec):
                entries[name] = defaults[name]
        if "sources" in space:
            entries["sources"] = {
                name: {"learning_rate": params["learning_rate"], "batch_size": 16}
                for name, params in space["sources"].items()
            }
            entries["source_method"] = space["source_method"]
        overrides[method] = entries
    return overrides


def sweep_config(task: Path, strategy: dict[str, Any], seed: int, budget: int, folder: Path):
    from unlearn_sweep.orchestrator.cli import demo_config
    from unlearn_sweep.orchestrator.config import Asha

    (folder / "toy_task").symlink_to(task)
    config = demo_config(folder, budget, seed)
    overrides = {
        method: {**config.search_space_overrides.get(method, {}), **entries}
        for method, entries in replay_space(task).items()
    }
    return dataclasses.replace(
        config,
        search_space_overrides=overrides,
        searcher=strategy["searcher"],
        asha=None if strategy["asha"] is None else Asha(**strategy["asha"]),
        optuna_storage=f"sqlite:///{folder}/optuna.db",
        confirm=None,
    )


@dataclasses.dataclass
class Running:
    trial_id: str
    config: dict[str, Any]
    epochs: list[dict[str, Any]]
    planned: int  # epochs the setup trains
    done: int = 0
    objective: float = -math.inf
    slack: float = math.inf
    best_epoch: int = 0


def replay(table: Table, task: Path, strategy: dict[str, Any], seed: int, budget: int) -> dict[str, Any]:
    """One simulated sweep: its best eligible score after each finished trial, and the
    simulated seconds at which its best first reached 95% of the table's best."""
    from unlearn_sweep.orchestrator.search import make_searcher
    from unlearn_sweep.orchestrator.sweep import asha_scheduler

    with tempfile.TemporaryDirectory(prefix="replay-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        config = sweep_config(task, strategy, seed, budget, Path(tmp))
        searcher, scheduler = make_searcher(config), asha_scheduler(config)
        events: list[tuple[float, int, Running]] = []
        started, best, best_after, reached, trials_to_reach = 0, -math.inf, [], None, None

        def start(now: float) -> None:
            nonlocal started
            trial_id = f"t{started:03d}"
            suggested = searcher.suggest(trial_id)
            epochs, planned = table.lookup(suggested["setup"])
            trial = Running(trial_id, suggested, epochs, planned)
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            started += 1
            heapq.heappush(events, (now + _seconds(epochs, 1), started, trial))

        while started < min(CONCURRENCY, budget):
            start(0.0)
        while events:
            now, order, trial = heapq.heappop(events)
            trial.done += 1
            epoch = trial.epochs[trial.done - 1]
            value = epoch["objective"]
            if value > trial.objective:  # the sweep's TrialObjective: the best epoch so far
                trial.objective, trial.slack, trial.best_epoch = value, epoch["mmlu_slack"], epoch["epoch"]
            result = {
                "objective": trial.objective,
                "objective_mmlu_slack": trial.slack,
                "objective_time_slack": -1.0,
                "training_iteration": trial.done,
                "config": trial.config,
            }
            if trial.objective > -1 and trial.objective > best:
                best = trial.objective
                if reached is None and best >= 0.95 * table.best:
                    reached, trials_to_reach = now, started
            searcher.on_trial_result(trial.trial_id, result)
            stopped = scheduler is not None and scheduler.on_trial_result(None, trial, result) == "STOP"
            if not stopped and trial.done < trial.planned:
                heapq.heappush(events, (now + _seconds(trial.epochs, trial.done + 1), order, trial))
                continue
            if not stopped and scheduler is not None:  # it returned: Tune tells the scheduler it completed
                scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial.trial_id, result)
            best_after.append(best)
            if started < budget:
                start(now)
    return {"best_after": best_after, "time_to_95": reached, "trials_to_95": trials_to_reach}


def _seconds(epochs: list[dict[str, Any]], epoch: int) -> float:
    """What one epoch of a trial took: its training since the epoch before, and its evaluation."""
    before = epochs[epoch - 2]["train_seconds"] if epoch > 1 else 0.0
    return epochs[epoch - 1]["train_seconds"] - before + epochs[epoch - 1]["eval_seconds"]


def _replay_job(job: tuple[str, Path, str, int, int]) -> tuple[str, int, dict[str, Any]]:
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("ray").setLevel(logging.ERROR)
    folder, task, name, seed, budget = job
    return name, seed, replay(Table(Path(folder)), task, STRATEGIES[name], seed, budget)


def _at_most(value: float, budget: int) -> str:
    return f"> {budget}" if value > budget else f"{value:.0f}"


def interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {half:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=Path("benchmarks/out/search_table"))
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="the toy task the table was built on")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    args = parser.parse_args()
    from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark

    task = toy_task_for_benchmark(args.task)
    table = Table(args.table)
    print(
        f"table {args.table}: {len(table.rows)} configurations, "
        f"{sum(len(epochs) for epochs in table.rows.values())} epochs, best eligible {table.best:.4f} "
        f"(95%: {0.95 * table.best:.4f}); {args.seeds} seeds x {args.budget} trials, {CONCURRENCY} at a time",
        flush=True,
    )
    jobs = [(str(args.table), task, name, seed, args.budget) for name in args.strategies for seed in range(args.seeds)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.strategies}
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for name, _seed, run in pool.imap_unordered(_replay_job, jobs):
            runs[name].append(run)
    header = " | ".join(f"best at {n}" for n in CHECKPOINTS)
    print(
        f"| strategy | {header} | beat hand-set ({HAND_SET_BEST}) at 32 | reached 95% | median trials to 95% "
        "| median simulated time to 95% (s) |"
    )
    print("| --- |" + " --- |" * (len(CHECKPOINTS) + 4))
    budget = args.budget
    for name, results in runs.items():
        cells = []
        for n in CHECKPOINTS:
            # no eligible trial yet counts as 0 (every eligible final score is >= 0)
            values = [max(run["best_after"][n - 1], 0.0) for run in results if len(run["best_after"]) >= n]
            cells.append(interval(values) if values else "-")
        beat = sum(run["best_after"][min(31, len(run["best_after"]) - 1)] > HAND_SET_BEST for run in results)
        reached = [run for run in results if run["time_to_95"] is not None]
        # seeds that never reached it count as the budget (trials) and the slowest time: medians stay honest
        trials = [run["trials_to_95"] if run in reached else budget + 1 for run in results]
        times = [run["time_to_95"] if run in reached else math.inf for run in results]
        median_time = statistics.median(times)
        shown_time = "-" if math.isinf(median_time) else f"{median_time:.0f}"
        print(
            f"| {name} | {' | '.join(cells)} | {beat / len(results):.0%} | {len(reached)}/{len(results)} "
            f"| {_at_most(statistics.median(trials), budget)} | {shown_time} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
