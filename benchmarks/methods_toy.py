"""Every method and every merge once, at hand-picked settings in the spirit of the systems
that used them (scaled to the toy task), scored by the full evaluator: the hand-tuned baseline
a sweep must beat. The merges combine the two npo models (over- and under-forgetting).

    python benchmarks/methods_toy.py [--task DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch
from unlearn_sweep.corpus.mia import default_held_out, load_held_out
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark
from unlearn_sweep.evaluation.evaluator import EvalSets, evaluate_checkpoint
from unlearn_sweep.evaluation.options import EvalOptions
from unlearn_sweep.methods.merge import MergeParams
from unlearn_sweep.methods.registry import run_method

DTYPE = "float32"  # as the demo scores: the same on every CPU

# (row label, method, hyperparameters); "merge" rows name the rows they merge.
RUNS = [
    (
        "grad_ascent (GA then fine-tune, GIL-IIMAS)",
        "grad_ascent",
        {"learning_rate": 1e-4, "epochs": 1, "finetune_epochs": 1},
    ),
    ("grad_ascent on entities only", "grad_ascent", {"learning_rate": 1e-4, "epochs": 2, "entity_only": True}),
    ("grad_diff (organizer baseline)", "grad_diff", {"learning_rate": 1e-4, "epochs": 2}),
    ("kl_min (organizer baseline)", "kl_min", {"learning_rate": 1e-4, "epochs": 2}),
    ("npo, over-forgetting (ZJUKLAB NPO+GDR+KLR)", "npo", {"learning_rate": 2e-4, "epochs": 2, "beta": 0.1}),
    ("npo, under-forgetting", "npo", {"learning_rate": 5e-5, "epochs": 2, "beta": 0.1}),
    (
        "sugd (AILS-NTUA)",
        "sugd",
        {
            "learning_rate": 1e-4,
            "epochs": 2,
            "chunk_size": 32,
            "positive_ratio": 2.0,
            "positive_factor": 1.0,
            "adapter": "full",
        },
    ),
    ("sugd, the published 7B setting (AILS-NTUA)", "sugd", {}),
    ("simnpo", "simnpo", {"learning_rate": 3e-4, "epochs": 4, "retain_weight": 3.0}),
    (
        "rmu (adaptive)",
        "rmu",
        {"learning_rate": 1e-3, "epochs": 3, "adaptive": True, "steering_coeff": 5.0, "alpha": 10.0},
    ),
    ("rmu (fixed coefficient)", "rmu", {"learning_rate": 1e-3, "epochs": 3, "steering_coeff": 6.5, "alpha": 10.0}),
    (
        "mia_target (ours)",
        "mia_target",
        {"learning_rate": 3e-4, "epochs": 12, "forget_weight": 4.0, "retain_weight": 8.0, "retain_ratio": 3.0},
    ),
    ("task_vector", "task_vector", {"learning_rate": 3e-4, "epochs": 2, "scale": 1.0}),
] + [
    (f"merge of the two npo models: {combination}", "merge", {"combination": combination, "density": 0.5, **extra})
    for combination, extra in [
        ("ties", {}),
        ("dare_ties", {}),
        ("dare_linear", {}),
        ("magnitude_prune", {}),
        ("linear", {}),
        ("task_arithmetic", {"scale": 0.5}),
        ("breadcrumbs", {"scale": 0.5}),
        ("breadcrumbs_ties", {}),
        ("della", {}),
        ("della_linear", {"scale": 0.5}),
        ("model_stock", {}),
        ("slerp", {}),
    ]
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/methods_toy"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.task = toy_task_for_benchmark(args.task)
    shutil.rmtree(args.out, ignore_errors=True)
    task = load_task(args.task / "data")
    task = dataclasses.replace(task, held_out=load_held_out(default_held_out(args.task / "mia"), args.task / "mia"))
    sets = EvalSets.load(args.task / "data", mia=args.task / "mia", mmlu=args.task / "mmlu")
    base = args.task / "model"
    rows = [("base model", evaluate_checkpoint(base, sets, EvalOptions(dtype=DTYPE)), 0.0)]
    npo_models = []
    for number, (label, method, settings) in enumerate(RUNS):
        if method == "merge":
            settings = {**settings, "models": MergeParams.models_setting(npo_models)}
        start = time.perf_counter()
        out = run_method(method, base, task, args.out / f"{number}_{method}", settings)
        seconds = time.perf_counter() - start
        if method == "npo":
            npo_models.append(out)
        rows.append((label, evaluate_checkpoint(out, sets, EvalOptions(dtype=DTYPE)), seconds))
    print("| method | forget mean | retain mean | task agg | MIA AUC | MIA score | MMLU | final | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, s, seconds in rows:
        print(
            f"| {label} | {s['forget_mean']:.3f} | {s['retain_mean']:.3f} | {s['task_aggregate']:.3f} | "
            f"{s['mia_auc']:.3f} "
            f"| {s['mia_score']:.3f} | {s['mmlu_accuracy']:.3f} | {s['final_score']:.3f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
