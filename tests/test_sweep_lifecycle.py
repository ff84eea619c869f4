"""A sweep's life beyond the happy path: Ctrl-C, a trial's worker killed, the driver killed
and the sweep resumed, the driver failing. Each drives a real sweep, most in a process of their
own, as a user's terminal would."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from test_sweep import LIGHT_EVAL, write_config
from unlearn_sweep.orchestrator import tracking
from unlearn_sweep.orchestrator.config import ConfigError, load_config
from unlearn_sweep.orchestrator.selection import leaderboard
from unlearn_sweep.orchestrator.sweep import SweepInterrupted, _parent_run, _recorded_interrupt, run_sweep

pytestmark = pytest.mark.e2e  # every test here runs a sweep on Ray


def wait_for_a_finished_trial(mlflow, config, driver: subprocess.Popen) -> None:
    """Until the sweep that driver runs has a finished trial in MLflow (at most 240 s)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        experiment = mlflow.get_experiment_by_name(config.experiment)
        if experiment and mlflow.search_runs([experiment.experiment_id], filter_string="tags.status = 'finished'"):
            return
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(1)
    pytest.fail("no trial finished in time")


def three_epoch_sweep(tmp_path: Path, toy_task_dir: Path, name: str, trials: int) -> tuple[Path, object]:
    """A sweep of grad_diff trials of three epochs, one at a time: long enough to catch one mid-way."""
    overrides = {"grad_diff": {"epochs": 3, "learning_rate": 1e-4}}
    path = write_config(
        tmp_path,
        toy_task_dir,
        name=name,
        trials=trials,
        max_concurrent_trials=1,
        search_space_overrides=overrides,
        **LIGHT_EVAL,
    )
    return path, load_config(path)


def wait_for_a_trial_mid_way(mlflow, config, driver: subprocess.Popen):
    """Until a trial of the sweep that driver runs has logged its first epoch and is still
    running (at most 240 s); returns its run."""
    deadline = time.time() + 240
    while time.time() < deadline:
        experiment = mlflow.get_experiment_by_name(config.experiment)
        for run in (
            mlflow.search_runs([experiment.experiment_id], filter_string="tags.status = 'running'")
            if experiment
            else []
        ):
            if "final_score" in run.data.metrics:
                return run
        assert driver.poll() is None, "the sweep ended before a trial was caught mid-way"
        time.sleep(0.5)
    pytest.fail("no trial reached its first epoch in time")


def start_sweep(path: Path, tmp_path: Path, resume: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unlearn_sweep.orchestrator.cli", "sweep", str(path)] + (["--resume"] if resume else []),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# What Ray, Optuna, MLflow, Tune and DeepSpeed printed before the live view; the first two are
# logged by every fresh sweep's driver (Ray's token notice only where RAY_AUTH_MODE is unset,
# MLflow's where the sweep creates its store).
LIBRARY_NOTICES = (
    "Started a local Ray instance",
    "A new study created",
    "Token authentication is enabled",
    "Creating initial MLflow database tables",
    "Configuration for experiment",
    "tensorboard",
    "Setting accelerator to CPU",
)


def listening_addresses(pid: int) -> set[str]:
    """The addresses the process and every process under it listen on (TCP)."""
    root = psutil.Process(pid)
    addresses = set()
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            addresses |= {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    return addresses


def test_ctrl_c_mid_epoch_ends_the_open_trial_run_killed_every_time(toy_task_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C while a trial is mid-epoch, to the driver alone on the sweep and to its whole process
    group on the resumed sweep: each time the open trial run ends KILLED and tagged
    interrupted (Tune's graceful stop looks like a scheduler's early stop from inside the trial,
    which recorded it as finished before), nothing is left running, the parent is interrupted
    and the driver says how to resume. The local Ray the driver starts listens on loopback only."""
    path, config = three_epoch_sweep(tmp_path, toy_task_dir, "stopped", 3)
    mlflow = tracking.client(config.tracking_uri)
    for attempt, target in enumerate(("driver", "process group")):
        driver = start_sweep(path, tmp_path, resume=attempt > 0)
        try:
            in_flight = wait_for_a_trial_mid_way(mlflow, config, driver)
            if attempt == 0:
                addresses = listening_addresses(driver.pid)
                assert addresses and addresses <= LOOPBACK, addresses
            if target == "driver":
                driver.send_signal(signal.SIGINT)
            else:
                os.killpg(driver.pid, signal.SIGINT)
            output, error = driver.communicate(timeout=180)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)  # the Ray cluster the driver started, if still there
        assert driver.returncode == 130, (target, error)
        # A quiet console: the sweep's own header first, no library's notices (they are in its log).
        log = Path(config.storage_path) / config.name / "libraries.log"
        assert output.startswith(f"sweep 'stopped'{' resumed' if attempt else ''}: 3 trials of grad_diff on ")
        assert f"library messages go to {log}" in output.splitlines()[0]
        for notice in LIBRARY_NOTICES:
            assert notice not in output + error, notice
        if attempt == 0:
            assert all(notice in log.read_text() for notice in LIBRARY_NOTICES[:2])
        assert "--resume" in error.splitlines()[-1] and "no champion was registered" in error
        stopped = mlflow.get_run(in_flight.info.run_id)
        assert (stopped.info.status, stopped.data.tags["status"]) == ("KILLED", "interrupted"), target
        runs = mlflow.search_runs([in_flight.info.experiment_id])
        parent = next(run for run in runs if run.data.tags.get("role") == "sweep")
        assert parent.info.status == "KILLED" and parent.data.tags["status"] == "interrupted"
        assert int(parent.data.tags[tracking.INTERRUPTED_AT]) <= stopped.info.end_time
        assert not any(run.info.status == "RUNNING" for run in runs)
        assert all(run.info.status == "KILLED" for run in runs if run.data.tags.get("status") == "interrupted")
    assert not mlflow.search_registered_models(f"name = '{config.experiment}'")


def test_an_interrupt_is_on_record_before_tune_is_asked_to_stop() -> None:
    """The driver tells the sweep's run when Ctrl-C came before it hands the stop to Tune (its
    SIGUSR1), so that every trial Tune then stops can read it; a second Ctrl-C stops at once;
    the handlers are the caller's again afterwards."""
    told, stops = [], []
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with _recorded_interrupt(told.append) as interrupt:
        signal.signal(signal.SIGUSR1, lambda signum, frame: stops.append(list(told)))  # Tune's, set in fit()
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 10
        while not stops and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert interrupt.at_ms and stops == [[interrupt.at_ms]]
    assert {number: signal.getsignal(number) for number in before} == before


def test_a_sweep_stopped_in_its_base_evaluation_is_interrupted_and_a_resumed_one_runs(
    toy_task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the base model was evaluated (minutes at 7B with the whole MMLU) ended the
    sweep's run FAILED, with a traceback; it is interrupted, and the sweep says to start it
    again (no trial had started: nothing to resume). A resumed sweep's run said interrupted
    until the resumed sweep ended: it is RUNNING again, under the threshold it recorded."""
    import unlearn_sweep.orchestrator.sweep as sweep_module

    config = load_config(write_config(tmp_path, toy_task_dir, mmlu_threshold=0.3))
    mlflow = tracking.client(config.tracking_uri)
    experiment = tracking.experiment_id(mlflow, config.experiment)

    def ctrl_c(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(sweep_module, "_threshold", ctrl_c)
        try:  # not pytest.raises: a KeyboardInterrupt let through would end the test session
            _parent_run(mlflow, experiment, config, resume=False, inputs={})
        except BaseException as error:
            stop = error
    assert isinstance(stop, SweepInterrupted) and not stop.resumable
    assert "interrupted while it evaluated the base model" in str(stop)
    (stopped,) = mlflow.search_runs([experiment])
    assert (stopped.info.status, stopped.data.tags["status"]) == ("KILLED", "interrupted")

    run_id, threshold = _parent_run(mlflow, experiment, config, resume=False, inputs={})  # started again
    assert threshold == 0.3
    sweep_module._mark_interrupted(mlflow, experiment, run_id, at_ms=None)  # a stop in its trials
    monkeypatch.setattr(sweep_module, "_threshold", ctrl_c)  # recorded: read, not computed again
    assert _parent_run(mlflow, experiment, config, resume=True, inputs={}) == (run_id, 0.3)
    resumed = mlflow.get_run(run_id)
    assert resumed.info.status == "RUNNING" and "status" not in resumed.data.tags


HANGING_UP_DRIVER = """if True:
    import json, signal, time
    from unlearn_sweep.orchestrator.sweep import _recorded_interrupt
    told, stops = [], []
    with _recorded_interrupt(told.append) as interrupt:
        signal.signal(signal.SIGUSR1, lambda signum, frame: stops.append(1))  # Tune's, set in fit()
        print("ready", flush=True)
        deadline = time.time() + 60
        while not stops and time.time() < deadline:
            time.sleep(0.05)
        for _ in range(100):  # what a stopping sweep prints, to the terminal that is gone
            print("stopping", flush=True)
    open({result!r}, "w").write(json.dumps({{"at_ms": interrupt.at_ms, "told": told}}))
"""


def test_a_closed_terminal_stops_the_sweep_on_record(tmp_path: Path) -> None:
    """Closing the terminal or ssh session of a sweep sent it SIGHUP, whose default ended the
    driver at once: the sweep's run and its trials' runs stayed RUNNING for ever (seen with
    `demo`). A hang-up now stops it as Ctrl-C does, on record, and the stop's output no longer
    goes to the closed terminal (EIO)."""
    import pty
    import select

    result = tmp_path / "result.json"
    pid, terminal = pty.fork()  # the child's controlling terminal: closing it hangs the child up
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", HANGING_UP_DRIVER.format(result=str(result))])
    try:
        seen, deadline = b"", time.monotonic() + 120
        while b"ready" not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([terminal], [], [], 1)[0]:
                seen += os.read(terminal, 4096)
    finally:
        os.close(terminal)
    deadline = time.monotonic() + 120
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the driver did not end after its terminal closed")
        time.sleep(0.1)
    assert os.waitstatus_to_exitcode(ended[1]) == 0, seen.decode(errors="replace")
    recorded = json.loads(result.read_text())
    assert recorded["at_ms"] and recorded["told"] == [recorded["at_ms"]]


def test_a_sweep_under_nohup_outlives_its_terminal() -> None:
    """`nohup` starts a command with SIGHUP ignored so that it outlives its terminal: the
    driver's stop handling leaves it so."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _recorded_interrupt(lambda at_ms: None):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.parametrize("ignored", [False, True], ids=["hang-up", "under nohup"])
def test_every_command_stops_on_a_hang_up_as_on_ctrl_c_unless_under_nohup(ignored: bool) -> None:
    """Outside a sweep and the UI, a hang-up raises KeyboardInterrupt, as Ctrl-C, which cleans
    up what a command was writing (tests/test_toy_task.py, with SIGTERM); `nohup`'s SIG_IGN is
    kept."""
    code = f"""if True:
        import os, signal, time
        from unlearn_sweep.orchestrator.stopping import stops_as_ctrl_c
        if {ignored}:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            with stops_as_ctrl_c():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(1)
            print("went on")
        except KeyboardInterrupt:
            print("interrupted")
        assert signal.getsignal(signal.SIGHUP) == (signal.SIG_IGN if {ignored} else signal.SIG_DFL)
    """
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == ("went on\n" if ignored else "interrupted\n")


def test_a_trial_tune_stops_after_an_interrupt_closes_itself_interrupted(tmp_path: Path) -> None:
    """Tune's graceful stop looks, inside a trial, like a scheduler's early stop, and the trial's
    worker may close its run after the driver marked it (a Python 3.12 run of the Ctrl-C test:
    FINISHED/finished): the trial reads the interrupt on the sweep's run. A stop with no
    interrupt, or after one of a resumed sweep's earlier driver, is the scheduler's."""
    mlflow = tracking.client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = tracking.experiment_id(mlflow, "exp")
    parent = mlflow.create_run(experiment).info.run_id

    def stopped_trial(trial_id: str) -> tuple[str, str, str]:
        run_id = tracking.trial_run(mlflow, experiment, parent, trial_id, {"method": "npo", "params": {}}, None)
        tracking.close_stopped_trial(mlflow, run_id, parent)
        run = mlflow.get_run(run_id)
        return run.info.status, run.data.tags["status"], run.data.tags.get("stopped_early")

    assert stopped_trial("early") == ("FINISHED", "finished", "true")
    running = tracking.trial_run(mlflow, experiment, parent, "stopped", {"method": "npo", "params": {}}, None)
    time.sleep(0.01)
    tracking.record_interrupt(mlflow, parent, int(time.time() * 1000))
    tracking.mark_interrupted(mlflow, running)  # the driver, before the trial's worker closed it
    tracking.close_stopped_trial(mlflow, running, parent)
    run = mlflow.get_run(running)
    assert (run.info.status, run.data.tags["status"]) == ("KILLED", "interrupted")
    time.sleep(0.01)
    assert stopped_trial("resumed") == ("FINISHED", "finished", "true")


def test_a_trial_whose_worker_died_is_failed_and_never_selected(toy_task_dir: Path, tmp_path: Path) -> None:
    path, config = three_epoch_sweep(tmp_path, toy_task_dir, "dead-worker", 2)
    mlflow = tracking.client(config.tracking_uri)
    driver = start_sweep(path, tmp_path)
    try:
        victim = wait_for_a_trial_mid_way(mlflow, config, driver)
        os.kill(int(victim.data.tags["pid"]), signal.SIGKILL)  # the trial's worker, as the OOM killer would
        _, error = driver.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, error
    killed = mlflow.get_run(victim.info.run_id)
    assert (killed.info.status, killed.data.tags["status"]) == ("FAILED", "failed")
    assert victim.info.run_id not in {entry.run_id for entry in leaderboard(config.experiment, config.tracking_uri)}
    parent = mlflow.search_runs([victim.info.experiment_id], filter_string="tags.role = 'sweep'")[0]
    rows = json.loads(
        Path(mlflow.download_artifacts(parent.info.run_id, "sweep/leaderboard.json", str(tmp_path))).read_text()
    )
    dead = next(row for row in rows if row["trial_id"] == victim.data.tags["trial_id"])
    assert (dead["status"], dead["eligible"]) == ("failed", False)


def test_interrupted_sweep_resumes_without_duplicates(local_ray, toy_task_dir: Path, tmp_path: Path) -> None:
    path, config = three_epoch_sweep(tmp_path, toy_task_dir, "resumed", 3)
    driver = start_sweep(path, tmp_path)
    mlflow = tracking.client(config.tracking_uri)
    try:
        in_flight = wait_for_a_trial_mid_way(mlflow, config, driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        driver.wait()
    # The sweep recorded what it started with: a resume on another setting is refused before anything.
    assert (Path(config.storage_path) / config.name / "started_with.json").is_file()
    with pytest.raises(ConfigError, match=rf"field 'seed': {config.seed} at the sweep's start, {config.seed + 1} now"):
        run_sweep(dataclasses.replace(config, seed=config.seed + 1), resume=True)
    summary = run_sweep(config, resume=True)  # on the test's own Ray, not the killed driver's
    assert len(summary.rows) == 3 and all(row["status"] == "finished" for row in summary.rows)
    children = mlflow.search_runs(
        [mlflow.get_experiment_by_name(config.experiment).experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'",
    )
    finished = [run.data.tags["trial_id"] for run in children if run.data.tags["status"] == "finished"]
    assert sorted(finished) == sorted(row["trial_id"] for row in summary.rows)  # each finished trial once
    # The trial caught mid-way: its first run closed as interrupted, never continued; if Tune
    # started it again under the same id, that is a second attempt in a run of its own.
    first = mlflow.get_run(in_flight.info.run_id)
    assert (first.info.status, first.data.tags["status"]) == ("KILLED", "interrupted")
    for run in children:
        for name in ("final_score", "best_final_score"):
            steps = [metric.step for metric in mlflow.get_metric_history(run.info.run_id, name)]
            assert len(steps) == len(set(steps)), (run.data.tags, name, steps)  # MLflow never holds a step twice
    retried = [
        run
        for run in children
        if run.data.tags["trial_id"] == in_flight.data.tags["trial_id"] and run.info.run_id != first.info.run_id
    ]
    assert all(run.data.tags["attempt"] == "2" for run in retried)
    # The resumed sweep continued the same study: one Optuna trial per Tune trial, none left running.
    study = optuna.load_study(study_name=config.name, storage=config.study_storage)
    told = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    assert len(told) == 3 and not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # Resuming a finished sweep registers nothing new.
    versions = len(mlflow.search_model_versions(f"name = '{config.experiment}'"))
    run_sweep(config, resume=True)
    assert len(mlflow.search_model_versions(f"name = '{config.experiment}'")) == versions
    # A state file cut short (as Ray's own copy left one where the driver was killed while Tune
    # synced it) is refused in one line before anything starts: Tune would start the sweep over.
    # The sweep's run, left RUNNING by its killed driver, then says it was interrupted.
    runs = len(mlflow.search_runs([mlflow.get_experiment_by_name(config.experiment).experiment_id]))
    folder = Path(config.storage_path) / config.name
    for pattern, kept in (("search_gen_state-*.json", 0.0), ("experiment_state-*.json", 0.5)):
        mlflow.update_run(summary.parent_run_id, status="RUNNING")
        state = max(folder.glob(pattern))
        whole = state.read_bytes()
        state.write_bytes(whole[: int(len(whole) * kept)])
        with pytest.raises(ConfigError, match=rf"cannot be resumed: Tune's state file \S*{state.name} is cut short"):
            run_sweep(config, resume=True)
        state.write_bytes(whole)
        parent = mlflow.get_run(summary.parent_run_id)
        assert (parent.info.status, parent.data.tags["status"]) == ("KILLED", "interrupted")
    assert len(mlflow.search_runs([mlflow.get_experiment_by_name(config.experiment).experiment_id])) == runs


def test_a_driver_failure_ends_the_parent_run_failed(
    local_ray, toy_task_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from unlearn_sweep.orchestrator import sweep

    def broken(*args, **kwargs):
        raise RuntimeError("the driver broke")

    monkeypatch.setattr(sweep.Sweep, "_run_stages", broken)
    config = load_config(write_config(tmp_path, toy_task_dir, name="driver-fails"))
    with pytest.raises(RuntimeError, match="the driver broke"):
        run_sweep(config)
    mlflow = tracking.client(config.tracking_uri)
    parent = mlflow.search_runs(
        [mlflow.get_experiment_by_name(config.experiment).experiment_id], filter_string="tags.role = 'sweep'"
    )[0]
    assert (parent.info.status, parent.data.tags["status"]) == ("FAILED", "failed")
