"""The training engine of the gradient-based methods: a `transformers.Trainer` subclass per
method (the pattern of TRL and open-unlearning) that overrides only the loss, with DeepSpeed
through the Trainer's own integration.

What the Trainer gives: ZeRO-2/3 with optional CPU offload, `zero.Init` loading under
ZeRO-3 (the TrainingArguments exist before the model is loaded), bf16 mixed precision with
fp32 master weights, gradient accumulation, gradient checkpointing, and the 16-bit
consolidated save under ZeRO-3. What this module adds: the run's data plan (each method
decides which forget/retain examples form each micro-batch of each logical epoch), the
reference model (the base through `disable_adapter()` under LoRA; otherwise a frozen copy,
partitioned by DeepSpeed like TRL's `prepare_deepspeed`), and a per-epoch export of the
checkpoint that the epoch hook scores, so the model scored is the model saved."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import random
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from unlearn_sweep.corpus.checkpoints import check_checkpoint
from unlearn_sweep.corpus.compat import one_gpu_per_process, reset_accelerate_state, without_hf_deepspeed_config
from unlearn_sweep.corpus.scratch import temporary_folder
from unlearn_sweep.corpus.semeval import TaskData, TaskRow
from unlearn_sweep.corpus.staging import as_if_created_plainly
from unlearn_sweep.corpus.tokens import labelled_counts, right_padded, summed_token_nll
from unlearn_sweep.methods.memory_plan import ModelShape, trainable_parameters
from unlearn_sweep.methods.registry import EpochCallback, Method, ParamError

ADAPTERS = ("full", "lora", "qlora", "last_k")
Example = tuple[list[int], list[int]]  # (input ids, labels with -100 where no loss is taken)

log = logging.getLogger(__name__)


@dataclass
class TrainingParams:
    """Hyperparameters every gradient-based method takes."""

    learning_rate: float = 1e-4
    epochs: int = 2
    batch_size: int = 16  # global: split across the workers of a multi-worker trial
    gradient_accumulation: int = 1
    # tokens per example: longer ones lose their ends (a sweep refuses a cap that cuts its data);
    # OLMo's tokenizer makes the longest LUME rows about 400
    max_length: int = 512
    seed: int = 0
    # bf16 mixed precision (the optimizer keeps fp32 master weights); None: bf16 with TF32
    # matmuls on a GPU with bf16 units (Ampere or newer), fp32 elsewhere (see `bf16_device`)
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    adapter: str = "full"  # full | lora | qlora | last_k
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    last_k_layers: int = 1
    merge_adapter: bool = True  # save LoRA merged into the weights, or as an adapter
    zero_stage: int = -1  # DeepSpeed ZeRO stage 0-3; -1 trains without DeepSpeed
    zero_offload: bool = False  # DeepSpeed: optimizer state in CPU memory

    def check(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ParamError(f"adapter={self.adapter!r}: expected one of {', '.join(ADAPTERS)}")
        for name in ("epochs", "batch_size", "gradient_accumulation", "max_length", "lora_rank", "last_k_layers"):
            if getattr(self, name) < 1:
                raise ParamError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.zero_stage not in (-1, 0, 1, 2, 3):
            raise ParamError(f"zero_stage={self.zero_stage}: expected -1 (no DeepSpeed) or 0-3")
        if self.zero_stage < 0 and world_size() > 1:
            raise ParamError("several workers train only under DeepSpeed: set zero_stage to 0-3")
        if self.zero_stage == 3 and self.adapter == "qlora":
            raise ParamError(
                "adapter='qlora' does not train under ZeRO-3 (4-bit weights cannot be partitioned); use "
                "zero_stage 0-2 or -1"
            )
        if self.adapter == "qlora" and self.zero_stage >= 0 and self.bf16 is not False:
            # DeepSpeed's bf16 engine casts the whole model to bf16 after peft has upcast the norms,
            # embeddings and adapters to fp32: numerics and memory neither peft nor the plan assume.
            raise ParamError(
                "adapter='qlora' under DeepSpeed runs only with bf16 false (its bf16 engine would cast the fp32 "
                "norms and adapters to bf16); or train QLoRA without DeepSpeed (zero_stage -1, one worker)"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ParamError(f"learning_rate={self.learning_rate}: must be a positive number")


def bf16_device() -> bool:
    """Whether this process trains on a GPU with bf16 units (what `bf16: None` decides on);
    a CPU trains in fp32: its bf16 arithmetic is slow without bf16 units and differs with them."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def world_size() -> int:
    return (
        torch.distributed.get_world_size()
        if torch.distributed.is_initialized()
        else int(os.environ.get("WORLD_SIZE", "1"))
    )


@dataclass(frozen=True)
class WholePart:
    """The counts of a forget or retain part of one micro-batch that the ranks split between
    them, each divided by the world size. A rank divides its sums by these instead of by its
    own counts, so the mean of the ranks' losses (what averaging their gradients takes) is the
    whole part's mean: the update one process makes, however the rows and their tokens fall
    to the ranks."""

    rows: float
    labelled_tokens: float  # as `labelled_counts` counts them: at least one per row
    tokens: float  # real (non-padding) tokens

    @classmethod
    def of(cls, examples: list[Example], world: int) -> WholePart:
        labelled = sum(max(1, sum(label != -100 for label in labels[1:])) for _, labels in examples)
        return cls(len(examples) / world, labelled / world, sum(len(ids) for ids, _ in examples) / world)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 where no loss is taken (prompt, padding)
    factors: torch.Tensor | None = None  # per-sample loss factors, for methods that mix sets
    whole: WholePart | None = None  # None: this rank holds the whole part (one process, or fewer rows than ranks)


@dataclass
class Step:
    """What a method's loss sees: this rank's forget and retain batches of one micro-batch."""

    forget: Batch | None
    retain: Batch | None
    phase: str = "unlearn"


@dataclass
class MicroBatch:
    """One micro-batch of the run's plan, as examples (tensors are made per rank).

    `weight` keeps accumulation exact at epoch ends: every logical epoch ends on an optimizer
    step, so a short last group is filled with weight-0 copies and its real micro-batches
    weighted up, giving the mean over the micro-batches it really has."""

    forget: list[Example]
    retain: list[Example] = dataclasses.field(default_factory=list)
    factors: list[float] | None = None  # one per forget example
    phase: str = "unlearn"
    weight: float = 1.0
    forget_whole: WholePart | None = None  # set by `shard` where the ranks split the part
    retain_whole: WholePart | None = None

    def shard(self, rank: int, world: int) -> MicroBatch:
        """This rank's rows (rank, rank + world, ...) of each part, with the whole part's
        counts; a part smaller than the world stays whole on every rank, so every rank has a
        batch to run."""

        def split(part: list) -> bool:
            return len(part) >= world > 1

        def rows(items: list, part: list) -> list:
            return items[rank::world] if split(part) else items

        return dataclasses.replace(
            self,
            forget=rows(self.forget, self.forget),
            retain=rows(self.retain, self.retain),
            factors=None if self.factors is None else rows(self.factors, self.forget),
            forget_whole=WholePart.of(self.forget, world) if split(self.forget) else None,
            retain_whole=WholePart.of(self.retain, world) if split(self.retain) else None,
        )


def encode_rows(tokenizer: PreTrainedTokenizerBase, rows: list[TaskRow]) -> list[Example]:
    """(input ids, labels) per row, whole: the prompt, a space, the gold output and EOS; loss on
    the output and EOS only."""
    encoded = []
    for row in rows:
        prompt = tokenizer(row.input)["input_ids"]
        answer = tokenizer(" " + row.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt + answer, [-100] * len(prompt) + answer))
    return encoded


def truncated(examples: list[Example], max_length: int) -> list[Example]:
    """Each example's first max_length tokens."""
    return [(ids[:max_length], labels[:max_length]) for ids, labels in examples]


@dataclass(frozen=True)
class LengthCut:
    """The examples a method trains on against its length cap."""

    max_length: int
    examples: int
    cut: int  # examples longer than max_length: their last tokens, the end of the answer, go untrained
    longest: int  # tokens

    def __str__(self) -> str:
        return (
            f"max_length {self.max_length} cuts {self.cut} of the {self.examples} forget and retain examples "
            f"(the longest is {self.longest} tokens)"
        )


def batches(examples: list[Example], batch_size: int, **fields: Any) -> list[MicroBatch]:
    """Consecutive forget micro-batches of batch_size examples."""
    return [MicroBatch(examples[start : start + batch_size], **fields) for start in range(0, len(examples), batch_size)]


def schedule(epochs: list[list[MicroBatch]], accumulation: int) -> tuple[list[MicroBatch], list[int]]:
    """The whole run as one sequence of micro-batches whose accumulation groups never span
    two logical epochs, and the optimizer step at which each epoch ends."""
    sequence: list[MicroBatch] = []
    ends = []
    for plan in epochs:
        full, rest = divmod(len(plan), accumulation)
        for index, micro in enumerate(plan):
            sequence.append(
                dataclasses.replace(micro, weight=accumulation / rest) if index >= full * accumulation else micro
            )
        if rest:
            sequence.extend(dataclasses.replace(plan[-1], weight=0.0) for _ in range(accumulation - rest))
        ends.append(len(sequence) // accumulation)
    return sequence, ends


def _tensors(prefix: str, examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    if not examples:
        return {}
    input_ids, attention_mask, labels = right_padded(examples, pad_id, torch.device("cpu"))
    return {f"{prefix}_input_ids": input_ids, f"{prefix}_attention_mask": attention_mask, f"{prefix}_labels": labels}


def collate(micro: MicroBatch, pad_id: int) -> dict[str, Any]:
    """A rank's share of a micro-batch as the Trainer's inputs: each part's tensors, and what
    its loss reads besides (factors, the parts' whole counts, phase, accumulation weight)."""
    inputs: dict[str, Any] = {**_tensors("forget", micro.forget, pad_id), **_tensors("retain", micro.retain, pad_id)}
    if micro.factors is not None:
        inputs["factors"] = torch.tensor(micro.factors, dtype=torch.float32)
    wholes = {"forget_whole": micro.forget_whole, "retain_whole": micro.retain_whole}
    return {**inputs, **wholes, "phase": micro.phase, "weight": micro.weight}


def step_of(inputs: dict[str, Any]) -> Step:
    """The collated inputs (on the device) as a method's loss sees them."""

    def batch(prefix: str) -> Batch | None:
        if f"{prefix}_input_ids" not in inputs:
            return None
        return Batch(
            inputs[f"{prefix}_input_ids"],
            inputs[f"{prefix}_attention_mask"],
            inputs[f"{prefix}_labels"],
            inputs.get("factors") if prefix == "forget" else None,
            inputs[f"{prefix}_whole"],
        )

    return Step(batch("forget"), batch("retain"), inputs["phase"])


def sequence_nll(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed NLL of the labelled tokens, and their counts."""
    return summed_token_nll(model, batch.input_ids, batch.attention_mask, batch.labels)


def row_mean(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The mean of per-row values over the part's rows (every rank's, where they split it)."""
    return values.mean() if batch.whole is None else values.sum() / batch.whole.rows


def labelled_token_mean(summed: torch.Tensor, counts: torch.Tensor, batch: Batch) -> torch.Tensor:
    """A sum over the batch's labelled tokens, as a mean over the part's labelled tokens."""
    return summed / (counts.sum() if batch.whole is None else batch.whole.labelled_tokens)


def mean_nll(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Token-averaged cross-entropy over the batch's labelled tokens."""
    total, counts = sequence_nll(model, batch)
    return labelled_token_mean(total.sum(), counts, batch)


def retain_kl(model: PreTrainedModel, reference: Any, batch: Batch) -> torch.Tensor:
    """KL(reference || model) of next-token distributions on the labelled retain tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    with torch.no_grad():
        reference_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[
            :, :-1
        ]
    mask = batch.labels[:, 1:] != -100
    summed = F.kl_div(
        F.log_softmax(logits[mask], -1), F.log_softmax(reference_logits[mask], -1), log_target=True, reduction="sum"
    )
    return labelled_token_mean(summed, labelled_counts(batch.labels), batch)


class AdapterDisabled:
    """The reference model of a LoRA/QLoRA run: the same network with its adapter switched
    off (TRL's way), so no second copy of the base is held."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def __call__(self, **inputs: torch.Tensor) -> Any:
        model = self.trainer.model_wrapped
        with self.trainer.accelerator.unwrap_model(model).disable_adapter(), torch.no_grad():
            return model(**inputs)


class UnlearningTrainer(Trainer):
    """The Trainer of one unlearning method: subclasses override `loss` only.

    `compute_loss` turns the collated inputs into a `Step`, calls `loss`, applies the
    micro-batch's accumulation weight and refuses a non-finite loss (the Trainer would
    otherwise skip it silently)."""

    uses_reference: ClassVar[bool] = False
    forwards: ClassVar[int] = (
        1  # forward passes per step that keep a graph (forget, retain): the memory plan's activations
    )

    @classmethod
    def forward_extent(cls, params: Any, layers: int) -> tuple[int, bool]:
        """What a loss's forward pass runs, for the memory plan: (decoder layers, whether it
        takes logits at every position or at each row's last alone)."""
        return layers, True

    def __init__(self, *args: Any, params: Any, plan: list[MicroBatch], reference: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.params, self.plan = params, plan
        # Under LoRA/QLoRA the reference is the trained network with its adapter off.
        self._reference = AdapterDisabled(self) if self.uses_reference and reference is None else reference
        self.loss_is_scaled_for_ga = False  # our losses are micro-batch means: the Trainer divides by accumulation

    def loss(self, model: PreTrainedModel, step: Step) -> torch.Tensor:
        raise NotImplementedError

    @property
    def reference(self) -> Any:
        """The frozen original model, prepared on first use: by then DeepSpeed's config is
        final, and a ZeRO-3 reference is partitioned like the trained model."""
        if isinstance(self._reference, PreTrainedModel) and self.is_deepspeed_enabled:
            self._reference = prepare_deepspeed_reference(self._reference, self.accelerator)
        return self._reference

    def get_train_dataloader(self) -> DataLoader:
        # The plan fixes every micro-batch and its order; each rank takes its rows of each.
        rank, world = self.args.process_index, self.args.world_size
        return DataLoader(
            [micro.shard(rank, world) for micro in self.plan],
            batch_size=None,
            collate_fn=functools.partial(collate, pad_id=self.processing_class.pad_token_id),
        )

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = self.loss(model, step_of(inputs))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__}: loss became {loss.item()} at step {self.state.global_step + 1} "
                f"(learning_rate {self.args.learning_rate:g} too high?)"
            )
        return inputs["weight"] * loss


def prepare_deepspeed_reference(model: PreTrainedModel, accelerator: Any) -> Any:
    """A frozen model under DeepSpeed for inference only (TRL's prepare_deepspeed): ZeRO-3
    partitions it across ranks; other stages keep it whole (stage 0), with no optimizer."""
    import deepspeed

    config = {
        key: value for key, value in accelerator.state.deepspeed_plugin.deepspeed_config.items() if key != "optimizer"
    }
    zero = dict(config["zero_optimization"])
    if zero.get("stage") != 3:
        zero = {"stage": 0}
    zero.pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config={**config, "zero_optimization": zero})
    engine.eval()  # the engine's eval() returns None
    return engine


def deepspeed_config(params: Any) -> dict[str, Any]:
    """The DeepSpeed config handed to the Trainer; "auto" values follow TrainingArguments."""
    zero: dict[str, Any] = {"stage": params.zero_stage}
    if params.zero_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if params.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        # Buffers sized to the model (the Trainer fills "auto" from hidden_size), not DeepSpeed's fixed defaults.
        zero.update(
            reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto"
        )
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "zero_force_ds_cpu_optimizer": False,  # the Trainer's torch AdamW, also when offloading
        "steps_per_print": 10**9,
    }


@contextlib.contextmanager
def single_rank_launch(params: Any) -> Iterator[None]:
    """Run state for one training run. A lone process under DeepSpeed runs as a one-rank
    launch: launcher variables set for the run, so DeepSpeed does not look for MPI; the
    gloo/NCCL group it makes lives as long as the process (DeepSpeed caches it). Under
    torchrun or Ray Train the launcher's group is used. Afterwards the environment is restored
    (the launcher variables and what the Trainer sets, ACCELERATE_USE_DEEPSPEED and co) and
    accelerate's state reset, and torch's own F.linear put back (ZeRO-3's zero.Init replaces
    it with its memory-efficient linear for the whole process, for good), so the next run in
    the process (a reused Ray actor, the next test) and the processes it starts are configured
    by their own parameters alone."""
    environment = dict(os.environ)
    linear = torch.nn.functional.linear
    if params.zero_stage >= 0 and "RANK" not in os.environ:  # zero.Init reads LOCAL_RANK also once the group exists
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if params.zero_stage >= 0:
        import deepspeed

        # DeepSpeed's own view of the group (its config reads the world size from it): created
        # here for a lone process, wrapped around the launcher's group under Ray Train. On a CPU it
        # prints "... shm_comm_op built successfully" to stdout, which is a command's own output.
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        torch.nn.functional.linear = linear
        os.environ.clear()
        os.environ.update(environment)
        reset_accelerate_state()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def training_arguments(params: Any, output_dir: Path) -> TrainingArguments:
    """Created before any model is loaded: under ZeRO-3 that makes from_pretrained load
    straight into partitions (zero.Init)."""
    world = world_size()
    if params.zero_stage >= 0:
        if params.batch_size % world:
            raise ParamError(f"batch_size={params.batch_size}: must be a multiple of the {world} workers")
    cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=max(1, params.batch_size // world),
        gradient_accumulation_steps=params.gradient_accumulation,
        learning_rate=params.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        num_train_epochs=1,  # one pass over the plan, which holds every logical epoch
        bf16=params.bf16,
        # TF32 for the fp32 master-weight matmuls where bf16 was the device's default; float32
        # asked for explicitly stays IEEE float32.
        tf32=True if params.bf16 and not cpu else None,
        activation_checkpointing=params.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if params.gradient_checkpointing else None,
        deepspeed=deepspeed_config(params) if params.zero_stage >= 0 else None,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and params.zero_stage >= 0 else None,
        seed=params.seed,
        data_seed=params.seed,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=not sys.stderr.isatty(),  # the steps' progress on a terminal (`unlearn`); none in a trial
        remove_unused_columns=False,
    )
    one_gpu_per_process(args)  # `unlearn` on a host of several GPUs ran DataParallel over all of them
    return args


def load_for_training(model_dir: Path, params: TrainingParams) -> PreTrainedModel:
    """The model with only the parameters the chosen adapter trains left trainable; weights in
    fp32 (the master copy; bf16 runs as mixed precision), QLoRA's base in 4-bit NF4."""
    check_checkpoint(model_dir)
    if params.adapter == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if params.bf16 else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=quantization, dtype=compute, device_map={"": device}
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if params.adapter in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if params.adapter == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
        config = LoraConfig(
            r=params.lora_rank,
            lora_alpha=params.lora_alpha,
            lora_dropout=params.lora_dropout,
            target_modules=params.lora_targets
            if params.lora_targets == "all-linear"
            else params.lora_targets.split(","),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    elif params.adapter == "last_k":
        layers = (
            model.model.layers
        )  # the last k: all of them in a model of k layers or fewer, as the memory plan counts
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for layer in layers[-params.last_k_layers :]:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
    return model


def load_reference(model_dir: Path, params: TrainingParams) -> PreTrainedModel:
    """The frozen original model of a full or last-k run, in the dtype its forward passes run
    in (bf16 under mixed precision: half the memory)."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if params.bf16 else torch.float32)
    if not torch.distributed.is_initialized() or params.zero_stage < 0:
        reference.to("cuda" if torch.cuda.is_available() else "cpu")
    return reference.eval().requires_grad_(False)


def export_checkpoint(
    trainer: Trainer, tokenizer: PreTrainedTokenizerBase, out_dir: Path, params: Any, base_dir: Path
) -> Path:
    """Save the trained model as a Hugging Face checkpoint; every rank must call this (ZeRO-3
    gathers its partitions), rank 0 writes. LoRA and QLoRA adapters are merged into the
    base's own full-precision weights unless `merge_adapter` is off."""
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model = params.adapter in ("lora", "qlora")

    def save(directory: str) -> None:
        if params.zero_stage == 3:
            trainer.save_model(directory)  # gathers the partitions: a consolidated 16-bit checkpoint
        elif trainer.is_world_process_zero():
            # Every rank holds whole weights; the module's own save keeps a tied embedding stored once.
            trainer.model.save_pretrained(directory)

    if not (peft_model and params.merge_adapter):
        save(str(out_dir))  # the adapter alone for LoRA
    else:
        with temporary_folder("adapter-") as adapter_dir:
            save(adapter_dir)
            if trainer.is_world_process_zero():
                from peft import PeftModel

                with without_hf_deepspeed_config():  # rank 0 alone saves a whole model
                    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
                    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out_dir)
        (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: a safetensors checkpoint leaves it out
    return out_dir


class _EpochEnds(TrainerCallback):
    """Calls the epoch hook at the optimizer steps that end the method's logical epochs, with
    the checkpoint exported at that point (on every rank: rank 0's folder). With `keep_last`,
    the last epoch's checkpoint, where the hook left it in place, becomes the run's output there
    rather than being exported again."""

    def __init__(self, ends: list[int], export: Any, on_epoch: EpochCallback, keep_last: Path | None = None):
        self.ends, self.export, self.on_epoch, self.keep_last = ends, export, on_epoch, keep_last
        self.kept_last = False

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step in self.ends:
            epoch = self.ends.index(state.global_step) + 1
            with temporary_folder(f"epoch-{epoch}-") as staging:
                checkpoint = as_if_created_plainly(self.export(Path(staging)))  # it may become the kept checkpoint
                if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                    # Rank 0 wrote it; every rank reads it to evaluate its share (one node, or a shared TMPDIR).
                    shared = [str(checkpoint)]
                    torch.distributed.broadcast_object_list(shared, src=0)
                    checkpoint = Path(shared[0])
                last = epoch == len(self.ends)
                self.on_epoch(epoch, checkpoint, last)
                if last and self.keep_last is not None:
                    self.kept_last = self._keep(checkpoint)
                if torch.distributed.is_initialized():
                    torch.distributed.barrier()  # rank 0 removes the folder only when every rank is done with it
        return control

    def _keep(self, checkpoint: Path) -> bool:
        """Rank 0 moves the checkpoint to keep_last unless the hook took it; every rank learns whether it did."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        kept = [rank == 0 and checkpoint.exists()]
        if kept[0]:
            _move_into(checkpoint, self.keep_last)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(kept, src=0)
        return kept[0]


def _move_into(source: Path, target: Path) -> None:
    """The folder's files into target: a rename where target is new or empty (one disk), else a copy over it."""
    if target.exists() and any(target.iterdir()):
        shutil.copytree(source, target, dirs_exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()
    shutil.move(source, target)


class LossMethod(Method):
    """A gradient-based method: its Trainer (the loss) and its data plan; training is shared."""

    Params = TrainingParams
    Trainer: ClassVar[type[UnlearningTrainer]]

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, task: TaskData, params: Any
    ) -> tuple[list[Example], list[Example]]:
        """(input ids, labels) of the forget and retain rows, whole (`examples` cuts them)."""
        return encode_rows(tokenizer, task.forget), encode_rows(tokenizer, task.retain)

    def examples(
        self, tokenizer: PreTrainedTokenizerBase, task: TaskData, params: Any
    ) -> tuple[list[Example], list[Example], LengthCut]:
        """The forget and retain examples training takes, cut to max_length, and what the cut took."""
        forget, retain = self.encode(tokenizer, task, params)
        lengths = [len(ids) for ids, _ in forget + retain]
        over = sum(length > params.max_length for length in lengths)
        cut = LengthCut(params.max_length, len(lengths), over, max(lengths, default=0))
        return truncated(forget, params.max_length), truncated(retain, params.max_length), cut

    def trainer_options(self, tokenizer: PreTrainedTokenizerBase, task: TaskData, params: Any) -> dict[str, Any]:
        """Extra keyword arguments of the method's Trainer (e.g. encoded held-out documents)."""
        return {}

    def epochs(self, params: Any, forget_examples: int) -> int:
        """Logical epochs of the run: the epoch hook's calls (SUGD: one per chunk of the forget set)."""
        return params.epochs

    def epoch_plan(
        self, forget: list[Example], retain: list[Example], epoch: int, params: Any, rng: random.Random
    ) -> list[MicroBatch]:
        """One epoch: a pass over the forget set in shuffled batches, each with a retain batch."""
        forget_order = rng.sample(range(len(forget)), len(forget))
        retain_order = [rng.randrange(len(retain)) for _ in forget_order] if retain else []
        return [
            MicroBatch(
                [forget[i] for i in forget_order[start : start + params.batch_size]],
                [retain[i] for i in retain_order[start : start + params.batch_size]],
            )
            for start in range(0, len(forget_order), params.batch_size)
        ]

    def run(
        self, model_dir: Path, task: TaskData, out_dir: Path | None, params: Any, on_epoch: EpochCallback | None = None
    ) -> Path | None:
        return self.train(model_dir, task, self.for_this_device(params), out_dir, on_epoch)

    def for_this_device(self, params: Any) -> Any:
        return params if params.bf16 is not None else dataclasses.replace(params, bf16=bf16_device())

    def export(
        self, trainer: Trainer, tokenizer: PreTrainedTokenizerBase, out_dir: Path, params: Any, base_dir: Path
    ) -> Path:
        """The checkpoint this method's training produces (task vectors override it)."""
        return export_checkpoint(trainer, tokenizer, out_dir, params, base_dir)

    def checkpoint_bytes(self, shape: ModelShape, params: Any) -> int:
        """As `export_checkpoint` saves it: LoRA merged into the base's weights (their dtype) or
        the adapter alone (fp32 at most); a full or last-k model in the dtype it trained in:
        DeepSpeed casts the weights to bf16 under bf16, plain torch keeps them fp32 (autocast)."""
        if params.adapter in ("lora", "qlora"):
            return shape.total * shape.stored_width if params.merge_adapter else 4 * trainable_parameters(shape, params)
        return shape.total * (2 if params.zero_stage >= 0 and params.bf16 else 4)

    def train(
        self,
        model_dir: Path,
        task: TaskData,
        params: Any,
        out_dir: Path | None = None,
        on_epoch: EpochCallback | None = None,
        callbacks: tuple[TrainerCallback, ...] = (),
    ) -> Path | None:
        """Train; export every logical epoch's checkpoint for on_epoch and the last to out_dir;
        `callbacks` join the Trainer's (a benchmark's step timer)."""
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.pad_token = tokenizer.eos_token
        rng = random.Random(params.seed)
        forget, retain, cut = self.examples(tokenizer, task, params)
        if cut.cut:
            log.warning("%s: their ends are not trained on", cut)
        options = self.trainer_options(tokenizer, task, params)
        plan, ends = schedule(
            [
                self.epoch_plan(forget, retain, epoch, params, rng)
                for epoch in range(1, self.epochs(params, len(forget)) + 1)
            ],
            params.gradient_accumulation,
        )
        with temporary_folder("trainer-") as scratch, single_rank_launch(params):
            args = training_arguments(params, Path(scratch))
            torch.manual_seed(params.seed)
            model = load_for_training(model_dir, params)
            frozen = self.Trainer.uses_reference and params.adapter not in ("lora", "qlora")
            trainer = self.Trainer(
                model=model,
                args=args,
                processing_class=tokenizer,
                params=params,
                plan=plan,
                reference=load_reference(model_dir, params) if frozen else None,
                **options,
            )
            trainer.remove_callback(PrinterCallback)  # the hook reports; no log dicts on stdout
            for callback in callbacks:
                trainer.add_callback(callback)
            epoch_ends = None
            if on_epoch is not None:
                epoch_ends = _EpochEnds(
                    ends, lambda staging: self.export(trainer, tokenizer, staging, params, model_dir), on_epoch, out_dir
                )
                trainer.add_callback(epoch_ends)
            try:
                trainer.train()
                if out_dir is None or (epoch_ends is not None and epoch_ends.kept_last):
                    return out_dir  # none asked for, or the last epoch's export, kept (a 7B export is minutes)
                return self.export(trainer, tokenizer, out_dir, params, model_dir)
            finally:
                # A DeepSpeed engine outlives its Trainer (its hooks hold it): without this each
                # ZeRO-2 run left its whole training state in the process, beside which a reused
                # Ray actor ran its next trial (a 1B model's: about 18 GiB).
                trainer.accelerator.free_memory()
