"""Gradient difference (organizer baseline): ascend on forget, descend on retain, one step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from unlearn_sweep.methods.registry import register
from unlearn_sweep.methods.training import LossMethod, Step, TrainingParams, UnlearningTrainer, mean_nll


@dataclass
class GradDiffParams(TrainingParams):
    retain_weight: float = 1.0


class GradDiffTrainer(UnlearningTrainer):
    forwards = 2

    def loss(self, model, step: Step) -> torch.Tensor:
        return -mean_nll(model, step.forget) + self.params.retain_weight * mean_nll(model, step.retain)


@register
class GradDiff(LossMethod):
    name = "grad_diff"
    Params = GradDiffParams
    Trainer = GradDiffTrainer
