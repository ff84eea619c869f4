"""The memory plan of a sweep: for every method the config can sample, the worst case of its
search space (largest batch, length and LoRA rank; every choice of adapter, ZeRO stage,
precision, checkpointing and offload), estimated per GPU before anything starts. A sweep
whose trials cannot fit the GPUs it declares is refused with what would make it fit."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from unlearn_sweep.evaluation.options import LOGIT_ELEMENTS, PLAIN_HEAD_MODELS, TOKENS_PER_ROW
from unlearn_sweep.methods.memory_plan import GIB, Estimate, ModelShape, estimate
from unlearn_sweep.methods.registry import build_params, get_method
from unlearn_sweep.orchestrator.config import ConfigError, SweepConfig
from unlearn_sweep.orchestrator.context import MULTI_WORKER_DEFAULTS
from unlearn_sweep.orchestrator.search import choices_or_bounds, distributions, load_space, possible_values

# Choices that change memory: every sampled combination is planned.
ENUMERATED = ("adapter", "zero_stage", "bf16", "gradient_checkpointing", "zero_offload")
# Ranges whose high end is the worst case.
HIGHEST = ("batch_size", "max_length", "lora_rank", "last_k_layers")


@dataclass
class PlanRow:
    method: str
    params: Any
    estimate: Estimate
    available: float | None  # bytes per GPU, None without GPUs
    shape: ModelShape  # what the estimate was made for (the error's suggestion re-estimates on it)
    space: str  # where in search_space_overrides its parameters are set: "npo", "merge.sources.over"

    @property
    def fits(self) -> bool:
        return self.available is None or self.estimate.total <= self.available


def worst_cases(method: str, space: dict[str, Any], workers: int, on_gpu: bool = True) -> list[Any]:
    """The method's Params at each memory-relevant combination of its space; `bf16: auto`
    decided as the trials' device decides it."""
    method_object = get_method(method)
    constants: dict[str, Any] = dict(MULTI_WORKER_DEFAULTS) if workers > 1 else {}
    options: dict[str, list[Any]] = {}
    for name, spec in space.items():
        sampled = distributions(spec)  # one per condition: the worst case is over all of them
        if not sampled:
            constants[name] = spec
        elif name in ENUMERATED and possible_values(spec) is not None:
            options[name] = possible_values(spec)
        elif name in HIGHEST:
            constants[name] = int(max(value for distribution in sampled for value in choices_or_bounds(distribution)))
    combinations = [dict(zip(options, values, strict=True)) for values in itertools.product(*options.values())] or [{}]
    planned = [build_params(method_object, {**constants, **combination}) for combination in combinations]
    # bf16's default follows the device; the GPUs the plan is made for (Ampere or newer: A100,
    # H100, H200) have bf16 units.
    return [dataclasses.replace(p, bf16=on_gpu) if getattr(p, "bf16", False) is None else p for p in planned]


def evaluation_bytes(shape: ModelShape, eval_dtype: str, batch_size: int) -> tuple[int, int]:
    """(the scored copy of the model in the inference dtype, the largest working set of its
    passes). A batch holds at most batch_size x TOKENS_PER_ROW padded tokens (evaluation/
    inference.py), so the working set is bounded by the options: generation's KV cache of
    those tokens, or the loss pass's last hidden states with one slice of float32 logits
    (the whole batch's logits for a model whose head is not plain); each with one layer's
    transient activations."""
    width = {"float32": 4, "auto": 4}.get(eval_dtype, 2)
    tokens = batch_size * TOKENS_PER_ROW
    # one layer's intermediates: what training's forward of a layer keeps, here freed as it ends
    layer = int(tokens * (shape.layer_activations_16 if width == 2 else shape.layer_activations_32))
    kv_cache = tokens * 2 * shape.layers * shape.kv_width * width
    logits = LOGIT_ELEMENTS if shape.model_type in PLAIN_HEAD_MODELS else tokens * shape.vocab
    loss_pass = tokens * shape.hidden * width + logits * (width + 4 + 4)  # logits, float32 cast, log-softmax
    return width * shape.total, layer + max(kv_cache, loss_pass)


def evaluation_reservation(config: SweepConfig, shape: ModelShape) -> tuple[int, int]:
    """What an epoch's evaluation holds on a GPU beside the training engine, (copy, working
    set): the model in the inference dtype and its passes' largest working set, or with the
    vLLM backend the engine's share of the whole GPU (weights, KV cache and all), whatever the
    model's size."""
    if config.eval.backend == "vllm" and config.gpu_memory_gb:
        return int(config.eval.vllm_memory * config.gpu_memory_gb * GIB), 0
    return evaluation_bytes(shape, config.eval.dtype, config.eval.batch_size)


def plan_sweep(config: SweepConfig, longest: dict[str, int] | None = None) -> list[PlanRow]:
    """Every method's worst cases; `longest` (lengths.check_lengths: by space, the longest
    example its trials train on): a batch pads to its longest example, so the activations are
    planned at it where max_length is longer."""
    shape = ModelShape.from_config(config.model)
    evaluation = evaluation_reservation(config, shape)
    workers = config.workers
    gpu = config.resources_per_trial.gpu
    available = config.gpu_memory_gb * GIB * min(gpu, 1) if config.gpu_memory_gb and gpu else None
    rows = []
    for name, origin, params_space in trained_spaces(config):
        trainer = get_method(name).Trainer
        for params in worst_cases(name, params_space, workers):
            if longest is not None:
                params = dataclasses.replace(params, max_length=min(params.max_length, longest[origin]))
            rows.append(
                PlanRow(name, params, estimate(shape, params, trainer, workers, evaluation), available, shape, origin)
            )
    return rows


def trained_spaces(config: SweepConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, where in search_space_overrides, its params space) of every model the sweep's
    trials train: a merge's sources under their source method."""
    trained = []
    for method in config.methods:
        space = load_space(method, config.search_space_overrides.get(method))
        if "sources" in space:
            trained += [
                (space["source_method"], f"{method}.sources.{source}", entries)
                for source, entries in space["sources"].items()
            ]
        else:
            trained.append((method, method, space["params"]))
    return trained


def trains_zero3_in_tune_worker(config: SweepConfig) -> bool:
    """Whether a trial may train under ZeRO-3 in Tune's own worker process (one worker per
    trial): DeepSpeed keeps a ZeRO-3 engine, its model and states alive in the process after
    the run (docs/benchmarks.md), so the worker's next trial would run beside them."""
    return config.workers == 1 and any(
        params.zero_stage == 3
        for name, _, params_space in trained_spaces(config)
        for params in worst_cases(name, params_space, 1)
    )


def _fix(row: PlanRow, config: SweepConfig) -> str:
    """The first change that makes the row fit, as a phrase for the error."""
    trainer = get_method(row.method).Trainer
    tries: list[tuple[str, Any, int]] = [
        ("gradient_checkpointing: true", dataclasses.replace(row.params, gradient_checkpointing=True), config.workers)
    ]
    for workers in (2, 4, 8, 16):
        if workers >= config.workers:
            tries.append(
                (
                    f"zero_stage: 3 with resources_per_trial.workers: {workers}",
                    dataclasses.replace(row.params, zero_stage=3, bf16=True, gradient_checkpointing=True),
                    workers,
                )
            )
    tries.append(("adapter: lora", dataclasses.replace(row.params, adapter="lora"), config.workers))
    for phrase, params, workers in tries:
        if (
            estimate(
                row.shape,
                params,
                trainer,
                workers,
                (row.estimate.evaluation, row.estimate.evaluation_work),
            ).total
            <= row.available
        ):
            return phrase
    return "a GPU with more memory"


def check_memory(config: SweepConfig, rows: list[PlanRow] | None = None) -> list[PlanRow]:
    """The plan (made here unless given), or a ConfigError naming the first method whose
    trials cannot fit."""
    rows = plan_sweep(config) if rows is None else rows
    for row in rows:
        if not row.fits:
            p = row.params
            raise ConfigError(
                config.source,
                f"{row.method} (adapter {p.adapter}, zero_stage {p.zero_stage}, bf16 {p.bf16}, batch_size "
                f"{p.batch_size}, "
                f"max_length {p.max_length}) needs {row.estimate.total / GIB:.1f} GiB per GPU, "
                f"{row.available / GIB:.1f} GiB available; "
                f"it would fit with {_fix(row, config)}",
                field="gpu_memory_gb",
            )
    return rows


def format_plan(rows: list[PlanRow], workers: int) -> str:
    header = [
        "method",
        "adapter",
        "zero",
        "bf16",
        "ckpt",
        "batch/gpu",
        "length",
        "states GiB",
        "reference GiB",
        "activations GiB",
        "eval copy GiB",
        "eval work GiB",
        "total GiB",
        "fits",
    ]
    lines = [header]
    for row in rows:
        p, e = row.params, row.estimate
        lines.append(
            [
                row.method,
                p.adapter,
                str(p.zero_stage),
                str(p.bf16).lower(),
                str(p.gradient_checkpointing).lower(),
                str(max(1, p.batch_size // workers)),
                str(p.max_length),
                f"{e.model_states / GIB:.2f}",
                f"{e.reference / GIB:.2f}",
                f"{e.activations / GIB:.2f}",
                f"{e.evaluation / GIB:.2f}",
                f"{e.evaluation_work / GIB:.2f}",
                f"{e.total / GIB:.2f}",
                "-" if row.available is None else ("yes" if row.fits else "NO"),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )
