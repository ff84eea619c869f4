"""How a checkpoint is evaluated: one frozen value, read from a sweep config's `eval` mapping
(or the `evaluate` command's options) and passed whole to every evaluation, the base model's
included. Importing it loads neither torch nor transformers (a config is read on a CPU head)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from unlearn_sweep.evaluation.vllm_inference import GPU_SHARE


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 32  # evaluation batch (generation, document losses, MMLU), not the training one
    max_new_tokens: int = 256
    dtype: str = "bfloat16"
    answer_nll: bool = False  # also record the gold answers' NLL (a diagnostic pass no score uses)
    backend: str = "hf"  # hf | vllm (the optional GPU backend)
    vllm_memory: float = GPU_SHARE  # the share of a GPU a vLLM engine may take
    # Staged evaluation (evaluation/screening.py): screen each epoch on a stratified subset first.
    screen: bool = True
    screen_fraction: float = 0.2
    screen_margin: float = 0.05
    screen_confidence: float = 0.95
    screen_hold: int = 2


EVAL_DEFAULTS: dict[str, Any] = dataclasses.asdict(EvalOptions())
