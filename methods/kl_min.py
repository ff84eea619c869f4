"""KL minimisation (organizer baseline): ascend on forget, stay close to the original model's
next-token distributions on retain."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from unlearn_sweep.methods.registry import register
from unlearn_sweep.methods.training import LossMethod, Step, TrainingParams, UnlearningTrainer, mean_nll, retain_kl


@dataclass
class KlMinParams(TrainingParams):
    kl_weight: float = 1.0


class KlMinTrainer(UnlearningTrainer):
    uses_reference = True
    forwards = 2

    def loss(self, model, step: Step) -> torch.Tensor:
        return -mean_nll(model, step.forget) + self.params.kl_weight * retain_kl(model, self.reference, step.retain)


@register
class KlMin(LossMethod):
    name = "kl_min"
    Params = KlMinParams
    Trainer = KlMinTrainer
