"""The stop protocol's state machine (hpctrain.process.stop), without SLURM: its states and transitions from
signals, classifications, the stop after the checkpoint and a hang; the release of handlers installed early; and
that the modules submitit unpickles a job from import no torch, so the protocol the job installs first precedes it.
The protocol against a real cluster: tests/test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpctrain.config import LauncherConfig
from hpctrain.process import history, slurm_view, stop
from hpctrain.process.slurm_view import Cause
from hpctrain.process.stop import TRANSITIONS, StopProtocol, StopState
from hpctrain.process.watchdog import Watchdog

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_every_state_has_its_transitions_and_only_the_ends_are_final() -> None:
    assert set(TRANSITIONS) == set(StopState)
    assert [state for state, targets in TRANSITIONS.items() if not targets] == [StopState.STOPPED]
    assert TRANSITIONS[StopState.HUNG] == TRANSITIONS[StopState.STOPPING] == {StopState.STOPPED}
    assert StopState.STOPPING not in TRANSITIONS[StopState.RUNNING]  # a stop needs a signal first


def test_signals_open_the_cause_and_the_classifier_closes_it_with_the_combined_cause() -> None:
    protocol = StopProtocol()
    answers = {1: (Cause.TIME_LIMIT, "85 s left"), 2: (Cause.CANCELLED, "sacct CANCELLED")}
    protocol.start_classifier(lambda names: answers[len(names)])
    assert protocol.state is StopState.RUNNING and not protocol.stop_requested()
    protocol._handle(signal.SIGUSR2, None)
    assert protocol.stop_requested()
    wait_for(lambda: protocol.state is StopState.TIME_LIMIT, "USR2 classified as a time limit")
    protocol._handle(signal.SIGTERM, None)  # the SIGTERM of a scancel: a cancel wins over the time limit
    wait_for(lambda: protocol.state is StopState.CANCELLED, "the SIGTERM classified, the cancel combined")
    assert [cause for cause, _ in protocol.classified()] == [Cause.TIME_LIMIT, Cause.CANCELLED]


@pytest.fixture
def slurm_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A task of job 41 whose `scontrol requeue` is recorded, not run; returns the requeued job ids."""
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    requeued: list[str] = []
    monkeypatch.setattr(stop, "requeue", lambda job_id, restart_count: requeued.append(job_id) or (True, "requeued"))
    return requeued


@pytest.mark.parametrize("max_num_timeout,reason", [(3, "requeued_time_limit"), (0, "time_limit_exhausted")])
def test_a_stop_after_the_checkpoint_acts_on_the_combined_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                slurm_task: list[str], max_num_timeout: int,
                                                                reason: str) -> None:
    protocol = StopProtocol()
    protocol.begin_run(LauncherConfig(name="slurm", max_num_timeout=max_num_timeout), tmp_path)
    protocol._handle(signal.SIGUSR2, None)
    protocol.causes.append((Cause.TIME_LIMIT, "85 s left"))  # what the classifier said at signal time
    monkeypatch.setattr(stop, "classify_now", lambda names, launcher: (Cause.PREEMPTED, "running, time to spare"))
    summary = protocol.finish({"step": 12, "finished": False})
    assert summary["stop_cause"] == "time_limit" and protocol.state is StopState.STOPPED
    assert protocol.outcome is not None and protocol.outcome.reason == reason
    assert slurm_task == (["41"] if reason == "requeued_time_limit" else [])
    assert [row["reason"] for row in history.attempts(history.read(tmp_path))] == [reason]
    with pytest.raises(RuntimeError, match="cannot stop from stopped"):
        protocol.finish(summary)


def test_an_array_element_is_named_as_the_element_never_as_its_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    slurm_task: list[str]) -> None:
    """One element of a job array has the array's id as its SLURM_JOB_ID, which scontrol and sacct take as every
    element: SLURM is asked about, and requeues, element 41_1 only."""
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    asked: list[str] = []
    monkeypatch.setattr(slurm_view, "query_job", lambda job, **_: asked.append(job))
    assert slurm_view.classify_now(["SIGUSR2"], LauncherConfig(name="slurm"))[0] is Cause.PREEMPTED
    protocol = StopProtocol()
    protocol.begin_run(LauncherConfig(name="slurm"), tmp_path)
    protocol._handle(signal.SIGUSR2, None)
    monkeypatch.setattr(stop, "classify_now", lambda names, launcher: (Cause.PREEMPTED, "preempted"))
    protocol.finish({"step": 3, "finished": False})
    assert asked == ["41_1"] and slurm_task == ["41_1"] and history.job_identity() == ("41_1", 0)


class StatesSeenByTheHangAction(StopProtocol):
    def act_on_hang(self, report: dict) -> None:
        self.state_when_acting = self.state  # after the stacks: the hang was reported before them
        super().act_on_hang(report)


def test_a_hang_is_the_state_the_watchdog_reports_and_it_requeues(tmp_path: Path, slurm_task: list[str]) -> None:
    protocol = StatesSeenByTheHangAction()
    protocol.begin_run(LauncherConfig(name="slurm"), tmp_path)
    exits: list[int] = []
    dog = Watchdog(limit_s=0.3, rank=0, startup_limit_s=0.3, exit=exits.append, listener=protocol)
    dog.start()
    dog.beat(5)
    wait_for(protocol.has_hung, "the watchdog's hang")
    wait_for(lambda: exits == [75], "the exit after the grace")
    assert protocol.state_when_acting is StopState.HUNG and protocol.has_hung()
    assert protocol.state is StopState.STOPPED and protocol.outcome.reason == "hung" and slurm_task == ["41"]
    assert history.read(tmp_path)[-1]["reason"] == "hung"


def test_released_handlers_deliver_a_signal_that_came_meanwhile() -> None:
    """The early install of a process that turns out not to be an srun task: the SIGTERM it held ends it now."""
    script = textwrap.dedent("""
        import os, signal
        from hpctrain.process.stop import StopProtocol
        protocol = StopProtocol()
        protocol.install()
        os.kill(os.getpid(), signal.SIGTERM)
        print("held", protocol.signal_names(), flush=True)
        protocol.release()
        print("not reached", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == -signal.SIGTERM and result.stdout == "held ['SIGTERM']\n", result.stderr


def test_the_modules_submitit_unpickles_a_job_from_import_no_torch() -> None:
    """TrainingJob and TuneWorker install the protocol first thing when called: nothing before that may import
    torch, a few seconds in which SLURM's USR2 would otherwise find no handler of ours."""
    script = ("import signal, sys, hpctrain.launching.slurm, hpctrain.tuning.worker\n"
              "print('torch' in sys.modules, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    # In a job step of a submitit job, where the handlers used to be installed at import.
    environment = {**os.environ, "SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0", "SUBMITIT_FOLDER": "/nonexistent"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=environment)
    assert result.stdout.split() == ["False", "True"], result.stderr  # no torch, and importing installs nothing
