"""Sequential unlearning with gradient difference (AILS-NTUA, 1st place at SemEval-2025 Task 4).

The forget set is split into chunks of `chunk_size` rows, processed in order; each chunk is
mixed with `positive_ratio` x its size retain samples and trained for `epochs` passes, with a
per-sample loss factor of -1 for forget samples and `positive_factor` for retain samples. The
per-epoch hook fires after each chunk. The defaults are the published 7B setting (chunks of
32, learning rate 1e-5, 7 epochs, positive ratio 7, factor 0.5, the last 8 layers trained)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from unlearn_sweep.methods.registry import ParamError, register
from unlearn_sweep.methods.training import (
    LossMethod,
    MicroBatch,
    Step,
    TrainingParams,
    UnlearningTrainer,
    row_mean,
    sequence_nll,
)


@dataclass
class SugdParams(TrainingParams):
    chunk_size: int = 32
    positive_ratio: float = 7.0
    positive_factor: float = 0.5
    learning_rate: float = 1e-5
    epochs: int = 7
    adapter: str = "last_k"
    last_k_layers: int = 8

    def check(self) -> None:
        super().check()
        if self.chunk_size < 1 or self.positive_ratio < 0:
            raise ParamError(
                f"chunk_size={self.chunk_size}, positive_ratio={self.positive_ratio}: "
                "chunk_size must be at least 1 and positive_ratio non-negative"
            )


class SugdTrainer(UnlearningTrainer):
    def loss(self, model, step: Step) -> torch.Tensor:
        total, counts = sequence_nll(model, step.forget)
        return row_mean(step.forget.factors * total / counts, step.forget)


@register
class Sugd(LossMethod):
    name = "sugd"
    Params = SugdParams
    Trainer = SugdTrainer

    def epochs(self, params: SugdParams, forget_examples: int) -> int:
        return -(-forget_examples // params.chunk_size)

    def epoch_plan(self, forget, retain, epoch, params: SugdParams, rng) -> list[MicroBatch]:
        chunk_order = random.Random(params.seed).sample(range(len(forget)), len(forget))  # fixed for the run
        chunk = chunk_order[(epoch - 1) * params.chunk_size : epoch * params.chunk_size]
        positives = [rng.randrange(len(retain)) for _ in range(round(params.positive_ratio * len(chunk)))]
        samples = [(forget[i], -1.0) for i in chunk] + [(retain[i], params.positive_factor) for i in positives]
        plan = []
        for _ in range(params.epochs):
            order = rng.sample(samples, len(samples))
            for start in range(0, len(order), params.batch_size):
                group = order[start : start + params.batch_size]
                plan.append(MicroBatch([example for example, _ in group], factors=[factor for _, factor in group]))
        return plan
