"""The carry folder for the lent GPU machine: what `benchmarks/gpu_check.sh` imports and the
machine lacks, as Python 3.12 packages unpacked, trimmed and packed in one `site.tar.xz`, plus a
built toy task.

The machine (the device tool's KINDS.md, read 2026-11-17) runs Python 3.12 with torch 2.11
(CUDA 13), Transformers 5.17, accelerate, peft and the packages in MACHINE below, reaches no
network, and receives the working tree plus carried folders, 64 MiB in all (../shared does not
travel: the bundle carries the SemEval data the evaluation step reads). So the bundle
holds the project's pinned requirements resolved for that Python against the machine's torch,
less what the machine has in a version the project accepts; torch stays the machine's (its CUDA
build is what the check measures). Transformers is carried: 5.17 is older than the pin. Then
what the check never loads is cut (Ray's Java jars and web UI, rllib and serve, MLflow's UI,
bitsandbytes' libraries for other CUDA versions), and xz packs it (Ray's binaries alone are
29 MiB as a wheel, 16 MiB as xz).

    python benchmarks/gpu_bundle.py [--out .gpu_bundle]   # here, where PyPI is reachable
    python benchmarks/gpu_bundle.py --check               # try it (built first if absent): a
                                                          # Python 3.12 venv with the machine's
                                                          # torch and Transformers, the bundle
                                                          # unpacked, the smoke check

Then `device run` with `carry: [".gpu_bundle"]` and `bash benchmarks/gpu_check.sh`, which
unpacks it and installs the project from the working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT = 64 * 2**20  # the working tree and every carried folder together
PYTHON_VERSION = "3.12"
# pip matches a manylinux tag's glibc version exactly: name every one up to the machine's.
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64", "linux_x86_64"] + [
    f"manylinux_2_{minor}_x86_64" for minor in range(5, 40)
]
# Versions read on the machine; a package the project pins is carried when the machine's
# version is outside the pin. torch is never carried.
MACHINE_VERSIONS = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "tokenizers": "0.23.2",
    "huggingface-hub": "1.33.0",
    "safetensors": "0.8.0",
    "numpy": "2.5.2",
}
# Every package the machine's image holds (KINDS.md, 2026-11-17), versions unknown.
MACHINE = set(MACHINE_VERSIONS) | {
    canonicalize_name(name)
    for name in """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
    attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
    wheel wrapt xarray xxhash yarl zipp""".split()
}
# The extras the check needs of the requirements.
EXTRAS = {"ray": "[tune]"}  # not [default]: the dashboard and cluster agents of a multi-node Ray
# The machine's versions of these are unknown: peft follows Transformers' internals, and the
# project's build needs a setuptools that reads its license field.
ALWAYS_CARRIED = {"peft", "setuptools"}
SOURCE_ONLY = {"deepspeed", "rouge-score"}  # published as sdists; pure Python, built here
# What the check never loads, relative to the unpacked site folder.
TRIM = [
    "ray/jars",
    "ray/dashboard/client",
    "ray/rllib",
    "ray/serve",
    "ray/llm",
    "mlflow/server/js",
    "bitsandbytes/libbitsandbytes_cuda1[!3]*.so",
    "bitsandbytes/libbitsandbytes_cuda13[!0]*.so",
    "bitsandbytes/libbitsandbytes_rocm*.so",
    "bin",  # console scripts, whose first line names the Python that built the bundle
]


def requirements() -> tuple[list[str], list[str]]:
    """The check's requirements (the project's and its build's) and the pins to the machine's
    versions, from pyproject.toml."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {
        canonicalize_name(requirement.name): requirement.specifier
        for requirement in map(Requirement, pyproject["project"]["dependencies"])
    }
    wanted = list(pyproject["build-system"]["requires"]) + [
        f"{name}{EXTRAS.get(name, '')}{specifier}" for name, specifier in pinned.items() if name != "torch"
    ]
    machine_pins = [f"torch=={MACHINE_VERSIONS['torch']}"] + [
        f"{name}=={version}"
        for name, version in MACHINE_VERSIONS.items()
        if name != "torch" and (name not in pinned or pinned[name].contains(version))
    ]
    return wanted, machine_pins


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(wanted: list[str], machine_pins: list[str], wheels: Path, work: Path) -> dict[str, str]:
    """Name -> version of every package the check needs on Python 3.12 beside the machine's torch."""
    report = work / "report.json"
    pip(
        "install",
        "-q",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
        "--target",
        str(work / "unused"),
        "--find-links",
        str(wheels),
        *target_args(),
        *wanted,
        *machine_pins,
    )
    installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def carried(closure: dict[str, str], machine_pins: list[str]) -> dict[str, str]:
    """The packages of the closure the machine lacks, or has in a version the pins refuse."""
    kept = {canonicalize_name(Requirement(pin).name) for pin in machine_pins}
    return {
        name: version
        for name, version in closure.items()
        if name not in MACHINE or name in ALWAYS_CARRIED or (name in MACHINE_VERSIONS and name not in kept)
    }


def trim(site: Path) -> int:
    """Remove what the check never loads; the bytes removed."""
    removed = 0
    for pattern in TRIM:
        for path in site.glob(pattern):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            removed += sum(f.stat().st_size for f in files)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def tree_bytes() -> int:
    """Bytes of the working tree that travels: the tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def build(out: Path) -> Path:
    wanted, machine_pins = requirements()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as tmp:
        work = Path(tmp)
        wheels, site = work / "wheels", work / "site"
        source_only = [w for w in wanted if canonicalize_name(Requirement(w).name) in SOURCE_ONLY]
        # Built with this Python's torch (DeepSpeed's setup imports it); no ops: pure Python.
        pip(
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            *source_only,
            env={**os.environ, "DS_BUILD_OPS": "0"},
        )
        closure = resolve(wanted, machine_pins, wheels, work)
        packages = carried(closure, machine_pins)
        pip(
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            "--find-links",
            str(wheels),
            *target_args(),
            *(f"{name}=={version}" for name, version in sorted(packages.items())),
        )
        removed = trim(site)
        archive = out / "site.tar.xz"
        subprocess.run(
            ["tar", "-C", str(site), "-cf", str(archive), "--use-compress-program", "xz -9 -T0", "."], check=True
        )
    (out / "packages.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(packages.items())))
    # What the bundle expects the machine to hold, at the versions read there where known.
    on_machine = {**{n: v for n, v in closure.items() if n not in packages}, **MACHINE_VERSIONS}
    (out / "machine.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(on_machine.items())))
    # The real-size evaluation reads the public task data, which is beside the checkout, not in it.
    data = ROOT.parent / "shared" / "data" / "semeval25"
    if data.is_dir() and not (out / "semeval25").exists():
        shutil.copytree(data, out / "semeval25")
    toy_task = out / "toy_task"
    if not (toy_task / "toy_task.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "unlearn_sweep.orchestrator.cli", "toy-task", "--out", str(toy_task)], check=True
        )
    carry = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    total = carry + tree_bytes()
    print(
        f"{len(packages)} packages carried ({', '.join(sorted(packages))}); "
        f"{removed / 2**20:.1f} MiB trimmed; {archive} {archive.stat().st_size / 2**20:.1f} MiB; "
        f"{out} {carry / 2**20:.1f} MiB; with the working tree {total / 2**20:.1f} of 64 MiB"
    )
    if total > CARRY_LIMIT:
        sys.exit(f"{out}: {total / 2**20:.1f} MiB with the working tree, over the 64 MiB a device run carries")
    return out


def check(out: Path, python: str) -> None:
    """Install what the machine holds into a Python 3.12 venv (its torch, a CUDA build that also
    runs on a CPU, and its Transformers, which the bundle's shadows), then run the smoke check,
    which unpacks the bundle as it does on the machine."""
    venv = Path(tempfile.gettempdir()) / "gpu-bundle-venv"
    if not (venv / "bin" / "python").exists():
        # A pyenv shim is on the PATH for versions it does not select, and fails when run.
        found = shutil.which(python)
        if found is None or subprocess.run([found, "--version"], capture_output=True).returncode != 0:
            sys.exit(f"gpu_bundle: --python {python}: no runnable Python 3.12 here (give its path)")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    machine_side = (out / "machine.txt").read_text().split()
    # pip's constraint file on these machines caps torch; the machine's own is older anyway.
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            *machine_side,
            "pytest",
            "pytest-xdist",
        ],
        check=True,
        env={**os.environ, "PIP_CONSTRAINT": ""},
    )
    env = {**os.environ, "PYTHON": str(venv / "bin" / "python"), "SMOKE": "1", "BUNDLE": str(out)}
    subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out.parent / "gpu_bundle_check")], check=True, env=env
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--check", action="store_true", help="run the smoke check with it in a 3.12 venv")
    parser.add_argument("--python", default="python3.12", help="the Python 3.12 for --check")
    args = parser.parse_args()
    if not (args.check and (args.out / "site.tar.xz").is_file()):
        build(args.out)
    if args.check:
        check(args.out, args.python)


if __name__ == "__main__":
    main()
