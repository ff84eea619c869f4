"""The `unlearn-sweep` command line: thin glue over corpus/, evaluation/, methods/ and the sweep."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from unlearn_sweep.corpus.checkpoints import BACKENDS, DTYPES, check_checkpoint
from unlearn_sweep.corpus.environment import quiet_model_libraries
from unlearn_sweep.corpus.errors import DataError
from unlearn_sweep.corpus.staging import check_output_folder
from unlearn_sweep.methods.registry import ParamError
from unlearn_sweep.orchestrator.stopping import ends_with_this_process, handling, stop_signals, stops_as_ctrl_c


class UsageError(ValueError):
    """A bad argument or config value; printed on one line, exit 2."""


def _count(minimum: int):
    """An argparse type: an integer >= minimum (a batch of 0 rows or 0 new tokens is a mistake)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, got {text}")
    return value


def _existing_store(tracking_uri: str) -> str:
    """Reading a sweep back: the store must exist (MLflow would create an empty one)."""
    from unlearn_sweep.orchestrator.tracking import check_store

    check_store(tracking_uri, existing=True)
    return tracking_uri


def _task_summary(data: Path, split: str | None, tuned: str | None = None) -> str:
    """One fold's row counts; with `tuned`, a held-out fold, checked to share no row with it."""
    from unlearn_sweep.corpus.semeval import load_held_out_fold, load_task

    task = load_held_out_fold(data, split, tuned) if tuned else load_task(data, split)
    counts = Counter((row.split, row.task, row.kind) for row in task.rows())
    lines = [f"data: {data} ({task.layout})"]
    for split_set, task_name in sorted({key[:2] for key in counts}):
        lines.append(
            f"  {split_set:<7} {task_name}  sc {counts[split_set, task_name, 'sc']:>5}  qa "
            f"{counts[split_set, task_name, 'qa']:>5}"
        )
    lines.append(f"  total   forget {len(task.forget)} rows, retain {len(task.retain)} rows")
    return "\n".join(lines)


def _mia_summary(mia: Path, data: Path, split: str | None) -> str:
    """An MIA set's counts, checked not to hold the documents of the fold `split` does not name."""
    from unlearn_sweep.corpus.mia import check_mia_fold, load_mia

    documents = load_mia(mia)
    check_mia_fold(documents, mia, data, split)
    counts = Counter(doc.membership for doc in documents)
    return f"mia: {mia}\n  member {counts['member']}, nonmember {counts['nonmember']}"


def _mmlu_summary(mmlu: Path) -> str:
    from unlearn_sweep.corpus.mmlu import load_mmlu

    questions = load_mmlu(mmlu)
    return f"mmlu: {mmlu}\n  test {len(questions)} questions in {len({q.subject for q in questions})} subjects"


def _validate_data(args: argparse.Namespace) -> int:
    """Every given set is checked, so that one run reports all the errors found. Without
    --split, every fold a sweep reads: the validation fold (and mia/validation) is the one its
    configurations are confirmed on."""
    from unlearn_sweep.corpus.semeval import hf_folds

    folds = [args.split] if args.split else list(hf_folds(args.data)) or [None]
    sections = [lambda: _task_summary(args.data, folds[0])]
    if len(folds) == 2:
        sections.append(lambda: _task_summary(args.data, "validation", tuned="train"))
    if args.mia:
        sections.append(lambda: _mia_summary(args.mia, args.data, args.split))
        if len(folds) == 2 and (args.mia / "validation").is_dir():
            sections.append(lambda: _mia_summary(args.mia / "validation", args.data, "validation"))
    if args.mmlu:
        sections.append(lambda: _mmlu_summary(args.mmlu))
    errors = []
    for section in sections:
        try:
            print(section())
        except DataError as error:
            errors.append(str(error))
    for error in dict.fromkeys(errors):  # a broken train fold fails the held-out fold's check too
        print(f"error: {error}", file=sys.stderr)
    return 2 if errors else 0


def _build_toy_task(out: Path, seed: int = 0) -> None:
    from unlearn_sweep.corpus.toy_task import PUBLISHED_FINGERPRINT, write_toy_task

    print(f"building the miniature task in {out} (seed {seed}; about a minute and a half on 2 cores)", flush=True)
    write_toy_task(out, seed=seed, log_every=10)
    fingerprint = json.loads((out / "toy_task.json").read_text())["weights_sha256"]
    if seed != 0:
        verdict = ""
    elif fingerprint == PUBLISHED_FINGERPRINT:
        verdict = " (the published model: the README's toy figures hold)"
    else:
        verdict = (
            f" (NOT the published {PUBLISHED_FINGERPRINT[:12]}...: this processor's kernels differ; "
            "toy figures will too)"
        )
    print(f"wrote {out}/data, {out}/mia, {out}/mmlu and {out}/model; weights sha256 {fingerprint}{verdict}", flush=True)


def _toy_task(args: argparse.Namespace) -> int:
    _build_toy_task(args.out, args.seed)
    return 0


def _split_folds(args: argparse.Namespace) -> int:
    from unlearn_sweep.corpus.folds import split_folds
    from unlearn_sweep.corpus.semeval import load_task

    check_output_folder(args.out)  # before the data is read
    sizes = split_folds(load_task(args.data, args.split), args.mia, args.out, args.fraction, args.seed)
    print(f"wrote {args.out}/data and {args.out}/mia (the validation fold: mia/validation):")
    for fold, size in sizes.items():
        print(
            f"  {fold:<10} {size.documents} documents: forget {size.forget_rows} rows, retain {size.retain_rows}; "
            f"MIA member {size.members}, nonmember {size.nonmembers}"
        )
    print(f"  a sweep with data: {args.out} and mia: {args.out}/mia confirms on the validation fold")
    return 0


DEMO_EXPERIMENT = "unlearn-sweep-demo"


def _log_uniform(low: float, high: float) -> dict:
    return {"log_uniform": [low, high]}


# The toy task's ranges: search_spaces/ hold OLMo-1B/7B's (1e-5 for full fine-tuning), and the
# 1M-parameter toy model needs 10-50 times those learning rates to forget anything.
TOY_TASK_SPACES = {
    "grad_diff": {"learning_rate": _log_uniform(1e-5, 5e-4), "epochs": {"int": [1, 4]}},
    "npo": {
        "learning_rate": _log_uniform(1e-5, 5e-4),
        "epochs": {"int": [1, 4]},
        "lora_rank": {"choice": [4, 8, 16], "if": {"adapter": "lora"}},
        "lora_alpha": {"choice": [16, 32], "if": {"adapter": "lora"}},
    },
    "simnpo": {"learning_rate": _log_uniform(2e-5, 5e-4)},
    "sugd": {
        "learning_rate": _log_uniform(1e-5, 5e-4),
        "epochs": {"int": [1, 8]},
        "last_k_layers": {"choice": [1, 2, 8], "if": {"adapter": "last_k"}},
    },
    "mia_target": {"learning_rate": _log_uniform(1e-4, 6e-4), "epochs": {"int": [8, 14]}},
    "task_vector": {"learning_rate": _log_uniform(5e-5, 1e-3), "scale": {"uniform": [0.5, 3.0]}},  # toy benchmarks
    "merge": {
        "sources": {
            name: {
                "learning_rate": _log_uniform(*bounds),
                "adapter": {"choice": ["full", "lora"]},
                "lora_rank": {"choice": [8, 16, 32], "if": {"adapter": "lora"}},
            }
            for name, bounds in (("over", (1e-4, 5e-4)), ("under", (2e-5, 1e-4)))
        }
    },
}


DEMO_METHODS = ["grad_diff", "npo", "simnpo", "sugd", "mia_target", "merge"]


def demo_config(folder: Path, trials: int, seed: int):
    """The demo's sweep over the toy task built in folder/toy_task: its methods at the toy's
    ranges, confirmed on the toy's validation fold (on by default: the toy has two folds)."""
    import time

    from unlearn_sweep.corpus.toy_task import sweep_paths
    from unlearn_sweep.orchestrator.config import config_from_dict

    raw = {
        "name": time.strftime("demo-%Y%m%d-%H%M%S"),
        **sweep_paths("toy_task"),
        "mmlu_threshold": "0.75x",
        "methods": DEMO_METHODS,
        "search_space_overrides": {method: TOY_TASK_SPACES[method] for method in DEMO_METHODS},
        "trials": trials,
        "seed": seed,
        "reproducible_search": True,  # the same trials on every run, whichever of two finishes first
        # float32: the same scores on every CPU (bfloat16 arithmetic differs with the CPU's bf16 support, and is
        # about 4x slower where it has none).
        "eval": {"dtype": "float32"},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": DEMO_EXPERIMENT},
        "storage_path": "sweeps",
    }
    return config_from_dict(raw, folder / "demo", folder)


def _demo(args: argparse.Namespace) -> int:
    """The toy task end to end in the current directory: build, sweep, report."""
    task = Path("toy_task")
    if not (task / "toy_task.json").exists():
        _build_toy_task(task)
    config = demo_config(Path.cwd(), args.trials, args.seed)
    print(f"sweeping {', '.join(config.methods)} with {config.trials} trials on the toy task", flush=True)
    return _run_and_report(config, False, args.verbose, None)


def _report(summary, config) -> None:
    from unlearn_sweep.corpus.semeval import hf_folds

    failed = sum(row["status"] == "failed" for row in summary.rows)
    print(
        f"\n{len(summary.rows)} trials ({failed} failed); MMLU threshold "
        + ("none" if summary.mmlu_threshold is None else f"{summary.mmlu_threshold:.4f}")
    )
    _print_table([row for row in summary.rows if row["status"] == "finished"][:10])
    if summary.confirmations:
        _print_confirmations(summary.confirmations)
    if summary.champion:
        champion = summary.champion
        origin = (
            ""
            if champion["from_this_sweep"]
            else " (from an earlier sweep of this experiment, still the best eligible)"
        )
        held_out, tuned = champion.get("held_out"), champion["final_score"]
        if held_out:
            score = f"held-out final score {held_out['final_score']:.4f} (chosen by it), tuned {tuned:.4f}"
        else:  # picked on the scores it was tuned for: new data will score lower
            score = f"final score {tuned:.4f} on the fold it was tuned on (not confirmed on held-out data)"
        print(f"\nchampion: trial {champion['trial_id']} ({champion['method']}), {score}{origin}")
        if not held_out and len(hf_folds(config.data)) < 2:
            print(f"  to confirm on documents it was not tuned on: unlearn-sweep split-folds --data {config.data} ...")
        print(f"  checkpoint: {champion['checkpoint']}")
        print(f"  registered as model {config.experiment!r} version {champion['model_version']}")
        print(
            f"  export it:  unlearn-sweep export {config.experiment} --out submission --tracking-uri "
            f"{config.tracking_uri}"
        )
    else:
        print("\nno trial reached the MMLU threshold: no champion")
    print(f"browse the trials: unlearn-sweep ui --tracking-uri {config.tracking_uri}   (http://127.0.0.1:5000)")


def _print_confirmations(confirmations: list[dict]) -> None:
    """The configurations re-run on the held-out fold: tuned against held-out scores."""
    print("\nconfirmed on the held-out fold (each configuration re-run from the base model):")
    print(f"{'trial':<11}{'method':<13}{'tuned':>7}{'held-out':>9}{'optimism':>9}  eligible")
    for row in confirmations:
        held_out, optimism = row["held_out_final_score"], row["optimism"]
        print(
            f"{row['trial_id']:<11}{row['method']:<13}{row['tuned_final_score']:>7.3f}"
            f"{'-' if held_out is None else f'{held_out:.3f}':>9}{'-' if optimism is None else f'{optimism:+.3f}':>9}"
            f"  {row['held_out_eligible']}" + (f"  ({row['error']})" if row["error"] else "")
        )
    measured = [row["optimism"] for row in confirmations if row["optimism"] is not None]
    if measured:
        print(f"mean optimism (tuned - held-out): {sum(measured) / len(measured):+.3f}")


def _print_table(rows: list[dict]) -> None:
    """The trials' tuned scores, with a held-out column where rows carry their confirmation's."""
    held_out = any("held_out_final_score" in row for row in rows)
    print(
        f"{'rank':<5}{'trial':<11}{'method':<13}{'final':>7}{'task agg':>9}{'MIA':>7}{'MMLU':>7}"
        + (f"{'held-out':>9}" if held_out else "")
        + "  eligible"
    )
    for rank, row in enumerate(rows, start=1):

        def show(name: str, row: dict = row) -> str:  # bound now: called within this iteration
            return "-" if row.get(name) is None else f"{row[name]:.3f}"

        print(
            f"{rank:<5}{row['trial_id']:<11}{row['method']:<13}{show('final_score'):>7}{show('task_aggregate'):>9}"
            f"{show('mia_score'):>7}{show('mmlu_accuracy'):>7}"
            + (f"{show('held_out_final_score'):>9}" if held_out else "")
            + f"  {row['eligible']}"
        )


def _run_and_report(config, resume: bool, verbose: bool, command: str | None) -> int:
    """Runs the sweep and reports its champion. An interrupted sweep says how to go on: its
    `command` again, with --resume once its trials had started; a demo (None) is run anew."""
    from unlearn_sweep.orchestrator.sweep import SweepFailed, SweepInterrupted, run_sweep

    try:
        summary = run_sweep(config, resume, verbose)
    except SweepInterrupted as error:
        if command is None:  # each demo is a sweep of its own name
            go_on = "A demo is not resumed: `make demo` starts a new one"
        else:
            go_on = f"Continue it with: {command} --resume" if error.resumable else f"Start it again with: {command}"
        print(f"unlearn-sweep: {error}. {go_on}", file=sys.stderr)
        return 130  # the shell's code for a run ended by Ctrl-C
    except SweepFailed as error:
        print(f"unlearn-sweep: error: {error}", file=sys.stderr)
        return 1
    _report(summary, config)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from unlearn_sweep.orchestrator.config import load_config

    config = load_config(args.config)
    return _run_and_report(config, args.resume, args.verbose, f"unlearn-sweep sweep {config.source}")


def _plan(args: argparse.Namespace) -> int:
    from unlearn_sweep.orchestrator.config import load_config
    from unlearn_sweep.orchestrator.lengths import check_lengths, has_tokenizer
    from unlearn_sweep.orchestrator.plan import check_memory, format_plan, plan_sweep
    from unlearn_sweep.orchestrator.storage import check_storage, format_storage, plan_storage

    config = load_config(args.config)
    rows = plan_sweep(config)
    # A folder of config.json alone (a size to plan for) has no tokenizer: planned at max_length.
    counted = has_tokenizer(config.model)
    if counted:
        rows = plan_sweep(config, check_lengths(config, rows))
    print(
        f"peak memory per GPU, estimated from {config.model / 'config.json'} "
        f"({config.workers} worker(s) per trial, gpu {config.resources_per_trial.gpu:g}, gpu_memory_gb "
        f"{config.gpu_memory_gb}); length: "
        + ("the longest example trials train on, in the model's tokens" if counted else "max_length (no tokenizer)")
        + ":"
    )
    print(format_plan(rows, config.workers))
    storage = plan_storage(config)
    print(format_storage(storage, config, config.max_concurrent_trials))
    check_memory(config, rows)
    check_storage(config, storage, config.max_concurrent_trials or 1)
    return 0


def _best(args: argparse.Namespace) -> int:
    from unlearn_sweep.orchestrator.selection import SelectionError, leaderboard

    entries = leaderboard(args.experiment, _existing_store(args.tracking_uri), args.top)
    if not entries:
        raise SelectionError(args.tracking_uri, f"experiment {args.experiment!r} has no eligible finished trial")
    best = entries[0]
    # Ranked as the champion was chosen: by held-out score where its sweep confirmed on the
    # other fold; the tuned scores alone would not show why the order is what it is.
    rule = "held-out final score" if best.held_out else "final score on the fold it was tuned on"
    print(
        f"best eligible trial of {args.experiment!r} by {rule}: {best.trial_id} ({best.method}), epoch "
        f"{int(best.scores['epoch'])}"
    )
    print(f"  {'':<15} {'tuned':>7}" + (f" {'held-out':>8}" if best.held_out else ""))
    for name, value in best.scores.items():
        if name != "epoch" and value is not None:
            held_out = (best.held_out or {}).get(name)
            print(f"  {name:<15} {value:>7.4f}" + ("" if held_out is None else f" {held_out:>8.4f}"))
    print("  hyperparameters: " + ", ".join(f"{k}={v}" for k, v in sorted(best.params.items())))
    removed = f" (removed: {best.checkpoint_removed})" if best.checkpoint_removed else ""
    print(f"  checkpoint: {best.checkpoint}{removed}")
    print()
    _print_table(
        [
            {"trial_id": e.trial_id, "method": e.method, "eligible": True, **e.scores}
            | ({"held_out_final_score": e.held_out["final_score"]} if e.held_out else {})
            for e in entries
        ]
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from unlearn_sweep.orchestrator.selection import CONFIRMATION_SCORES, export_champion

    check_output_folder(args.out)
    out = export_champion(args.experiment, _existing_store(args.tracking_uri), args.out)
    tuned = json.loads((out / "scores.json").read_text())["final_score"]
    if (out / CONFIRMATION_SCORES).exists():
        held_out = json.loads((out / CONFIRMATION_SCORES).read_text())["final_score"]
        score = f"held-out final score {held_out:.4f}, tuned {tuned:.4f}"
    else:
        score = f"final score {tuned:.4f} on the fold it was tuned on"
    print(f"exported the champion of {args.experiment!r} to {out} ({score})")
    script = out / "unlearn.py"
    print(f"  its configuration runs on new sets: python {script} INPUT_MODEL RETAIN_SET FORGET_SET OUTPUT_DIR")
    return 0


def _check_port_free(port: int) -> None:
    """MLflow's server logs a port it cannot bind and exits 0: a taken port is refused first."""
    import socket

    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port}: expected a port from 1 to 65535")
    with socket.socket() as probe:
        # As the server binds: a closed connection's TIME_WAIT on the port does not stop it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise UsageError(f"--port {port}: 127.0.0.1:{port} is taken ({error.strerror}); choose another") from None


def _ui(args: argparse.Namespace) -> int:
    tracking_uri = _existing_store(args.tracking_uri)
    _check_port_free(args.port)
    # The mlflow of this interpreter's environment, found without relying on PATH. One server
    # process: a person browsing trials needs no more, and MLflow's default of 4 costs a GB; no
    # job runner (its 7 task consumers for GenAI features held 1.8 GB more here).
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    print(f"MLflow UI of {args.tracking_uri} on http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    # Ctrl-C, SIGTERM and a closed terminal (SIGHUP: the server, in its own session, gets none)
    # stop the server's whole process tree (MLflow's uvicorn child too); a second one kills it,
    # as people expect of a server slow to shut down; a `ui` killed outright (SIGKILL) takes it
    # along too (MLflow passes SIGTERM on to uvicorn). A server that ends by itself failed,
    # whatever its exit code: MLflow exits 0 when uvicorn cannot bind a port taken after our
    # check.
    server: subprocess.Popen | None = None
    stopped = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopped
        if server is not None:
            with contextlib.suppress(ProcessLookupError):  # it may have just ended by itself
                os.killpg(server.pid, signal.SIGKILL if stopped else signal.SIGTERM)
        stopped = True

    # Handlers first: a Ctrl-C while the server starts must not leave it running in its session.
    # After, the caller's handlers again, as the sweep's interrupt handling leaves them.
    with handling(stop_signals(), stop):
        environment = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        server = subprocess.Popen(command, start_new_session=True, env=environment, preexec_fn=ends_with_this_process())
        if stopped:  # stopped before `server` was set
            os.killpg(server.pid, signal.SIGTERM)
        code = server.wait()
    if not stopped:
        raise ChildProcessError(f"the MLflow UI ended by itself (exit code {code}); its log above says why")
    return 0


def _unlearn(args: argparse.Namespace) -> int:
    import dataclasses

    from unlearn_sweep.corpus.mia import default_held_out, load_held_out
    from unlearn_sweep.corpus.semeval import load_task
    from unlearn_sweep.methods.registry import launch_rank, parse_assignments, run_method

    check_output_folder(args.out)  # before the model and data are read, as the run's own checks
    check_checkpoint(args.model)  # a folder that does not exist is no hub id to Transformers here
    task = load_task(args.data, args.split)
    held_out = args.held_out or (default_held_out(args.mia) if args.mia else None)
    if held_out is not None:
        task = dataclasses.replace(task, held_out=load_held_out(held_out, args.mia))
    out = run_method(args.method, args.model, task, args.out, parse_assignments(args.set))
    if launch_rank() == 0:  # the rank that wrote it, under torchrun
        print(f"{args.method}: wrote {out}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    import dataclasses

    from unlearn_sweep.methods.merge import COMBINATIONS
    from unlearn_sweep.methods.registry import get_method, method_names

    for name in method_names():
        fields = dataclasses.fields(get_method(name).Params)
        print(f"{name}: " + ", ".join(f"{f.name}={f.default!r}" for f in fields))
    print("merge combinations (--set combination=NAME) and the parameters each reads:")
    for name, combination in COMBINATIONS.items():
        lora = f"; LoRA adapters: peft's {combination.adapter_type}" if combination.adapter_type else ""
        print(f"  {name}: {', '.join(combination.knobs) or 'no parameters'}{lora}")
    return 0


def _threshold(args: argparse.Namespace) -> float | None:
    from unlearn_sweep.evaluation.eligibility import MmluThreshold

    if args.mmlu_threshold is None:
        return None
    try:
        return MmluThreshold.parse(args.mmlu_threshold).absolute(args.base_mmlu)
    except ValueError as error:
        raise UsageError(f"--mmlu-threshold: {error}") from None


def print_scores(scores: dict) -> None:
    """The headline numbers of a scores.json, one per line."""

    def show(value: float | None) -> str:
        return "null" if value is None else f"{value:.4f}"

    for key in ("final_score", "task_aggregate", "mia_auc", "mia_score", "mmlu_accuracy", "forget_mean", "retain_mean"):
        print(f"  {key:<15} {show(scores[key])}")
    print(
        f"  {'eligible':<15} {scores['eligible']}"
        + (f" (MMLU threshold {scores['mmlu_threshold']:.4f})" if scores["mmlu_threshold"] is not None else "")
    )


def _evaluate(args: argparse.Namespace) -> int:
    from unlearn_sweep.corpus.mia import check_mia_fold
    from unlearn_sweep.evaluation import vllm_inference
    from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint, launched_group
    from unlearn_sweep.evaluation.options import EvalOptions

    threshold = _threshold(args)
    if args.backend == "vllm" and (reason := vllm_inference.unavailable()):
        raise UsageError(f"--backend vllm: {reason}")
    if args.backend == "vllm" and args.answer_nll:
        raise UsageError(f"--answer-nll: {vllm_inference.NO_ANSWER_NLL}")
    check_output_folder(args.out, may_exist=True)  # its records are replaced: refused now, not after the evaluation
    check_checkpoint(args.model)
    sets = EvalSets.load(args.data, args.split, args.mia, args.mmlu, args.mmlu_shots)
    if args.mia:
        check_mia_fold(sets.mia, args.mia, args.data, args.split)
    options = EvalOptions(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        answer_nll=args.answer_nll,
        backend=args.backend,
    )
    with launched_group():  # under torchrun, each process scores its share: one per GPU
        scores = evaluate_checkpoint(args.model, sets, options, args.out, threshold)
    if scores is None:
        return 0  # a rank other than 0: rank 0 wrote and prints the scores
    print(f"scores of {args.model} (records in {args.out}):")
    print_scores(scores)
    return 0


def _score(args: argparse.Namespace) -> int:
    from unlearn_sweep.evaluation.evaluator import rescore

    scores = rescore(args.results, _threshold(args))
    print(f"rescored {args.results}/scores.json from its records:")
    print_scores(scores)
    return 0


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mmlu-threshold", help="minimum MMLU to rank: absolute (0.371) or relative to the base model (0.75x)"
    )
    parser.add_argument("--base-mmlu", type=float, help="the base model's MMLU, for a relative threshold")


def _add_verbose_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Ray Tune's own tables instead of the live view, and the libraries' messages on the console "
        "(otherwise in the sweep's libraries.log)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn-sweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate-data", help="check a task directory before a long sweep")
    validate.add_argument("--data", required=True, type=Path, help="task directory (any supported layout)")
    validate.add_argument(
        "--split", help="train or validation (Hugging Face parquet layout only; default: each fold present)"
    )
    validate.add_argument("--mia", type=Path, help="directory with member.jsonl and nonmember.jsonl")
    validate.add_argument("--mmlu", type=Path, help="MMLU-format directory")
    validate.set_defaults(run=_validate_data)

    toy = commands.add_parser("toy-task", help="generate the built-in miniature task and train its base model")
    toy.add_argument("--out", required=True, type=Path)
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(run=_toy_task)

    split = commands.add_parser(
        "split-folds", help="hold out a fraction of a task's documents (and their MIA members) as a validation fold"
    )
    split.add_argument("--data", required=True, type=Path, help="task directory (any supported layout)")
    split.add_argument("--split", help="the Hugging Face layout's fold to split (default train)")
    split.add_argument("--mia", required=True, type=Path, help="its MIA set: member.jsonl and nonmember.jsonl")
    split.add_argument("--out", required=True, type=Path)
    split.add_argument("--fraction", type=_fraction, default=0.2, help="share of each set's documents held out (0.2)")
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(run=_split_folds)

    demo = commands.add_parser("demo", help="the built-in miniature task end to end, in the current directory")
    demo.add_argument("--trials", type=_count(1), default=24)
    demo.add_argument("--seed", type=int, default=0)
    _add_verbose_option(demo)
    demo.set_defaults(run=_demo)

    sweep = commands.add_parser("sweep", help="run (or --resume) a sweep from its YAML config")
    sweep.add_argument("config", type=Path)
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    _add_verbose_option(sweep)
    sweep.set_defaults(run=_sweep)

    plan = commands.add_parser("plan", help="peak GPU memory of every method a sweep config can sample, before launch")
    plan.add_argument("config", type=Path)
    plan.set_defaults(run=_plan)

    best = commands.add_parser("best", help="the best eligible trial and the leaderboard of an experiment")
    best.add_argument("experiment")
    best.add_argument("--top", type=_count(1), default=10)
    best.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    best.set_defaults(run=_best)

    export = commands.add_parser("export", help="write an experiment's champion checkpoint as a submission")
    export.add_argument("experiment")
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    export.set_defaults(run=_export)

    ui = commands.add_parser("ui", help="the MLflow UI on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ui.set_defaults(run=_ui)

    unlearn = commands.add_parser("unlearn", help="apply one unlearning method to a checkpoint")
    unlearn.add_argument("--method", required=True, help="registered method name (see unlearn-sweep methods)")
    unlearn.add_argument("--model", required=True, type=Path, help="local Hugging Face checkpoint to start from")
    unlearn.add_argument("--data", required=True, type=Path)
    unlearn.add_argument("--split", help="train or validation (Hugging Face parquet layout only)")
    unlearn.add_argument("--out", required=True, type=Path)
    unlearn.add_argument(
        "--held-out",
        type=Path,
        help="JSONL of {id, document} the model never saw, for methods that calibrate "
        "on them (mia_target); default <mia>/held_out.jsonl or <mia>/validation/nonmember.jsonl",
    )
    unlearn.add_argument("--mia", type=Path, help="the scored MIA set: held-out documents must not be in it")
    unlearn.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeatable)"
    )
    unlearn.set_defaults(run=_unlearn)

    listing = commands.add_parser("methods", help="list the registered methods and their hyperparameters")
    listing.set_defaults(run=_methods)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint as SemEval-2025 Task 4 did")
    evaluate.add_argument("--model", required=True, type=Path, help="local Hugging Face checkpoint")
    evaluate.add_argument("--data", required=True, type=Path)
    evaluate.add_argument("--split", help="train or validation (Hugging Face parquet layout only)")
    evaluate.add_argument("--mia", type=Path, help="member/nonmember directory (without it, no final score)")
    evaluate.add_argument("--mmlu", type=Path, help="MMLU-format directory (without it, no final score)")
    evaluate.add_argument(
        "--mmlu-shots",
        type=_count(0),
        help="few-shot examples per question from the dev split (default: 5 where "
        "the set has a dev split, as the organizers ran MMLU, else 0)",
    )
    evaluate.add_argument("--out", required=True, type=Path, help="where records and scores.json go")
    evaluate.add_argument("--batch-size", type=_count(1), default=32)
    evaluate.add_argument("--max-new-tokens", type=_count(1), default=256)
    evaluate.add_argument(
        "--dtype", choices=DTYPES, default="bfloat16", help="inference dtype (the organizers loaded models in bfloat16)"
    )
    evaluate.add_argument(
        "--answer-nll", action="store_true", help="also record each gold answer's NLL (a diagnostic; no score uses it)"
    )
    evaluate.add_argument(
        "--backend",
        choices=BACKENDS,
        default="hf",
        help="inference engine: hf (Hugging Face, everywhere) or vllm "
        "(optional, on a GPU where vLLM is installed; same records)",
    )
    _add_threshold_options(evaluate)
    evaluate.set_defaults(run=_evaluate)

    score = commands.add_parser("score", help="recompute scores.json from the records in a results directory")
    score.add_argument("results", type=Path)
    _add_threshold_options(score)
    score.set_defaults(run=_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="unlearn-sweep: %(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("mlflow.transformers").setLevel(
        logging.ERROR
    )  # no hub model card or license for a local checkpoint
    if args.run in (_toy_task, _demo, _sweep, _plan, _export, _unlearn, _evaluate):
        quiet_model_libraries()
    try:
        with stops_as_ctrl_c():
            return args.run(args)
    except KeyboardInterrupt:  # what it was writing is removed (staged folders) or was whole (records)
        print("unlearn-sweep: interrupted", file=sys.stderr)
        return 130
    except (DataError, UsageError, ParamError) as error:
        print(f"unlearn-sweep: error: {error}", file=sys.stderr)
        return 2
    except (
        FloatingPointError,
        ChildProcessError,
    ) as error:  # training diverged or its process failed: nothing was written
        print(f"unlearn-sweep: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
