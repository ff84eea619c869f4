"""Sequential unlearning with gradient difference (AILS-NTUA, 1st place at SemEval-2025 Task 4).

The forget set is split into `chunks`, processed in order; each chunk is mixed with
`positive_ratio` x its size retain samples and trained for `epochs` passes, with a per-sample
loss factor of -1 for forget samples and `positive_factor` for retain samples. The per-epoch
hook fires after each chunk."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from unlearn_sweep.methods.registry import ParamError, register
from unlearn_sweep.methods.training import LossMethod, MicroBatch, Step, TrainingParams, UnlearningTrainer, sequence_nll


@dataclass
class SugdParams(TrainingParams):
    chunks: int = 4
    positive_ratio: float = 1.0
    positive_factor: float = 1.0

    def check(self) -> None:
        super().check()
        if self.chunks < 1 or self.positive_ratio < 0:
            raise ParamError("chunks must be at least 1 and positive_ratio non-negative")


class SugdTrainer(UnlearningTrainer):
    def loss(self, model, step: Step) -> torch.Tensor:
        total, counts = sequence_nll(model, step.forget)
        return (step.forget.factors * total / counts).mean()


@register
class Sugd(LossMethod):
    name = "sugd"
    Params = SugdParams
    Trainer = SugdTrainer

    def epochs(self, params: SugdParams) -> int:
        return params.chunks

    def epoch_plan(self, forget, retain, epoch, params: SugdParams, rng) -> list[MicroBatch]:
        chunk_order = random.Random(params.seed).sample(range(len(forget)), len(forget))  # fixed for the run
        size = -(-len(forget) // params.chunks)
        chunk = chunk_order[(epoch - 1) * size : epoch * size]
        positives = [rng.randrange(len(retain)) for _ in range(round(params.positive_ratio * len(chunk)))]
        samples = [(forget[i], -1.0) for i in chunk] + [(retain[i], params.positive_factor) for i in positives]
        plan = []
        for _ in range(params.epochs):
            order = rng.sample(samples, len(samples))
            for start in range(0, len(order), params.batch_size):
                group = order[start : start + params.batch_size]
                plan.append(MicroBatch([example for example, _ in group], factors=[factor for _, factor in group]))
        return plan
