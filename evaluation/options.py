"""How a checkpoint is evaluated: one frozen value, read from a sweep config's `eval` mapping
(or the `evaluate` command's options) and passed whole to every evaluation, the base model's
included. Each field's setting() says what a config may hold there. Importing it loads
neither torch nor transformers (a config is read on a CPU head)."""

from __future__ import annotations

from dataclasses import dataclass

from unlearn_sweep.corpus.checkpoints import BACKENDS, DTYPES
from unlearn_sweep.corpus.settings import setting
from unlearn_sweep.evaluation.vllm_inference import GPU_SHARE

# Every pass's batch holds at most `batch_size` rows and `batch_size * TOKENS_PER_ROW` padded
# tokens (a generated row counts its new tokens): longer rows go in smaller batches, so the
# evaluation's memory is bounded by the options alone, whatever the data (the memory plan counts it).
TOKENS_PER_ROW = 512
# The loss pass applies the output layer to this many (row, position) logits at a time:
# batch x length x vocabulary logits in float32 would be ~10 GiB for a 7B model at batch 32.
LOGIT_ELEMENTS = 2**26
# Architectures whose logits are the output layer applied to the decoder's last hidden state,
# nothing else (no soft-capping or scaling): their loss pass is sliced; others take one pass.
PLAIN_HEAD_MODELS = frozenset({"olmo", "olmo2", "olmo3", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3"})


def _positive(value: int) -> bool:
    return value > 0


@dataclass(frozen=True)
class EvalOptions:
    # the evaluation batch (generation, document losses, MMLU), not the training one
    batch_size: int = setting(32, kind=int, what="a positive integer", valid=_positive)
    max_new_tokens: int = setting(256, kind=int, what="a positive integer", valid=_positive)
    dtype: str = setting("bfloat16", kind=str, what=f"one of {', '.join(DTYPES)}", valid=lambda v: v in DTYPES)
    # also record the gold answers' NLL (a diagnostic pass no score uses)
    answer_nll: bool = setting(False, kind=bool, what="true or false")
    # hf | vllm (the optional GPU backend)
    backend: str = setting("hf", kind=str, what=f"one of {', '.join(BACKENDS)}", valid=lambda v: v in BACKENDS)
    # the share of a GPU a vLLM engine may take
    vllm_memory: float = setting(GPU_SHARE, kind=float, what="a number in (0, 1)", valid=lambda v: 0 < v < 1)
    # Staged evaluation (evaluation/screening.py): screen each epoch on a stratified subset first.
    screen: bool = setting(True, kind=bool, what="true or false")
    screen_fraction: float = setting(0.2, kind=float, what="a number in (0, 1]", valid=lambda v: 0 < v <= 1)
    screen_margin: float = setting(0.05, kind=float, what="a number in [0, 1)", valid=lambda v: 0 <= v < 1)
    screen_confidence: float = setting(0.95, kind=float, what="a number in [0.5, 1)", valid=lambda v: 0.5 <= v < 1)
    screen_hold: int = setting(2, kind=int, what="a positive integer", valid=_positive)
