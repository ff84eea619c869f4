"""A runnable submission: what SemEval-2025 Task 4 judged, and what a team that receives the
next deletion request needs. The champion's configuration (its method and settings, trained
to the epoch it was selected at) and a script with the task's interface,

    python unlearn.py INPUT_MODEL RETAIN_SET FORGET_SET OUTPUT_DIR

that runs that configuration through the installed package on new sets, the way the
confirmation stage ran it on the held-out fold; a configuration trained over several GPUs runs
as `torchrun --nproc_per_node N unlearn.py ...` (one process per GPU, rank 0 writes)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.scratch import temporary_folder

CONFIGURATION = "configuration.json"
SCRIPT = "unlearn.py"
HELD_OUT = "held_out.jsonl"
SCRIPT_TEXT = '''#!/usr/bin/env python3
"""Unlearn with the configuration beside this script (SemEval-2025 Task 4's interface):

    python unlearn.py INPUT_MODEL RETAIN_SET FORGET_SET OUTPUT_DIR

RETAIN_SET and FORGET_SET: a .parquet or .jsonl file of {id, input, output, task} rows, or a
folder holding one. Over N GPUs (a configuration with zero_stage 0-3, as a multi-GPU trial ran
it): torchrun --nproc_per_node N unlearn.py ... Needs the unlearn-sweep package."""

import sys
from pathlib import Path

from unlearn_sweep.orchestrator.submission import main

if __name__ == "__main__":
    sys.exit(main(Path(__file__).resolve().with_name("configuration.json"), sys.argv[1:]))
'''


def submitted_setup(setup: dict[str, Any], epoch: int) -> dict[str, Any]:
    """A trial's configuration as a submission runs it: trained to the epoch it was selected
    at (learning rates are constant, so the first `epoch` epochs of the trial are that run)."""
    params = dict(setup["params"])
    if "epochs" in params:
        params["epochs"] = epoch
    return {**setup, "params": params}


def configuration_key(setup: dict[str, Any], epoch: int) -> str:
    """What two trials share when they submit the same configuration (only one of them is confirmed)."""
    return json.dumps(submitted_setup(setup, epoch), sort_keys=True, default=str)


def uses_held_out(setup: dict[str, Any]) -> bool:
    from unlearn_sweep.methods.registry import get_method

    return get_method(setup.get("source_method", setup["method"])).uses_held_out


def write_submission(out_dir: Path, trial_config: dict[str, Any]) -> None:
    """The configuration and the script, beside an exported checkpoint; the held-out
    documents the method calibrates on, where it reads them."""
    setup = submitted_setup(trial_config, int(trial_config["epoch"]))
    setup = {key: value for key, value in setup.items() if key in ("method", "params", "source_method", "sources")}
    if uses_held_out(setup):
        source = Path(trial_config.get("held_out") or "")
        if not source.is_file():
            raise DataError(out_dir, f"{setup['method']} reads held-out documents, and {source} is gone")
        shutil.copy2(source, out_dir / HELD_OUT)
        setup["held_out"] = HELD_OUT
    (out_dir / CONFIGURATION).write_text(json.dumps(setup, indent=2) + "\n")
    (out_dir / SCRIPT).write_text(SCRIPT_TEXT)
    (out_dir / SCRIPT).chmod(0o755)


def run_configuration(setup: dict[str, Any], model: Path, task: Any, out_dir: Path) -> Path:
    """Train the configuration from `model` on the task, into out_dir (whole or not at all).
    A merge with sources trains each source first, as its trial did."""
    from unlearn_sweep.methods.merge import MergeParams
    from unlearn_sweep.methods.registry import run_method

    if "sources" not in setup:
        return run_method(setup["method"], model, task, out_dir, setup["params"])
    with temporary_folder("sources-") as scratch:
        paths = [
            run_method(setup["source_method"], model, task, Path(scratch) / name, params)
            for name, params in setup["sources"].items()
        ]
        return run_method(
            setup["method"], model, task, out_dir, {**setup["params"], "models": MergeParams.models_setting(paths)}
        )


def main(configuration: Path, argv: list[str]) -> int:
    """The script's entry: one line on stderr and exit 2 for bad input, nothing half-written."""
    import dataclasses

    from unlearn_sweep.corpus.environment import quiet_model_libraries
    from unlearn_sweep.corpus.mia import load_held_out
    from unlearn_sweep.corpus.semeval import load_task_files
    from unlearn_sweep.methods.registry import launch_rank
    from unlearn_sweep.orchestrator.stopping import stops_as_ctrl_c

    if len(argv) != 4:
        print(f"usage: {SCRIPT} INPUT_MODEL RETAIN_SET FORGET_SET OUTPUT_DIR", file=sys.stderr)
        return 2
    quiet_model_libraries()  # its output is its line, as `unlearn-sweep unlearn`'s
    model, retain, forget, out = map(Path, argv)
    try:
        # A run stopped at its time limit (SIGTERM, as `timeout` sends) leaves no staging folder
        # and no merge source behind: whole models at 7B.
        with stops_as_ctrl_c():
            setup = json.loads(configuration.read_text())
            task = load_task_files(forget, retain)
            if setup.get("held_out"):
                task = dataclasses.replace(task, held_out=load_held_out(configuration.parent / setup["held_out"], None))
            run_configuration(setup, model, task, out)
    except (DataError, ValueError, OSError) as error:
        print(f"{SCRIPT}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{SCRIPT}: interrupted", file=sys.stderr)
        return 130
    if launch_rank() == 0:  # the rank that wrote it, under torchrun
        print(f"unlearned {model} with {setup['method']} into {out}")
    return 0
