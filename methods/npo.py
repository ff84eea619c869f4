"""Negative Preference Optimization (Zhang et al. 2024) with retain terms, as ZJUKLAB's
NPO+GDR+KLR: loss = a * NPO(forget) + b * KL(reference || model on retain) + c * CE(retain).

NPO = -(2 / beta) * mean log sigmoid(-beta * (log p(y|x) - log p_ref(y|x))): a bounded form of
gradient ascent that slows down once the model has moved away from the reference."""

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
    retain_kl,
    row_mean,
    sequence_nll,
)


@dataclass
class NpoParams(TrainingParams):
    beta: float = 0.1
    npo_weight: float = 1.0
    retain_kl_weight: float = 1.0
    retain_ce_weight: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.beta > 0:
            raise ParamError(f"beta={self.beta}: must be positive")


class NpoTrainer(UnlearningTrainer):
    uses_reference = True
    forwards = 2

    def loss(self, model, step: Step) -> torch.Tensor:
        params = self.params
        log_p = -sequence_nll(model, step.forget)[0]
        with torch.no_grad():
            log_p_reference = -sequence_nll(self.reference, step.forget)[0]
        npo = -(2 / params.beta) * row_mean(F.logsigmoid(-params.beta * (log_p - log_p_reference)), step.forget)
        loss = params.npo_weight * npo
        if params.retain_kl_weight:
            loss = loss + params.retain_kl_weight * retain_kl(model, self.reference, step.retain)
        if params.retain_ce_weight:
            loss = loss + params.retain_ce_weight * mean_nll(model, step.retain)
        return loss


@register
class Npo(LossMethod):
    name = "npo"
    Params = NpoParams
    Trainer = NpoTrainer
