"""Merging unlearned models (ZJUKLAB's winning idea: merge an over- and an under-forgetting
model). Full checkpoints merge their task vectors relative to the base, tensor by tensor,
streamed from safetensors and written in shards, so that peak memory stays at one tensor
per input plus one output shard (a 7B model merges in bounded memory); TIES and magnitude
pruning follow peft's definitions with a faster trim, DARE and linear are peft's `merge_utils`. LoRA adapters
merge with peft's `add_weighted_adapter`, in the variants that act on the full weight delta."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import save_file

from unlearn_sweep.corpus.semeval import TaskData
from unlearn_sweep.methods.registry import EpochCallback, Method, ParamError, register

COMBINATIONS = ("ties", "dare_ties", "linear", "dare_linear", "magnitude_prune")
# The peft add_weighted_adapter variants that combine full deltas B @ A, not A and B apart.
ADAPTER_COMBINATIONS = {"ties": "ties_svd", "dare_ties": "dare_ties_svd", "linear": "cat",
                        "dare_linear": "dare_linear_svd", "magnitude_prune": "magnitude_prune_svd"}
SHARD_BYTES = 1024**3


@dataclass
class MergeParams:
    models: str = ""  # comma-separated checkpoints or LoRA adapters to merge
    combination: str = "ties"
    density: float = 0.5
    weights: str = ""  # comma-separated, one per model; default 1.0 each
    seed: int = 0  # DARE's random drop

    def check(self) -> None:
        if len(self.model_paths) < 2:
            raise ParamError("models: give at least two checkpoints, comma-separated")
        if self.combination not in COMBINATIONS:
            raise ParamError(f"combination={self.combination!r}: expected one of {', '.join(COMBINATIONS)}")
        if not 0 < self.density <= 1:
            raise ParamError(f"density={self.density}: must be in (0, 1]")
        if self.weights and len(self.weight_values) != len(self.model_paths):
            raise ParamError(f"weights: {len(self.weight_values)} given for {len(self.model_paths)} models")

    @property
    def model_paths(self) -> list[Path]:
        return [Path(part.strip()) for part in self.models.split(",") if part.strip()]

    @property
    def weight_values(self) -> list[float]:
        if not self.weights:
            return [1.0] * len(self.model_paths)
        try:
            return [float(part) for part in self.weights.split(",")]
        except ValueError:
            raise ParamError(f"weights={self.weights!r}: expected comma-separated numbers") from None


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries largest in magnitude, zero the rest (TIES's
    trim, peft's magnitude pruning); a k-th value threshold is ~4x faster than peft's topk."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    if keep == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs()
    threshold = magnitude.reshape(-1).kthvalue(delta.numel() - keep + 1).values
    return delta * (magnitude >= threshold)


def ties(deltas: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each, elect the sign with the larger total mass,
    average the weighted entries that agree with it (peft's definition, sign from unweighted)."""
    trimmed = torch.stack([trim(delta, density) for delta in deltas])
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = trimmed.sign() == elected
    weighted = trimmed * weights.reshape(-1, *[1] * deltas[0].dim())
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def merge_deltas(deltas: list[torch.Tensor], weights: torch.Tensor, combination: str, density: float) -> torch.Tensor:
    """One tensor's merged task vector."""
    if combination == "ties":
        return ties(deltas, weights, density)
    if combination == "magnitude_prune":
        return sum(weight * trim(delta, density) for weight, delta in zip(weights, deltas))
    if combination == "linear":
        return merge_utils.task_arithmetic(deltas, weights)
    with warnings.catch_warnings():  # peft warns that density 1 drops nothing, which is meant
        warnings.simplefilter("ignore", UserWarning)
        return getattr(merge_utils, combination)(deltas, weights, density)


class _Checkpoint:
    """Tensor names and lazy reads of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        elif (directory / "model.safetensors").exists():
            with safe_open(directory / "model.safetensors", "pt") as f:
                self.files = {name: directory / "model.safetensors" for name in f.keys()}
        else:
            raise ParamError(f"{directory}: no model.safetensors (or index) to merge")
    def get(self, name: str) -> torch.Tensor:
        # Opened per read so that the file's memory map is dropped again: resident memory
        # stays at the tensors in hand, not the whole checkpoint.
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def merge_checkpoints(base_dir: Path, model_dirs: list[Path], out_dir: Path, combination: str,
                      density: float, weights: list[float], seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Stream-merge full checkpoints into out_dir (safetensors shards + config + tokenizer)."""
    torch.manual_seed(seed)
    base = _Checkpoint(base_dir)
    models = [_Checkpoint(d) for d in model_dirs]
    for directory, model in zip(model_dirs, models):
        if set(model.files) != set(base.files):
            raise ParamError(f"{directory}: its tensors differ from the base model's; merge needs one architecture")
    weight_tensor = torch.tensor(weights, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_files: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}

    def write_shard() -> None:
        path = out_dir / f".shard-{len(shard_files):05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt"})
        shard_files.append((path, list(shard)))
        shard.clear()

    for name in sorted(base.files):
        base_tensor = base.get(name)
        if base_tensor.is_floating_point():
            deltas = [model.get(name).float() - base_tensor.float() for model in models]
            merged = (base_tensor.float() + merge_deltas(deltas, weight_tensor, combination, density)).to(base_tensor.dtype)
        else:
            merged = base_tensor
        if shard and sum(t.nbytes for t in shard.values()) + merged.nbytes > shard_bytes:
            write_shard()
        shard[name] = merged.contiguous()
    write_shard()
    _name_shards(shard_files, out_dir)
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.startswith("model") and not path.name.startswith("adapter"):
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def _name_shards(shard_files: list[tuple[Path, list[str]]], out_dir: Path) -> None:
    """Hugging Face names: model.safetensors, or model-0000i-of-0000n.safetensors + index."""
    if len(shard_files) == 1:
        shard_files[0][0].rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for number, (path, names) in enumerate(shard_files, start=1):
        final = f"model-{number:05d}-of-{len(shard_files):05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update({name: final for name in names})
    total = sum((out_dir / file).stat().st_size for file in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def merge_adapters(base_dir: Path, adapter_dirs: list[Path], out_dir: Path, combination: str,
                   density: float, weights: list[float]) -> Path:
    """Merge LoRA adapters with peft, then fold the result into the base weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    names = [f"adapter_{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, directory in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(directory, adapter_name=name)
    options = {} if combination == "linear" else {"density": density}
    model.add_weighted_adapter(names, weights, "merged", combination_type=ADAPTER_COMBINATIONS[combination], **options)
    model.set_adapter("merged")
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


@register
class Merge(Method):
    name = "merge"
    Params = MergeParams

    def run(self, model_dir: Path, task: TaskData, out_dir: Path, params: MergeParams,
            on_epoch: EpochCallback | None = None) -> Path:
        paths = params.model_paths
        adapters = [(path / "adapter_config.json").exists() for path in paths]
        if any(adapters) and not all(adapters):
            raise ParamError("models: merge either all full checkpoints or all LoRA adapters, not a mix")
        merge = merge_adapters if all(adapters) else merge_checkpoints
        options = {} if all(adapters) else {"seed": params.seed}
        out = merge(Path(model_dir), paths, Path(out_dir), params.combination, params.density, params.weight_values, **options)
        if on_epoch is not None:
            on_epoch(1, out)
        return out
