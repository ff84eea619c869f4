"""A local Hugging Face checkpoint checked before anything loads it: a missing or truncated
weight file is a one-line error naming the file, not a loader's traceback minutes into a run."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from unlearn_sweep.corpus.errors import DataError

DTYPES = ("bfloat16", "float16", "float32", "auto")  # what a checkpoint can be loaded in for inference; auto: as saved
# What it can be loaded by for inference: Hugging Face (everywhere) or vLLM (optional, GPU only); the same
# records either way.
BACKENDS = ("hf", "vllm")


def check_checkpoint(model_dir: str | Path) -> None:
    """config.json, the weight files (sharded ones as their index names them), and every
    safetensors file's header covering the file (a truncated copy does not)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise DataError(folder, "checkpoint folder not found")
    if not (folder / "config.json").is_file():
        raise DataError(folder, "not a Hugging Face checkpoint (no config.json)")
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
