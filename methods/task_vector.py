"""Task arithmetic (Ilharco et al. 2023): fine-tune a copy on the forget set, take the task
vector tau = theta_ft - theta_base, and return theta_base - lambda * tau."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn_sweep.corpus.semeval import TaskData
from unlearn_sweep.methods.registry import EpochCallback, register
from unlearn_sweep.methods.training import LossMethod, Step, TrainingParams, frozen_copy, mean_nll, save_checkpoint


@dataclass
class TaskVectorParams(TrainingParams):
    scale: float = 1.0  # lambda


def negate(base: torch.nn.Module, finetuned: torch.nn.Module, scale: float) -> torch.nn.Module:
    """A copy of base moved by -scale times (finetuned - base), tensor by tensor."""
    result = frozen_copy(base)
    finetuned_state = finetuned.state_dict()
    with torch.no_grad():
        for name, tensor in result.state_dict().items():
            if tensor.is_floating_point():
                tensor.sub_(scale * (finetuned_state[name].to(device=tensor.device, dtype=tensor.dtype) - tensor))
    return result


@register
class TaskVector(LossMethod):
    name = "task_vector"
    Params = TaskVectorParams

    def loss(self, model, step: Step, reference, params) -> torch.Tensor:
        return mean_nll(model, step.forget)  # descent: learn the forget set harder

    def run(self, model_dir: Path, task: TaskData, out_dir: Path | None, params: TaskVectorParams,
            on_epoch: EpochCallback | None = None) -> Path | None:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if params.bf16 else torch.float32)

        def full_weights(model):
            return model.merge_and_unload() if hasattr(model, "peft_config") else model

        def report_negated(epoch, model, tokenizer):
            return on_epoch(epoch, negate(base, full_weights(copy.deepcopy(model)), params.scale).to(model.device), tokenizer)

        model, tokenizer = self.train(model_dir, task, params, report_negated if on_epoch else None)
        if out_dir is None:
            return None
        return save_checkpoint(negate(base, full_weights(model).cpu(), params.scale), tokenizer, out_dir)
