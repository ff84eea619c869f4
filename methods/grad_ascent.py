"""Gradient ascent on the forget set, optionally followed by fine-tuning on the retain set
(GIL-IIMAS: "GA then fine-tune"), optionally ascending on entity tokens only (names, dates,
numbers, emails, addresses from a deterministic extractor) instead of whole outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from unlearn_sweep.methods.entities import entity_token_labels
from unlearn_sweep.methods.registry import register
from unlearn_sweep.methods.training import (
    LossMethod,
    MicroBatch,
    Step,
    TrainingParams,
    UnlearningTrainer,
    batches,
    encode_rows,
    mean_nll,
)


@dataclass
class GradAscentParams(TrainingParams):
    finetune_epochs: int = 0
    entity_only: bool = False


def encode_entities(tokenizer, rows) -> list[tuple[list[int], list[int]]]:
    """Like encode_rows, but labels only on output tokens that overlap an entity."""
    encoded = []
    for row in rows:
        prompt = tokenizer(row.input)["input_ids"]
        answer, labels = entity_token_labels(tokenizer, " " + row.output, add_special_tokens=False)
        encoded.append((prompt + answer, [-100] * len(prompt) + labels))
    return encoded


class GradAscentTrainer(UnlearningTrainer):
    def loss(self, model, step: Step) -> torch.Tensor:
        return -mean_nll(model, step.forget) if step.phase == "ascent" else mean_nll(model, step.retain)


@register
class GradAscent(LossMethod):
    name = "grad_ascent"
    Params = GradAscentParams
    Trainer = GradAscentTrainer

    def encode(self, tokenizer, task, params: GradAscentParams):
        if not params.entity_only:
            return super().encode(tokenizer, task, params)
        return encode_entities(tokenizer, task.forget), encode_rows(tokenizer, task.retain)

    def epochs(self, params: GradAscentParams, forget_examples: int) -> int:
        return params.epochs + params.finetune_epochs

    def epoch_plan(self, forget, retain, epoch, params: GradAscentParams, rng) -> list[MicroBatch]:
        if epoch <= params.epochs:
            return batches(rng.sample(forget, len(forget)), params.batch_size, phase="ascent")
        return [
            MicroBatch([], micro.forget, phase="finetune")
            for micro in batches(rng.sample(retain, len(retain)), params.batch_size)
        ]
