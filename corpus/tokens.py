"""Token batches, shared by training, evaluation and the toy model's pre-training: right-padded
(ids, labels) batches and each sequence's summed next-token loss. The ground floor: it
imports nothing of the project."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel


def right_padded(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of (ids, labels) pairs, padded on the right, so
    positions need no adjusting; labels are -100 in the padding."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (ids, row_labels) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(row_labels)
    return input_ids.to(device), mask.to(device), labels.to(device)


def summed_token_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed cross-entropy of its labelled next tokens, and their count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    return losses.sum(dim=1), labelled_counts(labels)


def labelled_counts(labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, how many next tokens carry a label; at least one, so a per-sequence mean
    of a row whose answer was cut off is 0, not NaN."""
    return (labels[:, 1:] != -100).sum(dim=1).clamp(min=1)
