"""Shared fixtures: the miniature task built once per session, and the real data if present."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per xdist worker, and in every process a test starts (a CLI run, a sweep's
# driver, its Ray workers): two threads each on two cores shared with the other worker spin
# against each other (the non-e2e tests ran 3:11 that way; the whole suite 15:05 against 13:29
# with every process on one). One thread each when run alone is needlessly slow.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


PREBUILT_TOY_TASK = "UNLEARN_SWEEP_TEST_TOY_TASK"  # a built task to reuse (`unlearn-sweep toy-task --out DIR`)


def pytest_sessionstart(session: pytest.Session) -> None:
    """With pytest-xdist (`make test` runs `-n 2`) the controller builds the toy task once,
    before the workers start (xdist starts them last), and hands it to them through the
    environment: one build (it uses both cores) instead of one per worker."""
    config = session.config
    if (
        os.environ.get(PREBUILT_TOY_TASK)
        or hasattr(config, "workerinput")
        or not getattr(config.option, "numprocesses", None)
    ):
        return
    from unlearn_sweep.corpus.toy_task import write_toy_task

    config.toy_task_root = Path(tempfile.mkdtemp(prefix="unlearn-sweep-toy-"))
    os.environ[PREBUILT_TOY_TASK] = str(write_toy_task(config.toy_task_root / "task", seed=0))


# The longest files first, longest to shortest (seconds in one run of `make test` here: 390, 360,
# 300, 240, 55, 50; every other file under 30): `make test` hands whole files to its two workers
# in this order (`--no-loadscope-reorder`), so that neither ends with a long file the other only
# waits out. xdist's own order, by the number of tests, started the lifecycle file's 11 long tests
# last: 13:29 against 12:53 for the whole suite on one machine.
LONGEST_FILES = (
    "test_sweep.py",
    "test_sweep_lifecycle.py",
    "test_cluster.py",
    "test_methods.py",
    "test_toy_task.py",
    "test_selection.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: a file's tests keep their order


def pytest_sessionfinish(session: pytest.Session) -> None:
    root = getattr(session.config, "toy_task_root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def toy_task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unlearn_sweep.corpus.toy_task import write_toy_task

    prebuilt = os.environ.get(PREBUILT_TOY_TASK)
    if prebuilt:
        return Path(prebuilt)
    return write_toy_task(tmp_path_factory.mktemp("toy") / "task", seed=0)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for the sweeps of one test module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def toy_task_args(
    task: Path, command: str, *options: str | Path, out: Path | None = None, model: Path | None = None
) -> list[str]:
    """The arguments of `unlearn-sweep COMMAND` on the toy task: its model (or `model`) and
    data, `--out out` where given, then the options."""
    args = [*command.split(), "--model", str(model or task / "model"), "--data", str(task / "data")]
    return args + (["--out", str(out)] if out is not None else []) + [str(option) for option in options]


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test where that folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def wait_until_ready(process: subprocess.Popen, ready: Callable[[subprocess.Popen], bool], log: Path) -> None:
    """Until `ready(process)` holds; fails with the tail of `log` (the process's output) if the
    process ends first or is not ready within two minutes."""
    deadline = time.monotonic() + 120
    while not ready(process):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def terminated_when(
    command: list[str],
    ready: Callable[[subprocess.Popen], bool],
    log: Path,
    env: dict[str, str] | None = None,
    stop: signal.Signals = signal.SIGTERM,
) -> tuple[int, str]:
    """Runs `command` and sends it `stop` (SIGTERM: a scheduler's stop; SIGKILL: the OOM killer)
    once `ready(process)` holds; its exit code and output. The output goes to `log`, not to a
    pipe that a child left running would hold open. Fails as `wait_until_ready` does."""
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_ready(process, ready, log)
        process.send_signal(stop)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    return process.returncode, log.read_text()
