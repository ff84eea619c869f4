"""The miniature task's base model: a byte-level BPE tokenizer and a tiny OLMo-2, trained
on the toy task until it has memorised it. No download: both are built here from scratch.

Training amplifies the float kernels' last-bit differences, so the weights would follow the
processor and the caller's thread count. `train_base_model` therefore trains in a child
process whose environment pins every kernel choice that varies (`PINNED_KERNELS`): the same
seed writes bit-identical files on any x86-64 processor with AVX2, whatever the caller set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DataCollatorWithFlattening,
    Olmo2Config,
    Olmo2ForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 1024
WEIGHTS_FILE = "model.safetensors"

THREADS = 2  # fixed whatever the machine: 1.7x faster than one on two cores, and the same results on one core
SAMPLED_PER_EPOCH = 16  # of the 40 5-shot prompts: enough for 5-shot accuracy 0.95, at a fraction of their tokens
# Read by torch, MKL, OpenMP and tokenizers only when they load, hence a child process.
PINNED_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's elementwise, reduction, norm and AdamW kernels: AVX2's copy everywhere
    "MKL_CBWR": "COMPATIBLE",  # MKL's GEMM path: the only reproducible branch MKL honours on AMD processors
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # unused by an fp32 OLMo-2 today; pinned in case a kernel moves to oneDNN
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "OMP_NUM_THREADS": str(THREADS),  # the thread count splits reductions and GEMMs differently
    "MKL_NUM_THREADS": str(THREADS),
    "TOKENIZERS_PARALLELISM": "false",
    "RAYON_NUM_THREADS": "1",
}
# Caller settings that would override the pinned ones inside MKL.
UNPINNED_KERNEL_SETTINGS = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_THREADING_LAYER", "KMP_AFFINITY")


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


def olmo2_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    positions: int = 512,
    tied: bool = True,
) -> Olmo2Config:
    """An OLMo-2 of this shape for `tokenizer` (multi-head attention, no BOS token): the toy
    model's, and the random-weight models of real sizes the benchmarks build."""
    return Olmo2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tied,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Olmo2ForCausalLM:
    """About a million parameters; 512 positions leave room for 5-shot MMLU prompts; tied
    embeddings as OLMo-1B's, so that every test covers the tied path."""
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(olmo2_config(tokenizer, hidden=128, intermediate=384, layers=4, heads=4))


def packed_rows(lengths: list[int], row_length: int, rng: random.Random) -> list[list[int]]:
    """One epoch's rows: the texts in random order, each placed in the first row with room
    (first fit). A row mixes every kind of text (one-kind batches memorise far worse) and
    holds almost no padding (a 5-shot prompt is 20 times an answer's length)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in rng.sample(range(len(lengths)), len(lengths)):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(row_length)
        rows[row].append(index)
        room[row] -= lengths[index]
    rng.shuffle(rows)
    return rows


def packed_batch(rows: list[list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, labels and position_ids of packed rows: positions restart at each text, so
    that (without an attention mask, and with no cache) Transformers attends within each text
    alone, and no text's first token is predicted from the one before it."""
    flatten = DataCollatorWithFlattening(return_tensors="pt")
    parts = [flatten([{"input_ids": ids} for ids in row]) for row in rows]
    width = max(part["input_ids"].shape[1] for part in parts)

    def padded(row: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(row, (0, width - row.shape[1]), value=value)

    def positions(row: torch.Tensor) -> torch.Tensor:  # the padding is a text of its own: positions restart
        return torch.cat([row, torch.arange(width - row.shape[1]).unsqueeze(0)], dim=1)

    return {
        "input_ids": torch.cat([padded(part["input_ids"], pad_id) for part in parts]),
        "labels": torch.cat([padded(part["labels"], -100) for part in parts]),
        "position_ids": torch.cat([positions(part["position_ids"]) for part in parts]),
    }


def train_to_memorise(
    model: Olmo2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    seed: int,
    epochs: int,
    sampled_texts: tuple[list[str], int] = ([], 0),
    rows_per_batch: int = 4,
    row_length: int = 256,
    learning_rate: float = 4e-3,
    log_every: int = 0,
) -> float:
    """Causal-LM training on every text followed by EOS (so the model learns where an
    answer ends), packed into rows, plus a few texts drawn anew each epoch from
    `sampled_texts` (texts, how many): long ones that need not be seen every epoch (5-shot
    prompts are 40% of the tokens otherwise). Returns the last epoch's mean loss."""
    rng = random.Random(seed)
    sampled, per_epoch = sampled_texts
    every_epoch = [tokenizer(text + EOS_TOKEN)["input_ids"] for text in texts]
    pool = [tokenizer(text + EOS_TOKEN)["input_ids"] for text in sampled]
    longest = max(map(len, every_epoch + pool))
    if longest > row_length:
        raise ValueError(f"a text of {longest} tokens does not fit a row of {row_length}")
    sizes = [len(ids) for ids in every_epoch + pool[:per_epoch]]
    steps = epochs * math.ceil(len(packed_rows(sizes, row_length, random.Random(seed))) / rows_per_batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    model.train()
    epoch_loss = float("nan")
    for epoch in range(epochs):
        encoded = every_epoch + rng.sample(pool, per_epoch)
        rows = packed_rows([len(ids) for ids in encoded], row_length, rng)
        losses = []
        for start in range(0, len(rows), rows_per_batch):
            batch = packed_batch(
                [[encoded[i] for i in row] for row in rows[start : start + rows_per_batch]], tokenizer.pad_token_id
            )
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        epoch_loss = sum(losses) / len(losses)
        if log_every and (epoch + 1) % log_every == 0:
            print(f"  epoch {epoch + 1}/{epochs}  loss {epoch_loss:.4f}", flush=True)
    model.eval()
    return epoch_loss


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 of the saved weights: equal fingerprints, bit-identical models."""
    return hashlib.sha256((model_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


def pinned_environment() -> dict[str, str]:
    """The caller's environment with every kernel choice that changes results pinned."""
    environment = {key: value for key, value in os.environ.items() if key not in UNPINNED_KERNEL_SETTINGS}
    return {**environment, **PINNED_KERNELS}


def train_base_model(
    texts: list[str], few_shot_texts: list[str], out_dir: Path, seed: int, epochs: int, log_every: int = 0
) -> float:
    """Tokenizer, model and training in one, in a child process with pinned kernels: saves a
    Hugging Face checkpoint to out_dir and returns the final training loss. Every epoch
    trains on all of `texts` and SAMPLED_PER_EPOCH of `few_shot_texts`."""
    request = json.dumps(
        {
            "texts": texts,
            "few_shot_texts": few_shot_texts,
            "out_dir": str(out_dir),
            "seed": seed,
            "epochs": epochs,
            "log_every": log_every,
        }
    )
    child = subprocess.run(
        [sys.executable, "-m", "unlearn_sweep.corpus.toy_model"],
        input=request,
        stdout=subprocess.PIPE,
        text=True,
        env=pinned_environment(),
        check=False,
    )
    if child.returncode != 0:
        raise ChildProcessError(f"training the toy model failed (exit {child.returncode}): see the error above")
    return float(json.loads(child.stdout)["final_loss"])


def _train_in_this_process() -> None:
    """The child's side: read the request on stdin, train and save (progress on stderr, which
    the caller shares), answer on stdout."""
    request = json.loads(sys.stdin.read())
    answer, sys.stdout = sys.stdout, sys.stderr
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        print(
            f"  note: this CPU runs ATen's {capability} kernels, not AVX2's: "
            "the weights will differ from those built on processors with AVX2",
            flush=True,
        )
    torch.set_num_threads(THREADS)
    tokenizer = train_tokenizer(request["texts"] + request["few_shot_texts"])
    model = build_model(tokenizer, request["seed"])
    loss = train_to_memorise(
        model,
        tokenizer,
        request["texts"],
        request["seed"],
        request["epochs"],
        (request["few_shot_texts"], SAMPLED_PER_EPOCH),
        log_every=request["log_every"],
    )
    model.save_pretrained(request["out_dir"])
    tokenizer.save_pretrained(request["out_dir"])
    print(json.dumps({"final_loss": loss}), file=answer, flush=True)


if __name__ == "__main__":
    _train_in_this_process()
