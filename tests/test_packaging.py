"""The project installs as one import package, `unlearn_sweep`, and works from a wheel:
nothing else at top level, search spaces shipped as package data, no shadowing by a user's
own `methods/` or `evaluation/` folder."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from packaging.requirements import Requirement

DECOY = 'raise ImportError("a decoy folder of the user\'s was imported")\n'


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding only the project's wheel (--no-deps); the dependencies come
    from this environment's site-packages through a .pth line, so nothing is downloaded."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build leaves build/lib behind, whose stale modules a later wheel would ship.
    source = root / "source"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            "toy_task",
            "mlruns",
            "sweeps",
            "mlflow.db",
            ".torch_extensions",
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("unlearn_sweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("unlearn_sweep-")} == {"unlearn_sweep"}
    assert "unlearn_sweep/search_spaces/npo.yaml" in names

    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (env_site,) = (env / "lib").glob("python3*/site-packages")
    (env_site / "project_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return env


def run_in(env: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_wheel_works_beside_decoy_folders(wheel_env: Path, toy_task_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "user_project"
    for name in ("methods", "evaluation", "corpus", "orchestrator"):
        (workdir / name).mkdir(parents=True)
        (workdir / name / "__init__.py").write_text(DECOY)
    python, cli = str(wheel_env / "bin" / "python"), str(wheel_env / "bin" / "unlearn-sweep")

    listed = run_in(wheel_env, workdir, cli, "methods")
    assert listed.returncode == 0, listed.stderr
    assert "npo" in listed.stdout and "sugd" in listed.stdout and "  slerp: t\n" in listed.stdout
    # `python -m` puts the working directory first on sys.path: the decoys must not be reached.
    as_module = run_in(
        wheel_env,
        workdir,
        python,
        "-m",
        "unlearn_sweep.orchestrator.cli",
        "validate-data",
        "--data",
        str(toy_task_dir / "data"),
    )
    assert as_module.returncode == 0, as_module.stderr

    spaces = run_in(
        wheel_env,
        workdir,
        python,
        "-c",
        "from unlearn_sweep.methods.registry import method_names\n"
        "from unlearn_sweep.orchestrator.search import load_space\n"
        "import unlearn_sweep.orchestrator.search as s\n"
        "print(s.__file__)\n"
        "print(sorted(m for m in method_names() if load_space(m)['params'] is not None))",
    )
    assert spaces.returncode == 0, spaces.stderr
    installed_at, loaded = spaces.stdout.splitlines()
    assert str(wheel_env) in installed_at and str(REPO_ROOT) not in installed_at
    assert "'merge'" in loaded and "'npo'" in loaded

    for generic in ("methods", "evaluation", "corpus", "orchestrator"):
        # From a folder without decoys: only `unlearn_sweep` was installed.
        missing = run_in(wheel_env, tmp_path, python, "-c", f"import {generic}")
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr, generic


# Each layer imports only the layers below it: corpus (data and token batches) is the ground
# floor; methods and evaluation stand on it side by side; the orchestrator on all of them.
LAYERS_BELOW = {
    "corpus": set(),
    "methods": {"corpus"},
    "evaluation": {"corpus"},
    "search_spaces": set(),
    "orchestrator": {"corpus", "methods", "evaluation", "search_spaces"},
}


def test_no_import_runs_back_up_the_layers() -> None:
    import ast

    wrong = []
    for layer, allowed in LAYERS_BELOW.items():
        for module in sorted((REPO_ROOT / layer).glob("*.py")):
            for node in ast.walk(ast.parse(module.read_text())):
                names = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom) and node.module
                    else [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "unlearn_sweep" and len(parts) > 1 and parts[1] not in allowed | {layer}:
                        wrong.append(f"{module.relative_to(REPO_ROOT)} imports {name}")
    assert not wrong, wrong


def gpu_bundle():
    """benchmarks/gpu_bundle.py, the carry folder for the lent GPU machine."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        import gpu_bundle
    finally:
        sys.path.pop(0)
    return gpu_bundle


def test_the_gpu_bundle_resolves_the_projects_pins_against_the_machines_versions() -> None:
    """Resolved for the machine: its torch (never carried), its versions where the project's
    pins take them; Transformers carried, as the machine's 5.17 is older than the pin; Ray
    without the cluster extras."""
    bundle = gpu_bundle()
    wanted, machine_pins = bundle.requirements()
    names = {Requirement(line).name for line in wanted}
    assert "torch" not in names and "transformers" in names
    assert any(line.startswith("ray[tune]") for line in wanted)
    assert "torch==2.11.0" in machine_pins and "accelerate==1.15.0" in machine_pins
    assert not any(pin.startswith("transformers") for pin in machine_pins)
    closure = {"torch": "2.11.0", "transformers": "5.23.0", "accelerate": "1.15.0", "peft": "0.21.2", "ray": "2.60.0"}
    assert sorted(bundle.carried(closure, machine_pins)) == ["peft", "ray", "transformers"]


def test_the_gpu_bundle_keeps_bitsandbytes_for_the_machines_cuda_only(tmp_path: Path) -> None:
    bundle = gpu_bundle()
    kept = ["bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so", "ray/tune/tune.py"]
    cut = [
        "bitsandbytes/libbitsandbytes_cuda128.so",
        "bitsandbytes/libbitsandbytes_cuda132.so",
        "bitsandbytes/libbitsandbytes_rocm715.so",
        "ray/jars/ray_dist.jar",
        "mlflow/server/js/build/index.html",
        "bin/ray",
    ]
    for name in kept + cut:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert bundle.trim(tmp_path) == len(cut)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_the_build_requirement_admits_no_setuptools_that_rejects_the_license_field() -> None:
    """`license = "Apache-2.0"` (an SPDX expression) is read by setuptools 77 and later; 76
    stops at `project.license must be valid exactly by one definition` (seen with pip wheel
    --no-build-isolation, as the GPU check installs the project beside a machine's setuptools)."""
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)
    (setuptools,) = [Requirement(line) for line in pyproject["build-system"]["requires"]]
    assert setuptools.name == "setuptools" and not setuptools.specifier.contains("76.1.0")


def test_every_benchmark_imports_and_reads_its_arguments() -> None:
    """CI runs no benchmark (they take minutes to hours, some need a GPU): each one's imports and
    argument parser are checked here, so a change to what they use fails here, not the next run."""
    check = (
        "import contextlib, importlib, io, pathlib, sys\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "for path in sorted(pathlib.Path('benchmarks').glob('*.py')):\n"
        "    sys.argv = [path.name, '--help']\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):\n"
        "        importlib.import_module(path.stem).main()\n"
        "    assert shown.getvalue().startswith('usage:'), path\n"
        "    print(path.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == sorted(path.name for path in (REPO_ROOT / "benchmarks").glob("*.py"))
