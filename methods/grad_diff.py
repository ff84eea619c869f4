"""Gradient difference (organizer baseline): ascend on forget, descend on retain, one step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearn_sweep.methods.registry import register
from unlearn_sweep.methods.training import LossMethod, Step, TrainingParams, mean_nll


@dataclass
class GradDiffParams(TrainingParams):
    retain_weight: float = 1.0


@register
class GradDiff(LossMethod):
    name = "grad_diff"
    Params = GradDiffParams

    def loss(self, model, step: Step, reference, params: GradDiffParams) -> torch.Tensor:
        return -mean_nll(model, step.forget) + params.retain_weight * mean_nll(model, step.retain)
