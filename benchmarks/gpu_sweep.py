"""Trials per hour and peak GPU memory of a short sweep on one GPU, packed (several trials
per GPU, fractional `gpu`) against unpacked (one trial per GPU), for a real-sized model
built from an OLMo-2 config (no download) on the toy task's data.

    python benchmarks/gpu_sweep.py [--params 150M|400M|1B] [--trials 8] [--pack 4]
    python benchmarks/gpu_sweep.py --smoke      # CPU only: tiny model, logical GPU; checks the script

Peak GPU memory is sampled from nvidia-smi every 0.5 s during each sweep (all processes).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from pathlib import Path

SIZES = {  # hidden, layers, heads, intermediate: ~parameters with the toy tokenizer
    "tiny": (64, 2, 4, 128),
    "150M": (768, 12, 12, 3072),
    "400M": (1024, 24, 16, 4096),
    "1B": (2048, 16, 16, 8192),
}


def build_model(task: Path, size: str, out: Path) -> int:
    """An untrained OLMo-2 of the given size with the toy task's tokenizer, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, Olmo2ForCausalLM
    from unlearn_sweep.corpus.toy_model import olmo2_config

    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    hidden, layers, heads, intermediate = SIZES[size]
    config = olmo2_config(tokenizer, hidden, intermediate, layers, heads, tied=False)
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


class GpuMemorySampler:
    """Highest total GPU memory in use (MiB) seen by nvidia-smi while running."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                output = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak = max([self.peak, *(int(line) for line in output.split() if line.strip().isdigit())])
            except (OSError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def sweep(
    name: str, model: Path, task: Path, work: Path, trials: int, gpu_share: float, cpus: int, smoke: bool
) -> tuple[float, int]:
    import ray
    from unlearn_sweep.corpus.toy_task import sweep_paths
    from unlearn_sweep.orchestrator.config import config_from_dict
    from unlearn_sweep.orchestrator.sweep import run_sweep

    raw = {
        "name": name,
        **sweep_paths(task),
        "model": str(model),
        "methods": ["grad_diff"],
        "trials": trials,
        "seed": 0,
        "search_space_overrides": {"grad_diff": {"epochs": 1, "batch_size": 8}},
        "resources_per_trial": {"cpu": max(1, cpus * gpu_share // 1) if not smoke else 1, "gpu": gpu_share},
        "eval": {"batch_size": 32, "max_new_tokens": 32},  # an untrained model never stops: bound generation
        "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db"},
        "storage_path": str(work / "runs"),
    }
    config = config_from_dict(raw, work / f"{name}.yaml", work)
    ray.init(address="local", num_cpus=cpus, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with GpuMemorySampler() as memory:
            start = time.perf_counter()
            summary = run_sweep(config)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    failed = sum(row["status"] == "failed" for row in summary.rows)
    if failed:
        raise SystemExit(f"{name}: {failed} trials failed; see {work}/runs")
    return trials * 3600 / seconds, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--params", choices=sorted(SIZES), default="150M")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--pack", type=int, default=4, help="trials per GPU when packed")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/gpu_sweep"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a logical GPU: checks the script only")
    args = parser.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run on a GPU machine (or --smoke to check the script on a CPU)")
    from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark

    args.task = toy_task_for_benchmark(args.task)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    size = "tiny" if args.smoke else args.params
    count = build_model(args.task, size, args.dir / "model")
    cpus = 2 if args.smoke else max(args.pack, min(16, __import__("os").cpu_count() or 1))
    device = "CPU (smoke test, logical GPU)" if args.smoke else torch.cuda.get_device_name(0)
    precision = "fp32" if args.smoke else "bf16, the default on this GPU"
    print(
        f"{args.trials} grad_diff trials (1 epoch, {precision}, eval with 32 new tokens) of a "
        f"{count / 1e6:.1f}M-parameter OLMo-2 on {device}",
        flush=True,
    )
    results = {}
    for label, share in (("unpacked", 1.0), ("packed", 1.0 / args.pack)):
        # Each sweep's figures as it ends: a time limit that stops the second keeps the first's.
        rate, peak = results[label] = sweep(
            label, args.dir / "model", args.task.resolve(), args.dir, args.trials, share, cpus, args.smoke
        )
        print(f"  {label:<9} {rate:8.1f} trials/hour   peak GPU memory {peak:6d} MiB", flush=True)
    (unpacked, unpacked_peak), (packed, packed_peak) = results["unpacked"], results["packed"]
    print(
        f"  packed / unpacked: {packed / unpacked:.2f}x trials/hour, {packed_peak / max(unpacked_peak, 1):.2f}x "
        "peak memory"
    )


if __name__ == "__main__":
    main()
