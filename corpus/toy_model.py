"""The miniature task's base model: a byte-level BPE tokenizer and a tiny OLMo-2, trained
on the toy task until it has memorised it. No download: both are built here from scratch."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Olmo2Config, Olmo2ForCausalLM, PreTrainedTokenizerFast

from unlearn_sweep.corpus.tokens import right_padded

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 1024


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so that decoding gives back spaces and punctuation exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Olmo2ForCausalLM:
    """About a million parameters; 512 positions leave room for 5-shot MMLU prompts."""
    torch.manual_seed(seed)
    config = Olmo2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,  # as OLMo-1B: every test covers the tied path
    )
    return Olmo2ForCausalLM(config)


def train_to_memorise(
    model: Olmo2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    seed: int,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 4e-3,
    log_every: int = 0,
) -> float:
    """Causal-LM training on every text followed by EOS (so the model learns where an
    answer ends); returns the last step's loss."""
    rng = random.Random(seed)
    encoded = [tokenizer(text + EOS_TOKEN)["input_ids"] for text in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    model.train()
    order: list[int] = []
    loss_value = float("nan")
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        input_ids, attention_mask, labels = right_padded([(ids, ids) for ids in batch], tokenizer.pad_token_id, model.device)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}  loss {loss_value:.4f}", flush=True)
    model.eval()
    return loss_value


def train_base_model(texts: list[str], out_dir: Path, seed: int, steps: int, log_every: int = 0) -> float:
    """Tokenizer, model and training in one: saves a Hugging Face checkpoint to out_dir and
    returns the final training loss. Two threads at most, for the same result on any machine
    with at least two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        tokenizer = train_tokenizer(texts)
        model = build_model(tokenizer, seed)
        loss = train_to_memorise(model, tokenizer, texts, seed, steps, log_every=log_every)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return loss
