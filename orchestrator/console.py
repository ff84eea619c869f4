"""The sweep's live view on the console, in place of Tune's configuration and result tables
(which `--verbose` brings back): a progress bar of trials done, running and failed with the
elapsed time and an estimate of the rest, the best eligible score so far and its method, and
a line per finished trial with the current top three. The bar is drawn only on a terminal;
elsewhere (a log file, CI) the per-trial lines alone are printed. Library notices go to a log
file meanwhile (`library_messages_to`), so the sweep's own lines are all the console shows."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray import tune
from tqdm.auto import tqdm
from unlearn_sweep.corpus.environment import environment
from unlearn_sweep.evaluation.eligibility import OBJECTIVE, objective_is_eligible

# Loggers of the libraries a sweep drives, each with a handler of its own (or propagating to
# the root's last resort): inside `library_messages_to` their records go to the log file.
LIBRARY_LOGGERS = ("ray", "mlflow", "optuna", "alembic", "transformers", "accelerate", "torch", "py.warnings")
# DeepSpeed's logger gets its console handler when deepspeed is first imported, which may happen
# inside: a filter on the logger itself (which sees every record it makes) redirects them.
LATE_LOGGERS = ("DeepSpeed",)


class _ToFile(logging.Filter):
    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.handler.handle(record)
        return False  # not to the logger's own (console) handlers


@contextlib.contextmanager
def library_messages_to(path: Path) -> Iterator[None]:
    """Inside, the libraries' log records and Python warnings are appended to `path` instead of
    the console, and Tune prints no configuration box or TensorBoard hint (its legacy reporter,
    silent at verbosity 0, stands in for the one that prints them at every verbosity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        saved = [(logger, logger.handlers[:], logger.propagate) for logger in map(logging.getLogger, LIBRARY_LOGGERS)]
        for logger, _, _ in saved:
            logger.handlers, logger.propagate = [handler], False
        to_file = _ToFile(handler)
        for name in LATE_LOGGERS:
            logging.getLogger(name).addFilter(to_file)
        # A record no handler takes (ray.init without configure_logging clears the "ray" logger's)
        # goes to the last resort, which is the console otherwise.
        last_resort, logging.lastResort = logging.lastResort, handler
        logging.captureWarnings(True)
        try:
            with environment(RAY_AIR_NEW_OUTPUT="0"), warnings.catch_warnings():
                warnings.simplefilter("default")  # each warning once per place, into the log
                yield
        finally:
            logging.captureWarnings(False)
            logging.lastResort = last_resort
            for name in LATE_LOGGERS:
                logging.getLogger(name).removeFilter(to_file)
            for logger, handlers, propagate in saved:
                logger.handlers, logger.propagate = handlers, propagate


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class LiveView(tune.Callback):
    """A Tune callback on the driver; it reads the reports trials make anyway."""

    def __init__(self, total: int):
        self.total = total
        self.started = time.monotonic()
        self.running: set[str] = set()
        self.finished = self.failed = 0
        self.best: dict[str, tuple[float, str]] = {}  # trial id -> (best eligible final score, method)
        self.bar: tqdm | None = None

    def __getstate__(self) -> dict:  # Tune pickles its run settings with the experiment: no bar, no stream
        return {**self.__dict__, "bar": None}

    def setup(self, **info: Any) -> None:
        if sys.stdout.isatty():
            self.bar = tqdm(total=self.total, file=sys.stdout, unit="trial", dynamic_ncols=True)

    def _method(self, trial: Any) -> str:
        return (trial.config or {}).get("setup", {}).get("method", "?")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if objective_is_eligible(result.get(OBJECTIVE, -math.inf)):
            best = self.best.get(trial.trial_id, (-1.0, ""))[0]
            self.best[trial.trial_id] = (max(best, result[OBJECTIVE]), self._method(trial))
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed += 1
        self._ended(trial, "failed")

    def _ended(self, trial: Any, how: str) -> None:
        self.running.discard(trial.trial_id)
        self.finished += how == "finished"
        own = self.best.get(trial.trial_id)
        done = self.finished + self.failed
        line = (
            f"[{done:>{len(str(self.total))}}/{self.total}] trial {trial.trial_id} ({self._method(trial)}) {how}"
            + (f", best eligible {own[0]:.4f}" if own else ", no eligible epoch" if how == "finished" else "")
            + f" | {self._status()}"
        )
        top = sorted(((score, method, trial_id) for trial_id, (score, method) in self.best.items()), reverse=True)[:3]
        if top:
            line += "\n      top: " + "  ".join(f"{score:.4f} {method} {trial_id}" for score, method, trial_id in top)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line)
        else:
            print(line, flush=True)
        self._refresh()

    def _status(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.finished + self.failed
        eta = f", about {_duration(elapsed / done * (self.total - done))} left" if done and done < self.total else ""
        best = max(self.best.values(), default=None)
        leader = f"best {best[0]:.4f} ({best[1]})" if best else "no eligible trial yet"
        return f"{len(self.running)} running, {self.failed} failed, {leader}, {_duration(elapsed)} elapsed{eta}"

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._status(), refresh=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()
