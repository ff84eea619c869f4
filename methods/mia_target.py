"""Calibrated forgetting (ours): raise each forget example's loss to the level the current
model gives documents it never saw, and no further.

The MIA score compares whole-document losses of members with those of nonmembers; plain
ascent drives member losses far past the nonmembers' (AUC near 0, over-forgetting) or stops
short of them (AUC near 1). Here each step measures the loss level of unseen documents under
the current model, on a batch of held-out documents (never the scored MIA set; see
corpus/mia.py: load_held_out), and pulls every forget example's mean token loss toward it
with a flooding objective |loss - target|: ascent below the level, descent above it, nothing
once it is reached. Losses are taken on entity tokens (names, dates, numbers, emails; the
extractor of methods/entities.py), of held-out documents and forget documents alike: what
tells a seen document from an unseen one of the same kind is its particulars, and leaving the
other tokens alone spares the phrasing the retain documents share. Sentence-completion rows
count as whole documents (prompt and continuation, as the MIA loss reads them), question rows
by their answer. Retain rows keep their cross-entropy."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from unlearn_sweep.corpus.tokens import right_padded
from unlearn_sweep.methods.entities import entity_token_labels
from unlearn_sweep.methods.registry import ParamError, register
from unlearn_sweep.methods.training import (
    Batch,
    Example,
    LossMethod,
    MicroBatch,
    Step,
    TrainingParams,
    UnlearningTrainer,
    encode_rows,
    mean_nll,
    row_mean,
    sequence_nll,
    truncated,
)


@dataclass
class MiaTargetParams(TrainingParams):
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    target_offset: float = 0.0  # nats added to the unseen documents' level (> 0 forgets more)
    retain_ratio: float = 1.0  # retain rows per forget row in each micro-batch (SUGD's positive ratio)
    calibration_batch: int = 8  # held-out documents measured per step (one no-grad forward)

    def check(self) -> None:
        super().check()
        if self.calibration_batch < 1 or not self.retain_ratio > 0:
            raise ParamError(
                f"calibration_batch={self.calibration_batch}, retain_ratio={self.retain_ratio}: "
                "calibration_batch must be at least 1 and retain_ratio positive"
            )


def encode_documents(tokenizer: Any, documents: list[str]) -> list[Example]:
    """Whole documents, labelled on their entity tokens."""
    return [entity_token_labels(tokenizer, document) for document in documents]


class MiaTargetTrainer(UnlearningTrainer):
    forwards = 2

    def __init__(self, *args: Any, held_out: list[Example], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.held_out = held_out

    @torch.no_grad()
    def target(self, model: Any) -> float:
        """The median document loss of this step's held-out batch under the current model (the
        same batch on every rank, so ranks agree): the level a member's loss should sit at for
        the attack to tell it from a nonmember no better than chance."""
        count, size = len(self.held_out), min(self.params.calibration_batch, len(self.held_out))
        start = self.state.global_step * self.params.calibration_batch
        batch = [self.held_out[(start + offset) % count] for offset in range(size)]
        device = next(model.parameters()).device
        total, counts = sequence_nll(model, Batch(*right_padded(batch, self.processing_class.pad_token_id, device)))
        return statistics.median((total / counts).tolist()) + self.params.target_offset

    def loss(self, model: Any, step: Step) -> torch.Tensor:
        total, counts = sequence_nll(model, step.forget)
        flood = row_mean((total / counts - self.target(model)).abs(), step.forget)
        return self.params.forget_weight * flood + self.params.retain_weight * mean_nll(model, step.retain)


@register
class MiaTarget(LossMethod):
    name = "mia_target"
    Params = MiaTargetParams
    Trainer = MiaTargetTrainer
    uses_held_out = True

    def encode(self, tokenizer: Any, task: Any, params: MiaTargetParams) -> tuple[list[Example], list[Example]]:
        documents = [row for row in task.forget if row.kind == "sc"]
        questions = [row for row in task.forget if row.kind != "sc"]
        forget = encode_documents(tokenizer, [f"{row.input} {row.output}" for row in documents])
        return forget + encode_rows(tokenizer, questions), encode_rows(tokenizer, task.retain)

    def epoch_plan(
        self, forget: list[Example], retain: list[Example], epoch: int, params: MiaTargetParams, rng: random.Random
    ) -> list[MicroBatch]:
        """A pass over the forget set in shuffled batches, each with retain_ratio x as many retain rows."""
        plan = super().epoch_plan(forget, [], epoch, params, rng)
        for micro in plan:
            micro.retain = [
                retain[rng.randrange(len(retain))]
                for _ in range(max(1, round(params.retain_ratio * len(micro.forget))))
            ]
        return plan

    def trainer_options(self, tokenizer: Any, task: Any, params: MiaTargetParams) -> dict[str, Any]:
        if not task.held_out:
            raise ParamError(
                "mia_target needs held-out documents the model never saw (a sweep's `held_out`, "
                "unlearn's --held-out; by default <mia>/held_out.jsonl or <mia>/validation/nonmember.jsonl)"
            )
        # cut as the forget examples are: the target is the loss of documents as long as those trained on
        return {"held_out": truncated(encode_documents(tokenizer, list(task.held_out)), params.max_length)}
