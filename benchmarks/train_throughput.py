"""Training throughput of one trial's engine on a real-sized model: tokens/s, model FLOPs
utilisation and peak GPU memory against the memory plan, for full fine-tuning (bf16 by default
on a GPU with bf16 units), DeepSpeed ZeRO-2 (one rank) and QLoRA.

An untrained OLMo-2 built from a config (no download, `gpu_sweep.build_model`) with the toy
task's tokenizer is trained with `grad_diff` (a forget and a retain batch per step, both with a
graph) on the toy task's rows through the sweep's own Trainer; steps after the first few are
timed. MFU counts 6 FLOPs per parameter per trained token against the GPU's dense bf16 peak.

    python benchmarks/train_throughput.py [--size 1B] [--modes full,zero2,qlora] [--steps 12]
    python benchmarks/train_throughput.py --smoke     # CPU: tiny model, fp32; checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
from gpu_sweep import build_model
from transformers import AutoTokenizer, TrainerCallback
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark
from unlearn_sweep.methods.memory_plan import GIB, ModelShape, estimate
from unlearn_sweep.methods.registry import build_params, get_method

MODES = {  # the overrides each mode trains with
    "full": {"adapter": "full"},
    "zero2": {"adapter": "full", "zero_stage": 2},
    "qlora": {"adapter": "qlora", "lora_rank": 16},
}
# Dense bf16 tensor-core peaks (FLOP/s) by device name; others need --peak-tflops.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


class StepTimer(TrainerCallback):
    """When each optimizer step ended."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def measure(model_dir: Path, task, mode: str, batch: int, length: int, steps: int, warmup: int) -> dict:
    method = get_method("grad_diff")
    params = method.for_this_device(
        build_params(method, {**MODES[mode], "batch_size": batch, "max_length": length, "epochs": 1})
    )
    task = dataclasses.replace(task, forget=task.forget[: batch * (steps + warmup)])
    if torch.cuda.is_available():
        # The cache the previous mode left would count as this mode's peak (reserved).
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    method.train(model_dir, task, params, callbacks=(timer,))
    timed = timer.ends[warmup:]
    seconds = timed[-1] - timed[0]
    # A step trains `batch` forget and `batch` retain examples (their own tokens, padding not counted).
    forget, retain, _ = method.examples(AutoTokenizer.from_pretrained(model_dir), task, params)
    per_example = sum(len(ids) for ids, _ in forget) / len(forget) + sum(len(ids) for ids, _ in retain) / len(retain)
    tokens = (len(timed) - 1) * batch * per_example
    shape = ModelShape.from_config(model_dir)
    plan = estimate(shape, params, method.Trainer, 1)
    return {
        "mode": mode,
        "bf16": params.bf16,
        "steps_timed": len(timed) - 1,
        "tokens_per_s": tokens / seconds,
        "parameters": shape.total,
        "peak_gib": torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None,
        "plan_gib": (plan.model_states + plan.reference + plan.activations) / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--size", default="1B")
    parser.add_argument("--modes", default="full,zero2,qlora")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/train_throughput"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, full and zero2, 3 steps")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.modes, args.steps, args.batch_size, args.max_length = "tiny", "full,zero2", 3, 4, 64
    args.task = toy_task_for_benchmark(args.task)
    model_dir = args.dir / f"olmo2-{args.size}"
    if not (model_dir / "config.json").exists():
        build_model(args.task, args.size, model_dir)
    task = load_task(args.task / "data")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAKS.items() if k in device), None)
    rows = []
    for mode in args.modes.split(","):
        row = measure(model_dir, task, mode, args.batch_size, args.max_length, args.steps, warmup=2)
        row["mfu"] = 6 * row["parameters"] * row["tokens_per_s"] / peak if peak else None
        rows.append(row)
        print(
            f"{mode:<6} bf16 {str(row['bf16']).lower():<5} {row['tokens_per_s']:9.0f} tokens/s  MFU "
            + (f"{row['mfu']:.1%}" if row["mfu"] is not None else "-")
            + "  peak "
            + (
                f"{row['peak_gib']:.1f} GiB reserved, {row['peak_allocated_gib']:.1f} allocated"
                if row["peak_gib"] is not None
                else "-"
            )
            + f" (plan, training alone: {row['plan_gib']:.1f} GiB)",
            flush=True,
        )
    print(f"grad_diff, batch {args.batch_size}, length {args.max_length}, OLMo-2 {args.size} on {device}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "size": args.size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
