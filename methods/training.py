"""Shared machinery of the gradient-based methods: model setup (full, LoRA, QLoRA, last k
layers), batching of task rows, the training loop with its per-epoch hook, and saving.

A method subclasses `LossMethod` and overrides `loss` (and, where its data order differs,
`steps`), the way TRL's trainers override only the loss."""

from __future__ import annotations

import copy
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from unlearn_sweep.corpus.semeval import TaskData, TaskRow
from unlearn_sweep.evaluation.inference import pick_device, right_padded, summed_token_nll
from unlearn_sweep.methods.optimization import make_stepper
from unlearn_sweep.methods.registry import EpochCallback, Method, ParamError

ADAPTERS = ("full", "lora", "qlora", "last_k")


@dataclass
class TrainingParams:
    """Hyperparameters every gradient-based method takes."""

    learning_rate: float = 1e-4
    epochs: int = 2
    batch_size: int = 16
    gradient_accumulation: int = 1
    max_length: int = 256
    seed: int = 0
    bf16: bool = False
    adapter: str = "full"  # full | lora | qlora | last_k
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    last_k_layers: int = 1
    merge_adapter: bool = True  # save LoRA merged into the weights, or as an adapter
    zero_stage: int = -1  # DeepSpeed ZeRO stage 0-3; -1 trains with plain torch
    zero_offload: bool = False  # DeepSpeed: optimizer state in CPU memory

    def check(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ParamError(f"adapter={self.adapter!r}: expected one of {', '.join(ADAPTERS)}")
        for name in ("epochs", "batch_size", "gradient_accumulation", "max_length", "lora_rank", "last_k_layers"):
            if getattr(self, name) < 1:
                raise ParamError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.zero_stage not in (-1, 0, 1, 2, 3):
            raise ParamError(f"zero_stage={self.zero_stage}: expected -1 (no DeepSpeed) or 0-3")
        if self.zero_stage < 0 and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ParamError("several workers train only under DeepSpeed: set zero_stage to 0-3")
        if self.zero_stage >= 0 and self.adapter == "qlora":
            raise ParamError("adapter='qlora' does not train under DeepSpeed here; use zero_stage=-1")
        if not self.learning_rate > 0:
            raise ParamError(f"learning_rate={self.learning_rate}: must be positive")


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 where no loss is taken (prompt, padding)
    factors: torch.Tensor | None = None  # per-sample loss factors, for methods that mix sets

    def shard(self, rank: int, world: int) -> "Batch":
        """This rank's rows (rank, rank + world, ...) for data-parallel training; a batch
        smaller than the world stays whole on every rank."""
        if len(self.input_ids) < world:
            return self
        rows = slice(rank, None, world)
        factors = self.factors[rows] if self.factors is not None else None
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.labels[rows], factors)


@dataclass
class Step:
    forget: Batch | None
    retain: Batch | None
    phase: str = "unlearn"

    def shard(self, rank: int, world: int) -> "Step":
        return Step(*(b.shard(rank, world) if b is not None else None for b in (self.forget, self.retain)), self.phase)


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows: list[TaskRow], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: the prompt, a space, the gold output and EOS; loss on the
    output and EOS only."""
    encoded = []
    for row in rows:
        prompt = tokenizer(row.input)["input_ids"]
        answer = tokenizer(" " + row.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        encoded.append((ids, labels))
    return encoded


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device,
            factors: list[float] | None = None) -> Batch:
    factor_tensor = torch.tensor(factors, dtype=torch.float32, device=device) if factors is not None else None
    return Batch(*right_padded(examples, pad_id, device), factor_tensor)


def sequence_nll(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL of the labelled tokens, and their counts."""
    return summed_token_nll(model, batch.input_ids, batch.attention_mask, batch.labels)


def mean_nll(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Token-averaged cross-entropy over the batch's labelled tokens."""
    total, counts = sequence_nll(model, batch)
    return total.sum() / counts.sum()


def retain_kl(model: PreTrainedModel, reference: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """KL(reference || model) of next-token distributions on the labelled retain tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    with torch.no_grad():
        reference_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    mask = batch.labels[:, 1:] != -100
    kl = F.kl_div(F.log_softmax(logits[mask], -1), F.log_softmax(reference_logits[mask], -1), log_target=True, reduction="batchmean")
    return kl


def load_for_training(model_dir: Path, params: TrainingParams) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model with only the parameters the chosen adapter trains left trainable."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if params.bf16 else torch.float32
    device = pick_device()
    if params.adapter == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=dtype, device_map={"": device})
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if params.adapter in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if params.adapter == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                            target_modules=params.lora_targets if params.lora_targets == "all-linear" else params.lora_targets.split(","),
                            task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    elif params.adapter == "last_k":
        layers = model.model.layers
        if params.last_k_layers > len(layers):
            raise ParamError(f"last_k_layers={params.last_k_layers}: the model has {len(layers)} layers")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for layer in layers[-params.last_k_layers :]:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
    return model, tokenizer


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    reference = copy.deepcopy(model).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return reference


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
                    merge_adapter: bool = True, base_dir: Path | None = None) -> Path:
    """A Hugging Face checkpoint (safetensors + tokenizer); LoRA merged in unless asked not to.
    A QLoRA adapter is merged into the full-precision base from base_dir, not into 4-bit weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and merge_adapter:
        if getattr(model.config, "quantization_config", None) is not None:
            from peft import PeftModel

            with tempfile.TemporaryDirectory() as adapter_dir:
                model.save_pretrained(adapter_dir)
                full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
                model = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
        else:
            model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


class LossMethod(Method):
    """A method defined by its loss on a (forget, retain) step; the loop is shared."""

    Params = TrainingParams
    uses_reference = False

    def loss(self, model: PreTrainedModel, step: Step, reference: PreTrainedModel | None, params: Any) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, tokenizer: PreTrainedTokenizerBase, task: TaskData, params: Any) -> tuple[list, list]:
        """(input ids, labels) of the forget and retain rows."""
        return encode_rows(tokenizer, task.forget, params.max_length), encode_rows(tokenizer, task.retain, params.max_length)

    def epochs(self, params: Any) -> int:
        return params.epochs

    def steps(self, forget: list, retain: list, epoch: int, params: Any, rng: random.Random,
              pad_id: int, device: torch.device) -> Iterator[Step]:
        """One epoch: a pass over the forget set in shuffled batches, each with a retain batch."""
        forget_order = rng.sample(range(len(forget)), len(forget))
        retain_order = [rng.randrange(len(retain)) for _ in forget_order] if retain else []
        for start in range(0, len(forget_order), params.batch_size):
            forget_batch = collate([forget[i] for i in forget_order[start : start + params.batch_size]], pad_id, device)
            retain_batch = collate([retain[i] for i in retain_order[start : start + params.batch_size]], pad_id, device) if retain else None
            yield Step(forget_batch, retain_batch)

    def run(self, model_dir: Path, task: TaskData, out_dir: Path | None, params: Any, on_epoch: EpochCallback | None = None) -> Path | None:
        model, tokenizer = self.train(model_dir, task, params, on_epoch)
        return save_checkpoint(model, tokenizer, out_dir, params.merge_adapter, model_dir) if out_dir else None

    def train(self, model_dir: Path, task: TaskData, params: Any, on_epoch: EpochCallback | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        torch.manual_seed(params.seed)
        rng = random.Random(params.seed)
        model, tokenizer = load_for_training(model_dir, params)
        reference = frozen_copy(model) if self.uses_reference else None
        forget, retain = self.encode(tokenizer, task, params)
        device = model.device
        stepper = make_stepper(model, params)
        # Under several ranks (DeepSpeed), every rank draws the same batches and trains on its share.
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        for epoch in range(1, self.epochs(params) + 1):
            stepper.model.train()
            steps = [step.shard(rank, world) for step in self.steps(forget, retain, epoch, params, rng, tokenizer.pad_token_id, device)]
            for index, step in enumerate(steps, start=1):
                loss = self.loss(stepper.model, step, reference, params)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.name}: loss became {loss.item()} in epoch {epoch}")
                stepper.micro_step(loss, index % params.gradient_accumulation == 0 or index == len(steps))
            stepper.model.eval()
            if on_epoch is not None and on_epoch(epoch, stepper.consolidated(), tokenizer) is False:
                break
        return stepper.consolidated(), tokenizer
