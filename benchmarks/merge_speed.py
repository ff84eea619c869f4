"""TIES-merge two ~100M-parameter checkpoints: the streamed merge (methods/merge.py) against
the reference, peft's merge_utils applied tensor by tensor to state dicts held in memory.
Each runs in its own child process so that each one's peak memory (max RSS) is its own.

    python benchmarks/merge_speed.py [--params 100] [--density 0.5] [--dir /tmp/merge_bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LAYER = 4096 * 4096  # one square weight matrix: 16.8M parameters


def make_checkpoints(directory: Path, million: int) -> list[Path]:
    """A base and two fine-tuned variants with small dense deltas, as safetensors."""
    generator = torch.Generator().manual_seed(0)
    tensors = max(1, million * 1_000_000 // LAYER)
    base = {f"layers.{i}.weight": torch.randn(4096, 4096, generator=generator) for i in range(tensors)}
    paths = []
    for name, state in (("base", base), ("a", None), ("b", None)):
        path = directory / name
        path.mkdir(parents=True, exist_ok=True)
        if state is None:
            state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        save_file(state, path / "model.safetensors")
        (path / "config.json").write_text("{}")
        paths.append(path)
    return paths


def run_streamed(base: Path, a: Path, b: Path, out: Path, density: float) -> None:
    from unlearn_sweep.methods.merge import MergeParams, merge_checkpoints

    merge_checkpoints(base, out, MergeParams(models=f"{a},{b}", density=density), shard_bytes=256 * 2**20)


def run_reference(base: Path, a: Path, b: Path, out: Path, density: float) -> None:
    from peft.utils import merge_utils

    base_state, a_state, b_state = (load_file(p / "model.safetensors") for p in (base, a, b))
    weights = torch.tensor([1.0, 1.0])
    merged = {
        name: tensor + merge_utils.ties([a_state[name] - tensor, b_state[name] - tensor], weights, density)
        for name, tensor in base_state.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors")


def child(phase: str, directory: Path, density: float) -> None:
    torch.set_num_threads(2)
    import unlearn_sweep.methods.merge  # noqa: F401  (imports counted in the baseline, not the merge)
    from peft.utils import merge_utils  # noqa: F401

    base, a, b = (directory / n for n in ("base", "a", "b"))
    baseline_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    (run_streamed if phase == "streamed" else run_reference)(base, a, b, directory / f"out_{phase}", density)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "baseline_mib": baseline_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100, help="millions of parameters per checkpoint")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/merge_bench"))
    parser.add_argument("--phase", choices=("streamed", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args.phase, args.dir, args.density)
    make_checkpoints(args.dir, args.params)
    results = {}
    for phase in ("reference", "streamed"):
        output = subprocess.run(
            [sys.executable, __file__, "--phase", phase, "--dir", str(args.dir), "--density", str(args.density)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[phase] = json.loads(output.strip().splitlines()[-1])
    reference = load_file(args.dir / "out_reference" / "model.safetensors")
    streamed = {
        k: v for shard in sorted((args.dir / "out_streamed").glob("*.safetensors")) for k, v in load_file(shard).items()
    }
    same = reference.keys() == streamed.keys() and all(
        torch.allclose(reference[k], streamed[k], atol=1e-6) for k in reference
    )
    checkpoint_mib = (args.dir / "base" / "model.safetensors").stat().st_size / 2**20
    print(
        f"TIES merge of two {args.params}M-parameter checkpoints ({checkpoint_mib:.0f} MiB each), density "
        f"{args.density}"
    )
    for phase, result in results.items():
        print(
            f"  {phase:<10} {result['seconds']:7.2f} s   peak RSS {result['peak_mib']:7.0f} MiB "
            f"({result['peak_mib'] - result['baseline_mib']:.0f} MiB above the {result['baseline_mib']:.0f} MiB "
            "after imports)"
        )
    print(
        "  speed ratio (reference / streamed): "
        f"{results['reference']['seconds'] / results['streamed']['seconds']:.2f}x; identical result: {same}"
    )


if __name__ == "__main__":
    main()
