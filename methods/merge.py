"""Merging unlearned models (ZJUKLAB's winning idea: merge an over- and an under-forgetting
model). Full checkpoints merge their task vectors relative to the base, tensor by tensor,
streamed from safetensors and written in shards, so that peak memory stays at one tensor
per input plus one output shard (a 7B model merges in bounded memory).

Combinations, per tensor (delta_i = model_i - base, w_i the weights, lambda the scale):
- ties, magnitude_prune, dare_ties, dare_linear: peft's definitions (`merge_utils`; the trim
  keeps exactly the top-k entries, as peft's does).
- linear: the weighted average of the models (mergekit's `linear`): base + sum w_i delta_i / sum w_i.
- task_arithmetic: base + lambda * sum w_i delta_i (mergekit's).
- breadcrumbs (+ _ties): mergekit's; each delta keeps the `density` fraction of its entries
  after dropping the `gamma` fraction largest in magnitude, then summed (with TIES's sign
  election for _ties), times lambda.
- della (+ _linear): mergekit's; each entry kept with a probability that grows with its
  magnitude rank (density +- epsilon), rescaled to the delta's L1 norm; della elects signs and
  averages (normalised by the weights kept), della_linear sums; times lambda.
- model_stock: mergekit's (Jang et al. 2024): base + t * mean delta_i with t = N cos / (1 + (N - 1) cos),
  cos the mean pairwise cosine of the deltas.
- slerp: two models, spherical interpolation between them at `t` on each flattened tensor.
LoRA adapters merge with peft's `add_weighted_adapter`, in the variants that act on the full
weight delta."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import save_file
from unlearn_sweep.corpus.semeval import TaskData
from unlearn_sweep.methods.registry import EpochCallback, Method, ParamError, register

COMBINATIONS = (
    "ties",
    "dare_ties",
    "linear",
    "task_arithmetic",
    "dare_linear",
    "magnitude_prune",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "slerp",
)
# The peft add_weighted_adapter variants that combine full deltas B @ A, not A and B apart.
ADAPTER_COMBINATIONS = {
    "ties": "ties_svd",
    "dare_ties": "dare_ties_svd",
    "task_arithmetic": "cat",
    "dare_linear": "dare_linear_svd",
    "magnitude_prune": "magnitude_prune_svd",
}
SHARD_BYTES = 1024**3


@dataclass
class MergeParams:
    models: str = ""  # comma-separated checkpoints or LoRA adapters to merge
    combination: str = "ties"
    density: float = 0.5
    weights: str = ""  # comma-separated, one per model; default 1.0 each
    scale: float = 1.0  # lambda of task_arithmetic, breadcrumbs and della
    gamma: float = 0.01  # breadcrumbs: the fraction of largest entries dropped
    epsilon: float = 0.1  # della: keep probabilities span density +- epsilon
    t: float = 0.5  # slerp: 0 is the first model, 1 the second
    seed: int = 0  # DARE's and DELLA's random drops

    def check(self) -> None:
        if len(self.model_paths) < 2:
            raise ParamError("models: give at least two checkpoints, comma-separated")
        if self.combination not in COMBINATIONS:
            raise ParamError(f"combination={self.combination!r}: expected one of {', '.join(COMBINATIONS)}")
        if not 0 < self.density <= 1:
            raise ParamError(f"density={self.density}: must be in (0, 1]")
        if self.weights and len(self.weight_values) != len(self.model_paths):
            raise ParamError(f"weights: {len(self.weight_values)} given for {len(self.model_paths)} models")
        if self.combination == "slerp" and len(self.model_paths) != 2:
            raise ParamError("combination=slerp: merges exactly two models")
        if self.combination.startswith("della") and not (
            0 < self.density - self.epsilon and self.density + self.epsilon < 1
        ):
            raise ParamError(f"epsilon={self.epsilon}: density +- epsilon must lie in (0, 1)")
        if not 0 <= self.t <= 1 or not 0 <= self.gamma < 1:
            raise ParamError(f"t={self.t}, gamma={self.gamma}: t must lie in [0, 1], gamma in [0, 1)")

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
    """Keep exactly the int(density * n) entries largest in magnitude, zero the rest (TIES's
    trim and peft's magnitude pruning, which take the top k)."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[delta.abs().reshape(-1).topk(keep).indices] = True
    return delta * mask.reshape(delta.shape)


def ties(deltas: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each, elect the sign with the larger total mass,
    average the weighted entries that agree with it (peft's definition, sign from unweighted)."""
    trimmed = torch.stack([trim(delta, density) for delta in deltas])
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = trimmed.sign() == elected
    weighted = trimmed * weights.reshape(-1, *[1] * deltas[0].dim())
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def without_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs' mask: drop the gamma fraction largest in magnitude, then the smallest, so
    that the density fraction stays (fewer outliers dropped where both cannot be had)."""
    count = delta.numel()
    keep, top = int(density * count), int(gamma * count)
    bottom = max(0, count - keep - top)
    order = delta.abs().reshape(-1).argsort()
    mask = torch.zeros(count, dtype=torch.bool)
    mask[order[bottom : bottom + keep]] = True
    return delta * mask.reshape(delta.shape)


def della_drop(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE: per row, each entry kept with probability density - epsilon + 2 epsilon
    x its magnitude rank in [0, 1]; the kept entries rescaled to the delta's L1 norm."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float()
    spread = (ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values).clamp(min=1)
    keep = torch.bernoulli((density - epsilon) + (ranks - ranks.min(dim=1, keepdim=True).values) / spread * 2 * epsilon)
    kept = (rows * keep).reshape(delta.shape)
    before, after = delta.abs().sum(), kept.abs().sum()
    return kept * (before / after) if before > 1e-7 and after > 1e-7 else kept


def elected_sum(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mergekit's TIES consensus over weighted deltas: the entries agreeing with the sign of
    their weighted sum, summed, and (normalize) divided by the weight they carry."""
    weighted = deltas * weights
    agrees = weighted.sign() == torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    mixed = (weighted * agrees).sum(dim=0)
    if not normalize:
        return mixed
    divisor = (weights * agrees).sum(dim=0)
    return mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def model_stock(deltas: list[torch.Tensor]) -> torch.Tensor:
    flat = [delta.reshape(-1) for delta in deltas]
    cosines = [
        torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-6).clamp(-1, 1)
        for i, a in enumerate(flat)
        for b in flat[i + 1 :]
    ]
    cos = torch.stack(cosines).mean()
    denominator = 1 + (len(deltas) - 1) * cos
    ratio = torch.zeros(()) if denominator.abs() < 1e-6 else len(deltas) * cos / denominator
    return ratio * torch.stack(deltas).mean(dim=0)


def slerp(first: torch.Tensor, second: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two flattened tensors (linear where they are near collinear)."""
    a, b = first.reshape(-1).double(), second.reshape(-1).double()
    dot = (a / a.norm().clamp(min=1e-8) * (b / b.norm().clamp(min=1e-8))).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return ((1 - t) * first.double() + t * second.double()).to(first.dtype)
    theta = torch.arccos(dot)
    mixed = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return mixed.reshape(first.shape).to(first.dtype)


def merge_deltas(
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    combination: str,
    density: float,
    params: MergeParams | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """One tensor's merged task vector (slerp needs the base tensor the deltas are relative to)."""
    params = params or MergeParams(combination=combination, density=density)
    column = weights.reshape(-1, *[1] * deltas[0].dim())
    if combination == "ties":
        return ties(deltas, weights, density)
    if combination == "magnitude_prune":
        return sum(weight * trim(delta, density) for weight, delta in zip(weights, deltas, strict=True))
    if combination == "linear":
        return (torch.stack(deltas) * column).sum(dim=0) / weights.sum()
    if combination == "task_arithmetic":
        return params.scale * (torch.stack(deltas) * column).sum(dim=0)
    if combination.startswith("breadcrumbs"):
        kept = torch.stack([without_outliers(delta, density, params.gamma) for delta in deltas])
        mixed = (
            elected_sum(kept, column, normalize=False)
            if combination == "breadcrumbs_ties"
            else (kept * column).sum(dim=0)
        )
        return params.scale * mixed
    if combination.startswith("della"):
        kept = torch.stack([della_drop(delta, density, params.epsilon) for delta in deltas])
        mixed = elected_sum(kept, column, normalize=True) if combination == "della" else (kept * column).sum(dim=0)
        return params.scale * mixed
    if combination == "model_stock":
        return model_stock(deltas)
    if combination == "slerp":
        return slerp(base + deltas[0], base + deltas[1], params.t) - base
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


def merge_checkpoints(
    base_dir: Path,
    model_dirs: list[Path],
    out_dir: Path,
    combination: str,
    density: float,
    weights: list[float],
    seed: int = 0,
    shard_bytes: int = SHARD_BYTES,
    params: MergeParams | None = None,
) -> Path:
    """Stream-merge full checkpoints into out_dir (safetensors shards + config + tokenizer)."""
    torch.manual_seed(seed)
    base = _Checkpoint(base_dir)
    models = [_Checkpoint(d) for d in model_dirs]
    for directory, model in zip(model_dirs, models, strict=True):
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
            merged = (
                base_tensor.float()
                + merge_deltas(deltas, weight_tensor, combination, density, params, base_tensor.float())
            ).to(base_tensor.dtype)
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


def merge_adapters(
    base_dir: Path,
    adapter_dirs: list[Path],
    out_dir: Path,
    combination: str,
    density: float,
    weights: list[float],
    seed: int = 0,
) -> Path:
    """Merge LoRA adapters with peft, then fold the result into the base weights. The SVD
    variants keep the sum of the adapters' ranks (peft's default, the largest, would truncate
    the merged delta); DARE's drop is seeded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    names = [f"adapter_{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, directory in zip(names[1:], adapter_dirs[1:], strict=True):
        model.load_adapter(directory, adapter_name=name)
    options = (
        {}
        if combination == "task_arithmetic"
        else {"density": density, "svd_rank": sum(model.peft_config[name].r for name in names)}
    )
    torch.manual_seed(seed)
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

    def run(
        self,
        model_dir: Path,
        task: TaskData,
        out_dir: Path | None,
        params: MergeParams,
        on_epoch: EpochCallback | None = None,
    ) -> Path | None:
        if out_dir is None:  # a sweep trial: the hook keeps what it keeps, as after a training epoch
            with tempfile.TemporaryDirectory(prefix="merged-") as scratch:
                self.run(model_dir, task, Path(scratch) / "merged", params, on_epoch)
            return None
        paths = params.model_paths
        adapters = [(path / "adapter_config.json").exists() for path in paths]
        if any(adapters) and not all(adapters):
            raise ParamError("models: merge either all full checkpoints or all LoRA adapters, not a mix")
        if all(adapters) and params.combination not in ADAPTER_COMBINATIONS:
            raise ParamError(
                f"combination={params.combination!r}: LoRA adapters merge with {', '.join(ADAPTER_COMBINATIONS)}"
            )
        merge = merge_adapters if all(adapters) else merge_checkpoints
        options = {"seed": params.seed} if all(adapters) else {"seed": params.seed, "params": params}
        out = merge(
            Path(model_dir), paths, Path(out_dir), params.combination, params.density, params.weight_values, **options
        )
        if on_epoch is not None:
            on_epoch(1, out, True)
        return out
