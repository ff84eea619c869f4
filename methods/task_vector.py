"""Task arithmetic (Ilharco et al. 2023): fine-tune on the forget set, take the task vector
tau = theta_ft - theta_base, and return theta_base - lambda * tau.

The negation is a streamed one-model merge of the saved checkpoints, tensor by tensor as
stored: a tied embedding is stored (and so moved) once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from unlearn_sweep.corpus.scratch import temporary_folder
from unlearn_sweep.methods.memory_plan import ModelShape
from unlearn_sweep.methods.merge import MergeParams, merge_checkpoints
from unlearn_sweep.methods.registry import Method, register
from unlearn_sweep.methods.training import (
    LossMethod,
    Step,
    TrainingParams,
    UnlearningTrainer,
    export_checkpoint,
    mean_nll,
)


@dataclass
class TaskVectorParams(TrainingParams):
    scale: float = 1.0  # lambda


class TaskVectorTrainer(UnlearningTrainer):
    def loss(self, model, step: Step) -> torch.Tensor:
        return mean_nll(model, step.forget)  # descent: learn the forget set harder


@register
class TaskVector(LossMethod):
    name = "task_vector"
    Params = TaskVectorParams
    Trainer = TaskVectorTrainer

    def export(self, trainer, tokenizer, out_dir: Path, params: TaskVectorParams, base_dir: Path) -> Path:
        with temporary_folder("finetuned-") as finetuned:
            export_checkpoint(
                trainer, tokenizer, Path(finetuned), dataclasses.replace(params, merge_adapter=True), base_dir
            )
            if trainer.is_world_process_zero():
                # base + (-lambda) * (finetuned - base)
                negated = MergeParams(models=finetuned, combination="task_arithmetic", weights=str(-params.scale))
                merge_checkpoints(base_dir, out_dir, negated)
        return out_dir

    def checkpoint_bytes(self, shape: ModelShape, params: TaskVectorParams) -> int:
        return Method.checkpoint_bytes(self, shape, params)  # the negation is a merge: the base's dtype

    def export_scratch_bytes(self, shape: ModelShape, params: TaskVectorParams) -> int:
        # the fine-tuned model, saved whole, until the negation is written
        return super().checkpoint_bytes(shape, dataclasses.replace(params, merge_adapter=True))
