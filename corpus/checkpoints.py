"""A local Hugging Face checkpoint checked before anything loads it: a missing or truncated
weight file is a one-line error naming the file, not a loader's traceback minutes into a run."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from unlearn_sweep.corpus.errors import DataError, read_text

DTYPES = ("bfloat16", "float16", "float32", "auto")  # what a checkpoint can be loaded in for inference; auto: as saved
# What it can be loaded by for inference: Hugging Face (everywhere) or vLLM (optional, GPU only); the same
# records either way.
BACKENDS = ("hf", "vllm")


# Sizes a model's config.json must give as positive integers where it gives them.
POSITIVE_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_model_config(model_dir: str | Path) -> dict:
    """A checkpoint's config.json, checked: JSON, a model type this Transformers knows, and
    positive sizes (each problem one DataError naming what was read and what is expected)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise DataError(folder, "checkpoint folder not found")
    path = folder / "config.json"
    if not path.is_file():
        raise DataError(folder, "not a Hugging Face checkpoint (no config.json)")
    try:
        config = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(path, f"not JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(config, dict):
        raise DataError(path, f"expected a JSON object, got {type(config).__name__}")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise DataError(
            path,
            f"model_type {model_type!r} is not a model type Transformers {transformers.__version__} knows "
            "(expected one such as olmo2, llama or qwen2)",
            field="model_type",
        )
    for key in POSITIVE_SIZES:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DataError(path, f"{value!r}: expected a positive integer", field=key)
    return config


def check_checkpoint(model_dir: str | Path) -> None:
    """config.json (`read_model_config`), a tokenizer, the weight files (sharded ones as their
    index names them), and every safetensors file's header covering the file (a truncated copy
    does not)."""
    folder = Path(model_dir)
    read_model_config(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(folder, f"no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): save it beside the model")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise DataError(index, f"not a safetensors index ({error})") from None
        weights = [folder / shard for shard in shards]
    else:
        weights = sorted(folder.glob("*.safetensors"))
        if not weights and not any(folder.glob("pytorch_model*.bin")):
            raise DataError(folder, "no weights (model.safetensors, an index of shards, or pytorch_model.bin)")
    for path in weights:
        if not path.is_file():
            raise DataError(path, "weight file not found")
        try:
            with safe_open(path, "pt"):
                pass
        except SafetensorError as error:
            raise DataError(path, f"unreadable weights ({error}); truncated or not a safetensors file") from None
