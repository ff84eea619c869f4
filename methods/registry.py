"""The method protocol and the registry by name.

A method is one module under methods/ that defines a subclass of `Method` with a `name`
and a `Params` dataclass of typed, defaulted hyperparameters, decorated with `@register`.
Hyperparameters arrive as strings (CLI `--set key=value`) or values (a sweep trial) and are
checked against `Params`: an unknown key or a value of the wrong type is an error that
lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pkgutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Union, get_args, get_origin, get_type_hints

from unlearn_sweep.corpus.scratch import temporary_folder
from unlearn_sweep.corpus.semeval import TaskData
from unlearn_sweep.corpus.staging import staged_directory

if TYPE_CHECKING:
    from unlearn_sweep.methods.memory_plan import ModelShape

# Called after every epoch with (epoch, checkpoint folder, whether it is the run's last
# epoch): the model as it would be saved then (rank 0's folder; the folder is removed after
# the call, so a hook moves or copies what it keeps).
EpochCallback = Callable[[int, "Path | None", bool], None]


class ParamError(ValueError):
    """An unknown method or hyperparameter, or a value of the wrong type."""


class Method:
    """One unlearning algorithm: turns a base checkpoint and the task data into a new one."""

    name: ClassVar[str]
    Params: ClassVar[type]
    uses_held_out: ClassVar[bool] = False  # reads TaskData.held_out (documents never seen, never scored)
    # Every rank of a launch (torchrun) takes part in a run: training is collective. False: rank 0 runs it alone.
    collective: ClassVar[bool] = True

    @classmethod
    def conditions(cls) -> dict[str, dict[str, list[Any]]]:
        """Parameters read only for some values of another ({param: {other: [values]}}): a
        search samples them only then, unless its space states its own `if`."""
        return {}

    def run(
        self, model_dir: Path, task: TaskData, out_dir: Path | None, params: Any, on_epoch: EpochCallback | None = None
    ) -> Path | None:
        """Train, calling on_epoch after each epoch; save to out_dir unless it is None (a
        sweep trial keeps only the checkpoints its hook saves)."""
        raise NotImplementedError

    def for_this_device(self, params: Any) -> Any:
        """The params with every device-dependent default (`None`) decided for the device this
        process trains on; unchanged where there is none."""
        return params

    def checkpoint_bytes(self, shape: ModelShape, params: Any) -> int:
        """The size of the checkpoint a run saves (its weights), from the model's shape: here a
        whole model in the base's own dtype, as a merge writes it."""
        return shape.total * shape.stored_width

    def export_scratch_bytes(self, shape: ModelShape, params: Any) -> int:
        """What saving a checkpoint holds in temporary folders beside it (none here)."""
        return 0


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module of the package once, so that each registers its method."""
    from unlearn_sweep import methods

    for module in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"unlearn_sweep.methods.{module.name}")


def get_method(name: str) -> Method:
    _load_all()
    if name not in METHODS:
        raise ParamError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]()


def method_names() -> list[str]:
    _load_all()
    return sorted(METHODS)


def _convert(key: str, value: Any, kind: Any) -> Any:
    """A CLI string or a sweep value as the field's type (int, float, bool or str); a field
    typed `X | None` also takes None or "auto" (decided on the training device)."""
    if get_origin(kind) in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        inner = next(arg for arg in get_args(kind) if arg is not type(None))
        try:
            return _convert(key, value, inner)
        except ParamError:
            raise ParamError(f"{key}={value!r}: expected {inner.__name__} or auto") from None
    converted = _as_type(key, value, kind)
    if kind is float and not math.isfinite(converted):
        raise ParamError(f"{key}={value!r}: expected a finite number")
    return converted


def _as_type(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text in ("true", "false", "1", "0", "yes", "no"):
                return text in ("true", "1", "yes")
        else:
            try:
                return kind(text)
            except ValueError:
                pass
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise ParamError(f"{key}={value!r}: expected {kind.__name__}")


def check_value(method: Method, key: str, value: Any) -> Any:
    """One hyperparameter's value as its field's type, or a ParamError (a search space's
    constants and choices are checked this way before a sweep starts)."""
    return _convert(key, value, get_type_hints(method.Params)[key])


def build_params(method: Method, values: dict[str, Any]) -> Any:
    """The method's Params from a mapping of overrides, checked by name and type."""
    fields = {f.name: f for f in dataclasses.fields(method.Params)}
    hints = get_type_hints(method.Params)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for method {method.name!r}; valid: "
            f"{', '.join(sorted(fields))}"
        )
    converted = {key: _convert(key, value, hints[key]) for key, value in values.items()}
    params = method.Params(**converted)
    check = getattr(params, "check", None)
    if check:
        check()
    return params


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """['lr=1e-4', 'epochs=2'] -> {'lr': '1e-4', 'epochs': '2'}."""
    values = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key.strip():
            raise ParamError(f"--set {assignment!r}: expected key=value")
        values[key.strip()] = value
    return values


def launch_rank() -> int:
    """This process's rank in a launch of several (torchrun and Ray Train set RANK); 0 alone."""
    return int(os.environ.get("RANK", "0"))


def run_method(
    name: str,
    model_dir: str | Path,
    task: TaskData,
    out_dir: str | Path,
    overrides: dict[str, Any],
    on_epoch: EpochCallback | None = None,
) -> Path:
    """Apply a method by name; the checkpoint and its unlearn_config.json appear in out_dir
    only when the method has finished (nothing half-written). Under a launcher (`torchrun
    --nproc_per_node N`: a configuration trained over several GPUs) every rank trains and rank 0
    alone writes out_dir."""
    method = get_method(name)
    params = method.for_this_device(build_params(method, overrides))
    if launch_rank() != 0:
        if method.collective:
            with temporary_folder("rank-output-") as scratch:  # rank 0 writes the checkpoint
                method.run(Path(model_dir), task, Path(scratch) / "out", params, on_epoch)
        return Path(out_dir)
    with staged_directory(out_dir) as staging:
        method.run(Path(model_dir), task, staging, params, on_epoch)
        config = {"method": name, "base_model": str(model_dir), "params": dataclasses.asdict(params)}
        (staging / "unlearn_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)
