"""KL minimisation (organizer baseline): ascend on forget, stay close to the original model's
next-token distributions on retain."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearn_sweep.methods.registry import register
from unlearn_sweep.methods.training import LossMethod, Step, TrainingParams, mean_nll, retain_kl


@dataclass
class KlMinParams(TrainingParams):
    kl_weight: float = 1.0


@register
class KlMin(LossMethod):
    name = "kl_min"
    Params = KlMinParams
    uses_reference = True

    def loss(self, model, step: Step, reference, params: KlMinParams) -> torch.Tensor:
        return -mean_nll(model, step.forget) + params.kl_weight * retain_kl(model, reference, step.retain)
