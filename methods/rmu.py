"""Representation Misdirection for Unlearning (Li et al. 2024, WMDP): at one layer, steer the
model's activations on forget text toward a fixed random direction scaled by a coefficient,
and keep its activations on retain text where the frozen model has them:

    loss = mean ||h(forget) - c u||^2 + alpha * mean ||h(retain) - h_frozen(retain)||^2

(means over tokens and hidden units, as the WMDP code's mse_loss). u is a unit vector drawn
uniformly from [0, 1)^d with the run's seed. `adaptive` scales the coefficient by the frozen
model's mean activation norm on the forget batch (Dang et al. 2024, adaptive RMU, as the
4th-placed SemEval-2025 system used it), so that one coefficient means the same at every layer.
Only the layers up to `layer` receive gradients; the ones above it are left as they were."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from unlearn_sweep.methods.registry import ParamError, register
from unlearn_sweep.methods.training import (
    AdapterDisabled,
    Batch,
    LossMethod,
    Step,
    TrainingParams,
    UnlearningTrainer,
)


@dataclass
class RmuParams(TrainingParams):
    layer: int = 2  # decoder layer (from 0) whose output is steered; WMDP used 7 of Zephyr-7B's 32
    steering_coeff: float = 6.5  # c; with adaptive, a multiple of the frozen activations' norm
    alpha: float = 100.0  # weight of the retain activation term
    adaptive: bool = False

    def check(self) -> None:
        super().check()
        if self.layer < 0:
            raise ParamError(f"layer={self.layer}: must be a decoder layer index >= 0")
        if not (self.steering_coeff > 0 and self.alpha >= 0):
            raise ParamError(
                f"steering_coeff={self.steering_coeff}, alpha={self.alpha}: need steering_coeff > 0 and alpha >= 0"
            )


def layer_activations(model: Any, batch: Batch, layer: int) -> torch.Tensor:
    """The output of decoder layer `layer` at the batch's real (non-padding) tokens: (tokens, hidden).

    Only layers 0 to `layer` run, and the output layer only at the last position: the layers
    above and the logits were computed, and their activations held, for nothing (at layer 7 of
    a 7B model's 32, three quarters of the forward pass). The output is taken raw by a hook on
    the layer (a model's own last state is normed, its recorded states a Transformers feature
    that hooks the layers present when first asked)."""
    decoder = decoder_of(model)
    layers = decoder.layers
    if not 0 <= layer < len(layers):
        raise ParamError(f"layer={layer}: the model has {len(layers)} decoder layers")
    outputs: list[torch.Tensor] = []  # a checkpointed layer runs again in the backward: the first is the forward's
    hook = layers[layer].register_forward_hook(
        lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple) else output)
    )
    decoder.layers = layers[: layer + 1]
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
    finally:
        decoder.layers = layers
        hook.remove()
    return outputs[0][batch.attention_mask.bool()].float()


def decoder_of(model: Any) -> torch.nn.Module:
    """The module holding the decoder layers of a model as a loss calls it: a DeepSpeed engine's
    (or DDP's) module, a LoRA reference's network (its adapter off), a peft or a plain model."""
    if isinstance(model, AdapterDisabled):
        model = model.trainer.model
    return getattr(model, "module", model).get_decoder()


def activation_mse(activations: torch.Tensor, target: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The squared error's mean over the part's real tokens and hidden units (every rank's,
    where they split the part)."""
    if batch.whole is None:
        return F.mse_loss(activations, target)
    return F.mse_loss(activations, target, reduction="sum") / (batch.whole.tokens * activations.shape[-1])


def mean_norm(activations: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The activations' mean norm over the part's real tokens; where the ranks split the part,
    summed over all of them, so every rank steers toward the same point."""
    norms = activations.norm(dim=-1)
    if batch.whole is None:
        return norms.mean()
    summed = norms.sum()
    torch.distributed.all_reduce(summed)
    return summed / (batch.whole.tokens * torch.distributed.get_world_size())


class RmuTrainer(UnlearningTrainer):
    uses_reference = True
    forwards = 2

    @classmethod
    def forward_extent(cls, params: RmuParams, layers: int) -> tuple[int, bool]:
        return min(params.layer + 1, layers), False  # as layer_activations runs the model

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        hidden = self.model.config.hidden_size
        direction = torch.rand(hidden, generator=torch.Generator().manual_seed(self.params.seed))
        self.direction = direction / direction.norm()  # the same on every rank: same seed

    def loss(self, model: Any, step: Step) -> torch.Tensor:
        params = self.params
        forget = layer_activations(model, step.forget, params.layer)
        coefficient = params.steering_coeff
        if params.adaptive:
            with torch.no_grad():
                reference = layer_activations(self.reference, step.forget, params.layer)
                coefficient = params.steering_coeff * mean_norm(reference, step.forget)
        loss = activation_mse(forget, coefficient * self.direction.to(forget.device).expand_as(forget), step.forget)
        if params.alpha:
            retain = layer_activations(model, step.retain, params.layer)
            with torch.no_grad():
                frozen = layer_activations(self.reference, step.retain, params.layer)
            loss = loss + params.alpha * activation_mse(retain, frozen, step.retain)
        return loss


@register
class Rmu(LossMethod):
    name = "rmu"
    Params = RmuParams
    Trainer = RmuTrainer
