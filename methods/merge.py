"""Merging unlearned models (ZJUKLAB's winning idea: merge an over- and an under-forgetting
model). Full checkpoints merge their task vectors relative to the base, tensor by tensor,
streamed from safetensors and written in shards, so that peak memory stays at one tensor
per input plus one output shard (a 7B model merges in bounded memory).

Each combination is a small class (mergekit's shape): the MergeParams knobs it reads, its
formula per tensor on the stacked deltas (delta_i = model_i - base, w_i the weights), and the
peft variant for LoRA adapters where one exists. They share one trim, one DARE drop and one
sign election. A new combination is a class here registered with @combination; the sweep
samples each knob only for the combinations that declare it (Merge.conditions).
LoRA adapters merge with peft's `add_weighted_adapter`, in the variants that act on the full
weight delta."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from unlearn_sweep.corpus.scratch import temporary_folder
from unlearn_sweep.corpus.semeval import TaskData
from unlearn_sweep.methods.registry import EpochCallback, Method, ParamError, register

SHARD_BYTES = 1024**3


@dataclass
class MergeParams:
    models: str = ""  # comma-separated checkpoints or LoRA adapters to merge
    combination: str = "ties"
    density: float = 0.5  # the fraction of each delta's entries kept (combinations that drop)
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
        if self.weights and len(self.weight_values) != len(self.model_paths):
            raise ParamError(f"weights: {len(self.weight_values)} given for {len(self.model_paths)} models")
        COMBINATIONS[self.combination].check(self)

    @property
    def model_paths(self) -> list[Path]:
        return [Path(part.strip()) for part in self.models.split(",") if part.strip()]

    @staticmethod
    def models_setting(paths: Iterable[str | Path]) -> str:
        """The `models` value naming these checkpoints (what `model_paths` reads back)."""
        return ",".join(map(str, paths))

    @property
    def weight_values(self) -> list[float]:
        if not self.weights:
            return [1.0] * len(self.model_paths)
        try:
            return [float(part) for part in self.weights.split(",")]
        except ValueError:
            raise ParamError(f"weights={self.weights!r}: expected comma-separated numbers") from None


class Combination:
    """One way to merge task vectors, tensor by tensor (mergekit's merge methods). `knobs` are
    the MergeParams fields it reads beyond the models: a sweep samples a knob only for the
    combinations that read it (Merge.conditions)."""

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()
    adapter_type: ClassVar[str | None] = None  # peft's add_weighted_adapter variant on full deltas B @ A

    @classmethod
    def check(cls, params: MergeParams) -> None:
        if "density" in cls.knobs and not 0 < params.density <= 1:
            raise ParamError(f"density={params.density}: must be in (0, 1]")

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        """The merged delta from the stacked deltas (models x tensor) and a weight column that
        broadcasts over them; `base` is the tensor the deltas are relative to."""
        raise NotImplementedError


COMBINATIONS: dict[str, type[Combination]] = {}


def combination(cls: type[Combination]) -> type[Combination]:
    COMBINATIONS[cls.name] = cls
    return cls


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly the int(density * n) entries largest in magnitude, zero the rest (TIES's
    trim and peft's magnitude pruning, which take the top k)."""
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[delta.abs().reshape(-1).topk(keep).indices] = True
    return delta * mask.reshape(delta.shape)


def agrees_with_majority(deltas: torch.Tensor) -> torch.Tensor:
    """TIES's sign election, the one every combination uses: per entry, the sign of the larger
    total mass over the models; True where a model's entry has that sign."""
    return deltas.sign() == torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)


def disjoint_mean(kept: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """peft's TIES and DARE-TIES: signs elected on the unweighted deltas, the weighted entries
    that agree averaged over how many agree."""
    agrees = agrees_with_majority(kept)
    return (kept * weights * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def weighted_consensus(kept: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mergekit's TIES consensus: signs elected on the weighted deltas, the agreeing entries
    summed, and (normalize) divided by the weight they carry."""
    weighted = kept * weights
    agrees = agrees_with_majority(weighted)
    mixed = (weighted * agrees).sum(dim=0)
    if not normalize:
        return mixed
    divisor = (weights * agrees).sum(dim=0)
    return mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def dare_drop(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (Yu et al. 2023): each entry kept with probability density, rescaled by 1 / density
    (peft's random pruning, one draw per model in order)."""
    if density >= 1:
        return deltas
    return torch.stack([merge_utils.random_pruning(delta, density, rescale=True) for delta in deltas])


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


@combination
class Ties(Combination):
    """TIES-merging (Yadav et al. 2023): trim each delta to its top `density`, elect signs,
    average the agreeing weighted entries (peft's definition)."""

    name, knobs, adapter_type = "ties", ("density", "weights"), "ties_svd"

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        return disjoint_mean(torch.stack([trim(delta, params.density) for delta in deltas]), weights)


@combination
class DareTies(Combination):
    name, knobs, adapter_type = "dare_ties", ("density", "weights", "seed"), "dare_ties_svd"

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        return disjoint_mean(dare_drop(deltas, params.density), weights)


@combination
class DareLinear(Combination):
    name, knobs, adapter_type = "dare_linear", ("density", "weights", "seed"), "dare_linear_svd"

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        return (dare_drop(deltas, params.density) * weights).sum(dim=0)


@combination
class MagnitudePrune(Combination):
    name, knobs, adapter_type = "magnitude_prune", ("density", "weights"), "magnitude_prune_svd"

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        return (torch.stack([trim(delta, params.density) for delta in deltas]) * weights).sum(dim=0)


@combination
class Linear(Combination):
    """The weighted average of the models (mergekit's `linear`): base + sum w_i delta_i / sum w_i."""

    name, knobs = "linear", ("weights",)

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        return (deltas * weights).sum(dim=0) / weights.sum()


@combination
class TaskArithmetic(Combination):
    """base + scale * sum w_i delta_i (mergekit's)."""

    name, knobs, adapter_type = "task_arithmetic", ("weights", "scale"), "cat"

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        return params.scale * (deltas * weights).sum(dim=0)


class SparsifiedSum(Combination):
    """Mergekit's generalized task arithmetic: each delta sparsified on its own, the kept entries
    summed weighted (or, where `elect`, the sign-elected consensus, divided by the weight it
    carries where `normalize`), times scale."""

    elect: ClassVar[bool] = False
    normalize: ClassVar[bool] = False

    @classmethod
    def sparsify(cls, delta: Tensor, params: MergeParams) -> Tensor:
        raise NotImplementedError

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        kept = torch.stack([cls.sparsify(delta, params) for delta in deltas])
        mixed = weighted_consensus(kept, weights, cls.normalize) if cls.elect else (kept * weights).sum(dim=0)
        return params.scale * mixed


@combination
class Breadcrumbs(SparsifiedSum):
    """Mergekit's: each delta keeps the `density` fraction of its entries after dropping the
    `gamma` fraction largest in magnitude; the weighted sum times scale."""

    name, knobs = "breadcrumbs", ("density", "weights", "scale", "gamma")

    @classmethod
    def check(cls, params: MergeParams) -> None:
        super().check(params)
        if not 0 <= params.gamma < 1:
            raise ParamError(f"gamma={params.gamma}: must lie in [0, 1)")

    @classmethod
    def sparsify(cls, delta: Tensor, params: MergeParams) -> Tensor:
        return without_outliers(delta, params.density, params.gamma)


@combination
class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs with TIES's sign election."""

    name, elect = "breadcrumbs_ties", True


@combination
class Della(SparsifiedSum):
    """Mergekit's DELLA: MAGPRUNE drops, elected signs, averaged over the weight kept; times scale."""

    name, knobs = "della", ("density", "weights", "scale", "epsilon", "seed")
    elect, normalize = True, True

    @classmethod
    def check(cls, params: MergeParams) -> None:
        super().check(params)
        if not (0 < params.density - params.epsilon and params.density + params.epsilon < 1):
            raise ParamError(f"epsilon={params.epsilon}: density +- epsilon must lie in (0, 1)")

    @classmethod
    def sparsify(cls, delta: Tensor, params: MergeParams) -> Tensor:
        return della_drop(delta, params.density, params.epsilon)


@combination
class DellaLinear(Della):
    """DELLA's drops, summed without sign election."""

    name, elect = "della_linear", False


@combination
class ModelStock(Combination):
    """Mergekit's Model Stock (Jang et al. 2024): base + t * mean delta_i with
    t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the deltas."""

    name = "model_stock"

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        flat = deltas.reshape(len(deltas), -1)
        cosines = [
            torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-6).clamp(-1, 1)
            for i, a in enumerate(flat)
            for b in flat[i + 1 :]
        ]
        cos = torch.stack(cosines).mean()
        denominator = 1 + (len(deltas) - 1) * cos
        ratio = torch.zeros(()) if denominator.abs() < 1e-6 else len(deltas) * cos / denominator
        return ratio * deltas.mean(dim=0)


@combination
class Slerp(Combination):
    """Two models, spherical interpolation at `t` on each flattened tensor (linear where they
    are near collinear)."""

    name, knobs = "slerp", ("t",)

    @classmethod
    def check(cls, params: MergeParams) -> None:
        if len(params.model_paths) != 2:
            raise ParamError("combination=slerp: merges exactly two models")
        if not 0 <= params.t <= 1:
            raise ParamError(f"t={params.t}: must lie in [0, 1]")

    @classmethod
    def merge(cls, deltas: Tensor, weights: Tensor, params: MergeParams, base: Tensor) -> Tensor:
        first, second, t = base + deltas[0], base + deltas[1], params.t
        a, b = first.reshape(-1).double(), second.reshape(-1).double()
        dot = (a / a.norm().clamp(min=1e-8) * (b / b.norm().clamp(min=1e-8))).sum().clamp(-1, 1)
        if dot.abs() > 0.9995:
            mixed = (1 - t) * first.double() + t * second.double()
        else:
            theta = torch.arccos(dot)
            mixed = ((torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)).reshape(base.shape)
        return mixed.to(base.dtype) - base


def merge_deltas(
    deltas: list[torch.Tensor], weights: torch.Tensor, params: MergeParams, base: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor's merged task vector (base: the tensor the deltas are relative to, zero if None)."""
    column = weights.reshape(-1, *[1] * deltas[0].dim()).to(deltas[0].dtype)
    base = torch.zeros_like(deltas[0]) if base is None else base
    return COMBINATIONS[params.combination].merge(torch.stack(deltas), column, params, base)


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


def merge_checkpoints(base_dir: Path, out_dir: Path, params: MergeParams, shard_bytes: int = SHARD_BYTES) -> Path:
    """Stream-merge the full checkpoints params.models into out_dir (safetensors shards +
    config + tokenizer)."""
    torch.manual_seed(params.seed)
    model_dirs = params.model_paths
    base = _Checkpoint(base_dir)
    models = [_Checkpoint(d) for d in model_dirs]
    for directory, model in zip(model_dirs, models, strict=True):
        if set(model.files) != set(base.files):
            raise ParamError(f"{directory}: its tensors differ from the base model's; merge needs one architecture")
    weights = torch.tensor(params.weight_values, dtype=torch.float32)
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
            original = base_tensor.float()
            deltas = [model.get(name).float() - original for model in models]
            merged = (original + merge_deltas(deltas, weights, params, original)).to(base_tensor.dtype)
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


def merge_adapters(base_dir: Path, out_dir: Path, params: MergeParams) -> Path:
    """Merge LoRA adapters with peft, then fold the result into the base weights. The SVD
    variants keep the sum of the adapters' ranks (peft's default, the largest, would truncate
    the merged delta); DARE's drop is seeded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    combination, adapter_dirs = COMBINATIONS[params.combination], params.model_paths
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    names = [f"adapter_{i}" for i in range(len(adapter_dirs))]
    model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
    for name, directory in zip(names[1:], adapter_dirs[1:], strict=True):
        model.load_adapter(directory, adapter_name=name)
    options = (
        {"density": params.density, "svd_rank": sum(model.peft_config[name].r for name in names)}
        if "density" in combination.knobs
        else {}
    )
    torch.manual_seed(params.seed)
    # peft's cat scales each adapter's B @ A by its weight: task arithmetic's scale goes there
    weights = [weight * params.scale for weight in params.weight_values] if "scale" in combination.knobs else None
    model.add_weighted_adapter(
        names, weights or params.weight_values, "merged", combination_type=combination.adapter_type, **options
    )
    model.set_adapter("merged")
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


@register
class Merge(Method):
    name = "merge"
    Params = MergeParams
    collective = False  # a streamed merge of saved checkpoints: rank 0's, where a launch trained them

    @classmethod
    def conditions(cls) -> dict[str, dict[str, list[str]]]:
        """Each knob sampled only for the combinations that read it."""
        knobs = {knob for combination in COMBINATIONS.values() for knob in combination.knobs}
        return {
            knob: {"combination": [name for name, combination in COMBINATIONS.items() if knob in combination.knobs]}
            for knob in sorted(knobs)
        }

    def run(
        self,
        model_dir: Path,
        task: TaskData,
        out_dir: Path | None,
        params: MergeParams,
        on_epoch: EpochCallback | None = None,
    ) -> Path | None:
        if out_dir is None:  # a sweep trial: the hook keeps what it keeps, as after a training epoch
            with temporary_folder("merged-") as scratch:
                self.run(model_dir, task, Path(scratch) / "merged", params, on_epoch)
            return None
        paths = params.model_paths
        adapters = [(path / "adapter_config.json").exists() for path in paths]
        if any(adapters) and not all(adapters):
            raise ParamError("models: merge either all full checkpoints or all LoRA adapters, not a mix")
        if all(adapters):
            if COMBINATIONS[params.combination].adapter_type is None:
                usable = [name for name, combination in COMBINATIONS.items() if combination.adapter_type]
                raise ParamError(f"combination={params.combination!r}: LoRA adapters merge with {', '.join(usable)}")
            out = merge_adapters(Path(model_dir), Path(out_dir), params)
        else:
            out = merge_checkpoints(Path(model_dir), Path(out_dir), params)
        if on_epoch is not None:
            on_epoch(1, out, True)
        return out
