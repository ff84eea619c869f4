"""The same three passes as `evaluation.inference` (greedy generation, whole-document loss,
MMLU letter choice) on vLLM's engine: an optional backend for GPUs (`eval.backend: vllm`,
`evaluate --backend vllm`), used only when vLLM is installed and asked for.

Each pass keeps the HF backend's definition, so the records are the same: prompts are
encoded by the checkpoint's own tokenizer exactly as the HF passes encode them and given to
vLLM as token ids; generations are decoded by that tokenizer (special tokens skipped);
document losses are the mean NLL of every token after the first, from vLLM's prompt
log-probabilities; the MMLU letter is the greedy next token with only the four letter
tokens allowed (the argmax of their logits). vLLM schedules its own batches, so
`batch_size` is not used."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearn_sweep.corpus.checkpoints import check_checkpoint
from unlearn_sweep.corpus.compat import shutdown_vllm_engine
from unlearn_sweep.corpus.environment import environment

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from unlearn_sweep.evaluation.options import EvalOptions  # which imports this module's GPU_SHARE

# The sweep's config reads the facts below: torch and transformers load only with a model.
GPU_SHARE = 0.4  # of a GPU, weights and KV cache together, by default: in a trial the training engine holds the rest
MISSING = "the vllm backend needs the vllm package (pip install vllm, on a machine with a CUDA GPU)"
NO_GPU = "the vllm backend needs a CUDA GPU, and torch sees none"
NO_ANSWER_NLL = "the gold answers' NLL is computed by the hf backend only"
# vLLM measures the GPU's free memory while it starts and fails when another process frees
# memory meanwhile, as a neighbouring trial on a shared GPU does at any time.
SHARED_GPU = "the vllm backend needs whole GPUs (resources_per_trial.gpu >= 1): trials sharing one would fail its start"


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def unavailable() -> str | None:
    """Why vLLM cannot run in this process, or None where it can."""
    if not installed():
        return MISSING
    import torch

    return None if torch.cuda.is_available() else NO_GPU


def load_model(
    model_dir: str | Path, dtype: str = "bfloat16", gpu_memory_utilization: float = GPU_SHARE
) -> tuple[Any, PreTrainedTokenizerBase]:
    """A vLLM engine over a local checkpoint and the checkpoint's HF tokenizer (pad = eos, as
    the HF backend); the engine takes `gpu_memory_utilization` of the GPU this process uses."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    from transformers import AutoTokenizer
    from vllm import LLM

    check_checkpoint(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    with _engine_device(gpu_memory_utilization):
        engine = LLM(
            model=str(model_dir),
            dtype=dtype,
            seed=0,
            gpu_memory_utilization=gpu_memory_utilization,
            # one engine per evaluated checkpoint: capturing CUDA graphs would cost more than it saves
            enforce_eager=True,
            # prompt log-probabilities under prefix caching depend on the order of requests (vLLM issue 42019)
            enable_prefix_caching=False,
        )
    return engine, tokenizer


@contextlib.contextmanager
def _engine_device(share: float) -> Iterator[None]:
    """While an engine starts: this process's cached GPU blocks given back (a trial's training
    left them; vLLM's engine process cannot use them and counts them as taken), refused in
    one line if the share is not free, and the engine process shown only the GPU this
    process uses (it opens its first visible GPU: in a multi-worker trial every rank's
    would open the same one)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    if free < share * total:
        raise RuntimeError(
            f"the vllm backend needs {share:g} of the GPU free ({share * total / 2**30:.1f} GiB), "
            f"{free / 2**30:.1f} GiB is: lower eval.vllm_memory or the training's memory (unlearn-sweep plan)"
        )
    visible, index = os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.current_device()
    with environment(CUDA_VISIBLE_DEVICES=visible.split(",")[index] if visible else str(index)):
        yield


def open_model(model_dir: str | Path, options: EvalOptions) -> tuple[Any, PreTrainedTokenizerBase]:
    """The backend interface's loader (evaluator.InferenceBackend): an engine in the options'
    dtype taking their `vllm_memory` share of the GPU."""
    return load_model(model_dir, options.dtype, options.vllm_memory)


def release(engine: Any) -> None:
    """Stop the engine's core process and give its GPU memory back (a trial builds one per
    evaluated checkpoint)."""
    import torch

    shutdown_vllm_engine(engine)
    gc.collect()
    torch.cuda.empty_cache()


def _context_length(engine: Any) -> int:
    return engine.llm_engine.model_config.max_model_len


def _run(engine: Any, encoded: list[list[int]], **sampling: Any) -> list:
    from vllm import SamplingParams

    return engine.generate(
        [{"prompt_token_ids": ids} for ids in encoded], SamplingParams(temperature=0.0, **sampling), use_tqdm=False
    )


def generate(
    engine: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 32,
    max_new_tokens: int = 256,
) -> list[str]:
    """Greedy continuations, new tokens only, special tokens skipped (decoded as the HF backend decodes)."""
    outputs = _run(
        engine, [tokenizer(prompt)["input_ids"] for prompt in prompts], max_tokens=max_new_tokens, detokenize=False
    )
    return [tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True) for output in outputs]


def document_loss(
    engine: Any, tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], batch_size: int = 16
) -> list[float]:
    """Mean token cross-entropy of each whole document, truncated only to the model's context."""
    limit = _context_length(engine)
    encoded = [tokenizer(document)["input_ids"][:limit] for document in documents]
    outputs = _run(engine, encoded, max_tokens=1, prompt_logprobs=0, detokenize=False)
    losses = []
    for ids, output in zip(encoded, outputs, strict=True):
        # prompt_logprobs[i] holds token i's log-probability given tokens < i (None for the first).
        scored = [output.prompt_logprobs[i][token].logprob for i, token in enumerate(ids) if i > 0]
        losses.append(-sum(scored) / max(1, len(scored)))  # a one-token document scores 0, as in the HF pass
    return losses


def choose_letters(
    engine: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 16
) -> list[int]:
    """Index of the most probable answer letter after each prompt: the greedy next token among the four."""
    from unlearn_sweep.evaluation.inference import letter_token_ids

    letters = letter_token_ids(tokenizer)
    limit = _context_length(engine)
    outputs = _run(
        engine,
        [tokenizer(prompt)["input_ids"][-limit:] for prompt in prompts],
        max_tokens=1,
        allowed_token_ids=letters,
        detokenize=False,
    )
    return [letters.index(output.outputs[0].token_ids[0]) for output in outputs]
