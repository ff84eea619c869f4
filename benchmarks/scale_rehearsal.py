"""Scale rehearsal on a CPU: an OLMo-2 of about 100M parameters built from a config (random
weights, the toy task's tokenizer and data), NPO full fine-tuning for a few steps as a
2-worker Ray Train run under DeepSpeed over gloo, at ZeRO-0 and at ZeRO-3. Prints each rank's
measured peak memory growth next to the memory plan's prediction, and the ZeRO-3/ZeRO-0 ratio
of model-state memory per rank (near 1/2 with 2 ranks).

    python benchmarks/scale_rehearsal.py [--task toy_task] [--layers 14]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
from pathlib import Path

import ray
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from unlearn_sweep.corpus.semeval import load_task
from unlearn_sweep.corpus.toy_model import olmo2_config
from unlearn_sweep.corpus.toy_task import toy_task_for_benchmark
from unlearn_sweep.methods.memory_plan import GIB, ModelShape, estimate
from unlearn_sweep.methods.registry import build_params, get_method
from unlearn_sweep.orchestrator.trial import export_ray_train_ranks

SETTINGS = {"epochs": 1, "batch_size": 4, "max_length": 64, "learning_rate": 1e-5, "adapter": "full"}


def build_model(task_dir: Path, out_dir: Path, layers: int) -> Path:
    from transformers import AutoTokenizer, Olmo2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(task_dir / "model")
    config = olmo2_config(tokenizer, hidden=768, intermediate=2048, layers=layers, heads=12)
    torch.manual_seed(0)
    Olmo2ForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resident_bytes() -> int:
    """Resident memory now, in bytes. VmRSS, not only anonymous memory: without ZeRO the weights
    and the reference stay views of the memory-mapped safetensors file (file-backed pages)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def train_worker(config: dict) -> None:
    torch.set_num_threads(1)
    rank = export_ray_train_ranks()
    import deepspeed  # noqa: F401  (imported before the baseline: what the run itself adds is measured)

    baseline, resident = peak_rss_bytes(), resident_bytes()
    task = load_task(config["task"])
    task = dataclasses.replace(task, forget=task.forget[:8], retain=task.retain[:8])  # two optimizer steps at batch 4
    method = get_method("npo")
    params = build_params(method, {**SETTINGS, "zero_stage": config["stage"]})

    def after_training(epoch: int, checkpoint: Path | None, last: bool) -> None:
        # The trainer, its engine and the reference are alive here: what they hold, without load-time transients.
        Path(config["results"], f"resident{rank}").write_text(str(resident_bytes() - resident))

    method.train(Path(config["model"]), task, params, on_epoch=after_training)
    Path(config["results"], f"rank{rank}").write_text(str(peak_rss_bytes() - baseline))  # one machine: a shared folder


def run(stage: int, model_dir: Path, task_dir: Path, scratch: Path) -> list[int]:
    """Each rank's peak memory growth over the run, in bytes."""
    results = scratch / f"zero{stage}-results"
    results.mkdir()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "model": str(model_dir),
            "task": str(task_dir / "data"),
            "stage": stage,
            "results": str(results),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"zero{stage}", storage_path=str(scratch / "ray")),
    )
    trainer.fit()
    return [
        (int((results / f"rank{rank}").read_text()), int((results / f"resident{rank}").read_text()))
        for rank in range(2)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=Path, default=Path("toy_task"), help="toy task directory (built if missing)")
    parser.add_argument("--layers", type=int, default=14)
    args = parser.parse_args()
    args.task = toy_task_for_benchmark(args.task)
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as scratch:
        model_dir = build_model(args.task, Path(scratch) / "model", args.layers)
        shape = ModelShape.from_config(model_dir)
        print(
            f"OLMo-2 from a config: {shape.total / 1e6:.0f}M parameters, 2 Ray Train workers (gloo), NPO full "
            "fine-tuning"
        )
        # glibc raises its mmap threshold as large blocks are freed, after which ZeRO-3's gathered-parameter
        # buffers come from the heap and their freed pages stay resident (measured: ~1.2 GiB per rank
        # here). A fixed threshold returns freed buffers, so the figures are live memory, as on a GPU.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}},
        )
        measured, planned = {}, {}
        try:
            for stage in (0, 3):
                params = build_params(get_method("npo"), {**SETTINGS, "zero_stage": stage})
                trainer = get_method("npo").Trainer
                plan = estimate(shape, params, trainer, 2)
                planned[stage] = plan.model_states + plan.reference + plan.activations
                measured[stage] = run(stage, model_dir, args.task, Path(scratch))
        finally:
            ray.shutdown()
    print(
        "| ZeRO stage | rank | peak growth (GiB) | resident after training (GiB) | plan: states + reference + "
        "activations (GiB) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for stage in (0, 3):
        for rank, (peak, resident) in enumerate(measured[stage]):
            print(f"| {stage} | {rank} | {peak / GIB:.2f} | {resident / GIB:.2f} | {planned[stage] / GIB:.2f} |")
    ratios = ", ".join(f"{measured[3][rank][1] / measured[0][rank][1]:.2f} (rank {rank})" for rank in range(2))
    print(f"ZeRO-3 / ZeRO-0 resident after training, per rank: {ratios}; planned {planned[3] / planned[0]:.2f}")


if __name__ == "__main__":
    main()
