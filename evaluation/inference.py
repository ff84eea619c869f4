"""Batched model passes that produce the scoring records: greedy generation, answer NLL,
whole-document loss and MMLU letter choice. Rows are length-sorted into batches (less
padding) and results returned in input order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from unlearn_sweep.corpus.checkpoints import DTYPES, check_checkpoint
from unlearn_sweep.corpus.mmlu import LETTERS
from unlearn_sweep.corpus.tokens import labelled_counts, right_padded, summed_token_nll
from unlearn_sweep.evaluation.options import LOGIT_ELEMENTS, PLAIN_HEAD_MODELS, TOKENS_PER_ROW, EvalOptions


def pick_device() -> torch.device:
    """From what torch sees, never from a scheduler's GPU ids."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    model_dir: str | Path, device: torch.device | None = None, dtype: str = "bfloat16"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local Hugging Face causal LM in `dtype` (bfloat16 by default: the organizers' script
    loaded every model so), in eval mode, pad token = eos."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_checkpoint(model_dir)
    device = device or pick_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = (
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
        .to(device)
        .eval()
    )
    return model, tokenizer


def open_model(model_dir: str | Path, options: EvalOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The backend interface's loader (evaluator.InferenceBackend): the model in the options' dtype."""
    return load_model(model_dir, dtype=options.dtype)


def release(model: PreTrainedModel) -> None:
    """The backend interface's release: nothing to do. An HF model's memory goes with its last
    reference (the caller's), and the allocator's cached blocks serve the next checkpoint."""


def _batches(lengths: Sequence[int], batch_size: int, label: str) -> list[list[int]]:
    """Indices grouped longest first, so a batch holds rows of similar length, each batch
    within the row and token bounds above (a row over the token bound alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_size * TOKENS_PER_ROW
    groups: list[list[int]] = []
    for index in order:
        group = groups[-1] if groups else None
        # Sorted longest first: a group's first row sets its padded width.
        if group is None or len(group) == batch_size or (len(group) + 1) * lengths[group[0]] > budget:
            groups.append([index])
        else:
            group.append(index)
    return tqdm(groups, desc=label, disable=None, leave=False)


def _in_order(count: int, batched: Callable[[list[int]], list], groups: list[list[int]]) -> list:
    results: list = [None] * count
    for group in groups:
        for index, value in zip(group, batched(group), strict=True):
            results[index] = value
    return results


def _left_padded(encoded: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(map(len, encoded))
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 32,
    max_new_tokens: int = 256,
) -> list[str]:
    """Greedy continuations of each prompt as given (no chat template), new tokens only,
    special tokens skipped. Left padding with its attention mask keeps each row's output
    the same as generating it alone."""
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]

    def batched(group: list[int]) -> list[str]:
        inputs = _left_padded([encoded[i] for i in group], tokenizer.pad_token_id, model.device)
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
        )
        return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    lengths = [len(e) + max_new_tokens for e in encoded]  # the KV cache holds prompt and new tokens
    return _in_order(len(prompts), batched, _batches(lengths, batch_size, "generate"))


def _mean_token_nll(
    model: PreTrainedModel, sequences: list[list[int]], scored_from: list[int], pad_id: int
) -> list[float]:
    """Mean cross-entropy of tokens[scored_from:] given what precedes them, per sequence."""
    examples = [(ids, [-100] * start + ids[start:]) for ids, start in zip(sequences, scored_from, strict=True)]
    batch = right_padded(examples, pad_id, model.device)
    if model.config.model_type in PLAIN_HEAD_MODELS:
        total, counts = chunked_token_nll(model, *batch)
    else:
        total, counts = summed_token_nll(model, *batch)
    return (total / counts).tolist()


def chunked_token_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`summed_token_nll` with the output layer applied a slice of positions at a time: at most
    LOGIT_ELEMENTS logits exist at once (for a plain-head model: the same values)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head = model.get_output_embeddings()
    rows, width = input_ids.shape
    step = max(1, LOGIT_ELEMENTS // (rows * head.out_features))
    total = torch.zeros(rows, device=hidden.device)
    for start in range(0, width - 1, step):
        logits = head(hidden[:, start : start + step]).float()
        targets = labels[:, start + 1 : start + 1 + step]
        total += torch.nn.functional.cross_entropy(
            logits[:, : targets.shape[1]].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        ).sum(dim=1)
    return total, labelled_counts(labels)


@torch.inference_mode()
def answer_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
) -> list[float]:
    """Mean NLL of each gold answer's tokens after its prompt (joined by a space)."""
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    sequences = [
        p + tokenizer(" " + a, add_special_tokens=False)["input_ids"] for p, a in zip(prompt_ids, answers, strict=True)
    ]
    limit = _context_length(model)
    sequences = [s[:limit] for s in sequences]

    def batched(group: list[int]) -> list[float]:
        return _mean_token_nll(
            model, [sequences[i] for i in group], [len(prompt_ids[i]) for i in group], tokenizer.pad_token_id
        )

    return _in_order(len(prompts), batched, _batches([len(s) for s in sequences], batch_size, "answer nll"))


@torch.inference_mode()
def document_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """Mean token cross-entropy of each whole document (labels = input ids, nothing masked),
    truncated only to the model's context."""
    limit = _context_length(model)
    sequences = [tokenizer(document)["input_ids"][:limit] for document in documents]

    def batched(group: list[int]) -> list[float]:
        return _mean_token_nll(model, [sequences[i] for i in group], [0] * len(group), tokenizer.pad_token_id)

    return _in_order(len(documents), batched, _batches([len(s) for s in sequences], batch_size, "mia loss"))


def letter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids compared after 'Answer:': the last token of ' A' .. ' D', as Open-Instruct takes them."""
    ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in LETTERS]
    if len(set(ids)) != 4:
        raise ValueError("the tokenizer does not tell the answer letters A-D apart by their first token")
    return ids


@torch.inference_mode()
def choose_letters(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 16,
) -> list[int]:
    """Index of the most probable answer letter after each prompt."""
    letters = torch.tensor(letter_token_ids(tokenizer), device=model.device)
    limit = _context_length(model)
    encoded = [tokenizer(prompt)["input_ids"][-limit:] for prompt in prompts]

    def batched(group: list[int]) -> list[int]:
        inputs = _left_padded([encoded[i] for i in group], tokenizer.pad_token_id, model.device)
        # Positions counted from each row's first real token, as if it were unpadded.
        positions = (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
        logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1, :]  # the next token's only
        return logits[:, letters].argmax(dim=1).tolist()

    return _in_order(len(prompts), batched, _batches([len(e) for e in encoded], batch_size, "mmlu"))


def _context_length(model: PreTrainedModel) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 2048
