"""Peak GPU memory of a training run, estimated before launch from the model's config.json
alone (the model is built on the meta device: no weights are read).

Per GPU: model states (weights, gradients, optimizer state; DeepSpeed's own accounting for
ZeRO 0-3 and CPU offload: under bf16, 2 bytes per weight and 18 per trainable parameter: 16-bit
gradient, fp32 gradient, fp32 master weight, two fp32 Adam moments; in fp32, ZeRO 1-3 still keep
a separate fp32 partition), the reference model of KL/NPO methods,
activations of the micro-batch (with or without gradient checkpointing), and a fixed
allowance for the CUDA context and allocator. A decoder layer's and the final norm's
activations are measured: what autograd saves for the backward of their forward, per token, run
on the meta device (nothing is computed), with memory-efficient attention (no s^2 term); plus
the vocabulary-sized logits."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from unlearn_sweep.corpus.checkpoints import read_model_config
from unlearn_sweep.corpus.errors import DataError

GIB = 1024**3
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, NCCL buffers, allocator slack
QLORA_BYTES = 0.5 + 4 / 64  # an NF4 weight plus its share of one fp32 absmax per block of 64
PROBE_TOKENS = 61  # the probe forward's length: a prime no model dimension is, so the token axis is told apart


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model, from its config."""

    total: int  # parameters, a tied embedding counted once
    linear: int  # parameters in the decoder layers' linear projections (what LoRA/QLoRA act on)
    lora_per_rank: int  # LoRA parameters per unit of rank over every linear projection (in + out features)
    largest_layer: int  # parameters of the largest module (ZeRO-3 gathers one at a time)
    per_layer: int  # parameters of one decoder layer
    layers: int
    hidden: int
    vocab: int
    kv_width: int = 0  # key/value heads x head size: one layer's KV cache per token is 2 x this
    model_type: str = ""  # config.json's model_type
    stored_width: int = 4  # bytes per weight as the checkpoint stores them (config.json's dtype; float32 if unsaid)
    # bytes one decoder layer's forward keeps for its backward per token, in a bf16 and an fp32 model
    layer_activations_16: float = 0.0
    layer_activations_32: float = 0.0
    # the same of the norm after the last layer (which runs at every token, even where logits do not)
    norm_activations_16: float = 0.0
    norm_activations_32: float = 0.0

    @classmethod
    def from_config(cls, model_dir: str | Path) -> ModelShape:
        """The shape of the model whose config.json is in `model_dir`; built once per config file
        as it stands (a sweep's start plans its memory twice and its storage once from it, each
        build half a second for a 7B config, the probes included)."""
        read_model_config(model_dir)  # a folder that is not a model's: one line, not a loader's traceback
        folder = Path(model_dir).resolve()
        return _model_shape(folder, (folder / "config.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _model_shape(model_dir: Path, config_mtime_ns: int) -> ModelShape:
    """ModelShape.from_config's build, by folder and config.json's modification time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    layers = model.model.layers
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(
        total=total,
        linear=sum(m.weight.numel() for m in linears),
        lora_per_rank=sum(m.in_features + m.out_features for m in linears),
        largest_layer=largest,
        per_layer=sum(p.numel() for p in layers[0].parameters()),
        layers=len(layers),
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        kv_width=(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads),
        model_type=config.model_type,
        stored_width=_stored_width(getattr(config, "dtype", None)),
        **_saved_activations(model, model_dir),
    )


def _saved_activations(model: torch.nn.Module, model_dir: str | Path) -> dict[str, float]:
    """A decoder layer's and the final norm's saved bytes per token in 16 and 32 bits. Where
    one probe cannot run on the meta device (a kernel that checks its inputs' dtype: OLMoE's
    experts in fp32), the other bounds it: a saved tensor at most doubles from 16 to 32 bits,
    and never shrinks."""
    decoder = model.get_decoder()
    regions = (decoder.layers[0], getattr(decoder, "norm", None))
    measured: dict[torch.dtype, tuple[float, float]] = {}
    failure = None
    for dtype in (torch.bfloat16, torch.float32):
        try:
            measured[dtype] = saved_per_token(model, dtype, regions)
        except Exception as error:  # whatever the model's own code raises on shapes without data
            failure = error
    if not measured:
        raise DataError(model_dir, f"the memory plan's probe forward cannot run on the meta device ({failure})")
    bf16 = measured.get(torch.bfloat16, measured.get(torch.float32))
    fp32 = measured.get(torch.float32, tuple(2 * size for size in bf16))
    return {
        "layer_activations_16": bf16[0],
        "layer_activations_32": fp32[0],
        "norm_activations_16": bf16[1],
        "norm_activations_32": fp32[1],
    }


def saved_per_token(
    model: torch.nn.Module, dtype: torch.dtype, regions: tuple[torch.nn.Module | None, ...]
) -> tuple[float, ...]:
    """Bytes each region's forward (a module of `model`; None: nothing) keeps for its backward,
    per token, as autograd saves them with the model in `dtype` (a model on the meta device:
    shapes only). Counted: the saved tensors with one token axis; left out: weights (none) and
    attention scores (two: the memory-efficient kernels GPUs train with keep none). A saved
    view keeps its base: the base is counted, once. Attention on the meta device takes the math
    path, float32 inside a bf16 model: a bf16 layer's figure is up to 9% over what a CPU forward
    of a small OLMo-2 keeps (measured), an fp32 one's within 0.1%."""
    model = model.to(dtype)
    saved: list[dict[int, tuple[torch.Tensor, int]]] = [{} for _ in regions]  # by id, the tensor held: no id reused
    inside: list[int | None] = [None]  # the index of the region running
    hooks = []
    for index, region in enumerate(regions):
        if region is not None:
            hooks.append(region.register_forward_pre_hook(lambda *_, index=index: inside.__setitem__(0, index)))
            hooks.append(region.register_forward_hook(lambda *_: inside.__setitem__(0, None)))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if inside[0] is not None and list(tensor.shape).count(PROBE_TOKENS) == 1:
            base = tensor
            while base._base is not None:
                base = base._base
            saved[inside[0]][id(base)] = (base, base.numel() * base.element_size())
        return tensor

    try:
        probe = torch.zeros((1, PROBE_TOKENS), dtype=torch.long, device=next(model.parameters()).device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=probe)
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(sum(size for _, size in kept.values()) / PROBE_TOKENS for kept in saved)


def _stored_width(dtype: Any) -> int:
    """Bytes per weight of a config's dtype (a name or a torch.dtype); float32 where it has none."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU, by part."""

    model_states: int
    reference: int
    activations: int
    evaluation: int = 0  # each epoch's scoring loads the exported checkpoint whole, while the engine lives on
    evaluation_work: int = 0  # the scoring passes' largest working set (KV cache, a slice of logits)

    @property
    def total(self) -> int:
        # Training's activations are freed before the epoch is scored and their cached blocks serve the
        # evaluation (one allocator in the process): the larger of the two counts.
        return (
            self.model_states
            + self.reference
            + max(self.activations, self.evaluation + self.evaluation_work)
            + CUDA_CONTEXT_BYTES
        )


def trainable_parameters(shape: ModelShape, params: Any) -> int:
    if params.adapter in ("lora", "qlora"):
        return params.lora_rank * shape.lora_per_rank
    if params.adapter == "last_k":
        return min(params.last_k_layers, shape.layers) * shape.per_layer
    return shape.total


def model_state_bytes(shape: ModelShape, params: Any, workers: int) -> int:
    """Weights + gradients + optimizer state per GPU, as DeepSpeed accounts for them."""
    trainable = trainable_parameters(shape, params)
    frozen = shape.total - trainable
    if params.adapter == "qlora":
        # 4-bit linear weights; embeddings and norms in the compute dtype; adapters fp32 (no DeepSpeed bf16 cast).
        weights = int(shape.linear * QLORA_BYTES + (shape.total - shape.linear) * (2 if params.bf16 else 4))
        return weights + (16 if params.zero_stage < 1 else 4 + 12 // workers) * trainable
    if params.zero_stage < 0:
        # Plain torch: fp32 weights (the master copy), fp32 gradient and two Adam moments; under
        # bf16, autocast's bf16 copy of every weight a matmul reads, held for the backward.
        copies = 2 * (shape.linear + shape.vocab * shape.hidden) if params.bf16 else 0
        return 4 * shape.total + 12 * trainable + copies
    weight = 2 if params.bf16 else 4
    gradient16 = 2 if params.bf16 else 0  # the 16-bit gradient beside the fp32 one
    # fp32 gradient, fp32 master weight and two Adam moments; ZeRO 1-3 keep their own fp32 partition
    # (a copy) even when the weights are fp32 already, only plain DeepSpeed (stage 0) steps them in place.
    master = 4 if params.bf16 or params.zero_stage >= 1 else 0
    optimizer = 4 + master + 8
    states = {
        0: weight * shape.total + (gradient16 + optimizer) * trainable,
        1: weight * shape.total + gradient16 * trainable + optimizer * trainable // workers,
        2: weight * shape.total + (gradient16 + optimizer) * trainable // workers,
        3: 4 * shape.largest_layer + weight * frozen // workers + (weight + optimizer) * trainable // workers,
    }[params.zero_stage]
    if params.zero_offload and params.zero_stage >= 1:  # gradients and optimizer state live in CPU memory
        states = {
            1: weight * shape.total + gradient16 * trainable,
            2: weight * shape.total,
            3: 4 * shape.largest_layer + weight * shape.total // workers,
        }[params.zero_stage]
    return states


def reference_bytes(shape: ModelShape, params: Any, uses_reference: bool, workers: int) -> int:
    """A frozen copy for full/last-k runs of KL/NPO methods; LoRA switches its adapter off instead."""
    if not uses_reference or params.adapter in ("lora", "qlora"):
        return 0
    weight = 2 if params.bf16 else 4
    return weight * shape.total // (workers if params.zero_stage == 3 else 1)


def activation_bytes(shape: ModelShape, params: Any, trainer: Any, workers: int) -> int:
    """Saved activations of one micro-batch on one GPU, for each forward pass that keeps a graph
    (`trainer.forwards`), over the layers it runs and the positions it takes logits at
    (`trainer.forward_extent`)."""
    rows = max(1, params.batch_size // workers)
    tokens = rows * params.max_length
    width = 2 if params.bf16 else 4
    # Plain torch's autocast keeps its fp32 residual stream beside bf16 matmul inputs: planned at
    # the bf16 model's figure.
    per_layer = int(tokens * (shape.layer_activations_16 if params.bf16 else shape.layer_activations_32))
    norm = int(tokens * (shape.norm_activations_16 if params.bf16 else shape.norm_activations_32))
    stream = 2 if params.bf16 and (params.zero_stage >= 0 or params.adapter == "qlora") else 4  # a bf16 model's
    layers_run, every_position = trainer.forward_extent(params, shape.layers)
    layers = (
        tokens * shape.hidden * stream * layers_run + per_layer  # each layer's input, and one layer's whole
        if params.gradient_checkpointing
        else per_layer * layers_run
    )
    positions = tokens if every_position else rows
    logits = positions * shape.vocab * (width + 4 + 4)  # logits, their fp32 cast, the loss's softmax gradient
    return trainer.forwards * (layers + norm + logits)


def estimate(
    shape: ModelShape,
    params: Any,
    trainer: Any,
    workers: int,
    evaluation: tuple[int, int] = (0, 0),
) -> Estimate:
    """Peak bytes per GPU of a run of the method whose UnlearningTrainer subclass is `trainer`;
    `evaluation`: what the per-epoch evaluation takes beside the training engine, (copy,
    working set): see orchestrator/plan.py."""
    return Estimate(
        model_state_bytes(shape, params, workers),
        reference_bytes(shape, params, trainer.uses_reference, workers),
        activation_bytes(shape, params, trainer, workers),
        *evaluation,
    )
