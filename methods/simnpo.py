"""SimNPO (Fan et al. 2024): NPO without the reference model. The forget term is
-(2 / beta) * mean log sigmoid(beta * (mean token NLL - delta)): length-normalised (a long answer
is not pushed harder than a short one), with a margin delta, bounded like NPO once the NLL is
well above the margin; plus retain cross-entropy (the open-unlearning recipe's retain term)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from unlearn_sweep.methods.registry import ParamError, register
from unlearn_sweep.methods.training import (
    LossMethod,
    Step,
    TrainingParams,
    UnlearningTrainer,
    mean_nll,
    row_mean,
    sequence_nll,
)


@dataclass
class SimNpoParams(TrainingParams):
    beta: float = 4.5
    delta: float = 0.0  # the margin: the mean token NLL the forget term stops caring beyond
    forget_weight: float = 1.0
    retain_weight: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.beta > 0:
            raise ParamError(f"beta={self.beta}: must be positive")


class SimNpoTrainer(UnlearningTrainer):
    forwards = 2

    def loss(self, model, step: Step) -> torch.Tensor:
        params = self.params
        total, counts = sequence_nll(model, step.forget)
        forget = -(2 / params.beta) * row_mean(F.logsigmoid(params.beta * (total / counts - params.delta)), step.forget)
        return params.forget_weight * forget + params.retain_weight * mean_nll(model, step.retain)


@register
class SimNpo(LossMethod):
    name = "simnpo"
    Params = SimNpoParams
    Trainer = SimNpoTrainer
