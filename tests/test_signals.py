"""The signal protocol's logic, run everywhere: classification of recorded SLURM views, the job history, the hang
watchdog, the rendezvous timeout and run-directory ownership, with real processes where it matters.

The SLURM views in tests/data/slurm_signal_views.json were recorded on the project's test cluster (Slurm 22.05.8):
a job step that, on each signal, ran `scontrol show job --oneliner $SLURM_JOB_ID` and
`sacct --noheader --parsable2 --allocations --jobs $SLURM_JOB_ID --format JobID,State,Reason`, while the job was
cancelled (`scancel`), signalled (`scancel --signal=TERM|USR2`), requeued (`scontrol requeue`), or reached its time
limit (with `--signal=USR2@60`, and without a signal).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpctrain.process import history
from hpctrain.process.slurm_view import (Cause, JobView, classify, combine, parse_duration_s, parse_sacct_state,
                                        requeue)
from hpctrain.process.stop import StopProtocol as StopFlag
from hpctrain.process.watchdog import Watchdog

from . import zygote
from .conftest import PYTHON, REPO, launch, tiny_overrides

VIEWS = json.loads((Path(__file__).parent / "data" / "slurm_signal_views.json").read_text())["views"]


def recorded_view(name: str) -> dict:
    return next(view for view in VIEWS if view["name"] == name)


@pytest.mark.parametrize("name", [view["name"] for view in VIEWS])
def test_recorded_slurm_views_are_classified_as_the_cluster_meant(name: str) -> None:
    recorded = recorded_view(name)
    view = JobView.parse(recorded["scontrol"], accounting_state=parse_sacct_state(recorded["sacct"]))
    cause, why = classify([recorded["signal"]], view, restart_count=recorded["restart_count"],
                          signal_delay_s=recorded["signal_delay_s"])
    assert cause.value == recorded["expected"], why


def test_what_the_recorded_views_hold() -> None:
    cancel = JobView.parse(recorded_view("scancel")["scontrol"])
    assert cancel.job_state == "COMPLETING" and cancel.restarts == 0  # COMPLETING hides the cancel: sacct tells
    assert parse_sacct_state(recorded_view("scancel")["sacct"]) == "CANCELLED"
    requeue = JobView.parse(recorded_view("scontrol_requeue_sacct_lagging")["scontrol"])
    assert requeue.job_state == "COMPLETING" and requeue.restarts == 1  # Restarts already counts the requeue
    limit = JobView.parse(recorded_view("time_limit_usr2")["scontrol"])
    assert limit.time_limit_s == 120 and limit.run_time_s == 35 and limit.time_left_s == 85


def test_an_ending_job_is_never_requeued_by_a_sigterm_unless_configured() -> None:
    recorded = recorded_view("scancel")
    # sacct not updated yet: COMPLETING, no requeue under way, time to spare -> the job is being ended.
    view = JobView.parse(recorded["scontrol"], accounting_state="RUNNING")
    assert classify(["SIGTERM"], view, restart_count=0, signal_delay_s=120)[0] is Cause.CANCELLED
    # Clusters where SLURM's view does not tell: launcher.sigterm decides.
    assert classify(["SIGTERM"], view, restart_count=0, signal_delay_s=120, sigterm="requeue")[0] is Cause.PREEMPTED
    running = JobView.parse(recorded_view("scancel_signal_term")["scontrol"])
    assert classify(["SIGTERM"], running, restart_count=0, signal_delay_s=120, sigterm="cancel")[0] is Cause.CANCELLED
    # USR2 is never a cancel; a requeue already under way always wins over the setting.
    assert classify(["SIGUSR2"], running, restart_count=0, signal_delay_s=120, sigterm="cancel")[0] is Cause.PREEMPTED
    requeue = JobView.parse(recorded_view("scontrol_requeue")["scontrol"], accounting_state="REQUEUED")
    assert classify(["SIGTERM"], requeue, restart_count=0, signal_delay_s=120,
                    sigterm="requeue")[0] is Cause.REQUEUE_UNDER_WAY


def test_preemption_time_and_restarts() -> None:
    line = recorded_view("time_limit_usr2")["scontrol"]
    # Constructed from the recorded line: a preemption with GraceTime sets PreemptTime and shortens the time left.
    preempted = JobView.parse(line.replace("Restarts=0", "Restarts=0 PreemptTime=2026-11-23T20:25:30"))
    assert classify(["SIGTERM"], preempted, restart_count=0, signal_delay_s=60)[0] is Cause.PREEMPTED
    assert classify(["SIGUSR2"], preempted, restart_count=0, signal_delay_s=60)[0] is Cause.PREEMPTED
    # The same USR2 in the second attempt of a requeued job (SLURM_RESTART_COUNT=1, Restarts=1) is a time limit.
    second = JobView.parse(line.replace("Restarts=0", "Restarts=1"))
    assert classify(["SIGUSR2"], second, restart_count=1, signal_delay_s=60)[0] is Cause.TIME_LIMIT
    assert classify(["SIGUSR2"], second, restart_count=0, signal_delay_s=60)[0] is Cause.REQUEUE_UNDER_WAY
    assert classify(["SIGUSR2"], None, restart_count=0, signal_delay_s=60)[0] is Cause.PREEMPTED
    assert combine([Cause.TIME_LIMIT, Cause.CANCELLED]) is Cause.CANCELLED
    assert combine([Cause.PREEMPTED, Cause.REQUEUE_UNDER_WAY]) is Cause.REQUEUE_UNDER_WAY
    assert combine([Cause.PREEMPTED, Cause.TIME_LIMIT]) is Cause.TIME_LIMIT
    assert parse_duration_s("1-02:03:04") == 93784 and parse_duration_s("05:00") == 300
    assert parse_duration_s("UNLIMITED") is None and parse_duration_s("INVALID") is None


def test_the_stop_handler_takes_no_lock_and_still_wakes_the_classifier() -> None:
    """A handler runs between two bytecodes of whatever the main thread was doing, also of another handler when
    a second signal comes at once (SLURM's USR2, then SIGTERM). It used to set a threading.Event, whose lock the
    interrupted handler held: the nested one waited for it forever (test_loader's signal storm hung in a clean-clone
    run)."""
    flag = StopFlag()
    classified: list[list[str]] = []
    flag.start_classifier(lambda names: classified.append(names) or (Cause.PREEMPTED, "a test"))
    entered: list[str] = []

    def profile(frame, event: str, arg) -> None:
        if event == "call" and frame.f_code.co_name in ("__enter__", "acquire", "wait"):
            entered.append(frame.f_code.co_qualname)
        elif event == "c_call" and getattr(arg, "__name__", "") in ("__enter__", "acquire", "acquire_lock"):
            entered.append(repr(arg))

    sys.setprofile(profile)
    try:
        flag._handle(signal.SIGUSR2, None)
        flag._handle(signal.SIGTERM, None)
    finally:
        sys.setprofile(None)
    assert entered == []
    assert flag.is_set() and flag.signal_names() == ["SIGUSR2", "SIGTERM"]
    deadline = time.monotonic() + 10
    while len(flag.classified()) < 1 or classified[-1] != ["SIGUSR2", "SIGTERM"]:
        assert time.monotonic() < deadline, classified
        time.sleep(0.01)


def test_scontrol_requeue_outlives_the_signals_of_its_own_requeue(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """At a requeue SLURM sends SIGTERM to every process of the job step, the rank's own `scontrol requeue` among
    them: killed before it exited 0, the requeue it had made was recorded as SLURM's (a time-limit requeue then
    escaped launcher.max_num_timeout). This `scontrol` signals itself as slurmstepd would, then succeeds."""
    marker = tmp_path / "requeued"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = requeue ] || exit 1  # `scontrol show job`: SLURM cannot be asked, so requeue() just requeues
        kill -TERM $$
        kill -USR2 $$
        echo "$2" > {marker}
        """))
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}")
    assert requeue("7", restart_count=0) == (True, "requeued")
    assert marker.read_text() == "7\n"


def test_history_counts_each_attempt_once_and_lists_redone_steps(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    history.record_start(tmp_path, resume_step=0)
    history.record_end(tmp_path, "requeued_time_limit", step=84, message="85 s left")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    history.record_start(tmp_path, resume_step=84)
    history.record_end(tmp_path, "hung", step=90, message="rank 0 stuck")
    history.record_end(tmp_path, "hung", step=90, message="rank 1 stuck")  # two ranks report the same hang
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    history.record_start(tmp_path, resume_step=80)  # the hang left step 80 as the newest checkpoint
    events = history.read(tmp_path)
    assert history.count_ends(events, "41", "hung") == 1
    assert history.count_ends(events, "41", "requeued_time_limit") == 1
    assert history.count_ends(events, "42", "requeued_time_limit") == 0
    rows = history.attempts(events)
    assert [(r["restart"], r["reason"], r["redone"]) for r in rows] == [(0, "requeued_time_limit", 0),
                                                                       (1, "hung", 0), (2, None, 10)]
    text = "\n".join(history.format_history(tmp_path))
    assert "3 attempt(s)" in text and "requeued: time limit" in text and "10 redone" in text


def test_a_start_after_an_attempt_that_died_closes_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    history.record_start(tmp_path, resume_step=0)
    history.record_start(tmp_path, resume_step=20)  # the first one was SIGKILLed
    rows = history.attempts(history.read(tmp_path))
    assert [r["reason"] for r in rows] == ["lost", None]


def test_watchdog_fires_on_a_stalled_rank_and_not_while_paused_or_stepping() -> None:
    exits: list[int] = []
    dog = Watchdog(limit_s=0.6, rank=3, startup_limit_s=0.6, exit=exits.append)
    dog.start()
    for step in range(1, 8):  # steps well under the limit: no alarm
        dog.beat(step)
        time.sleep(0.1)
    with dog.paused("evaluation and checkpoint"):
        time.sleep(1.5)  # longer than the limit, but not timed
    assert exits == []
    deadline = time.monotonic() + 15  # now stop beating: it fires (then waits its 2 s grace)
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [75]


def test_auto_limit_follows_the_step_time() -> None:
    dog = Watchdog(limit_s=0, rank=0, exit=lambda code: None)
    assert dog.limit_s() == 300  # start-up
    dog.beat(1)
    dog._intervals.extend([4.0, 4.0, 4.0])
    assert dog.limit_s() == 120  # 30 x 4 s
    dog._intervals.extend([0.01] * 10)
    assert dog.limit_s() == 60  # never under a minute


def test_a_hung_rank_logs_its_stack_and_exits(tmp_path: Path) -> None:
    """A real process whose training loop stops beating: stacks on stderr, exit code 75, within the limit."""
    script = textwrap.dedent("""
        import logging, time
        from types import SimpleNamespace
        from hpctrain.process import watchdog
        logging.basicConfig(level=logging.INFO)
        config = SimpleNamespace(trainer=SimpleNamespace(watchdog_s=1.0))
        def stuck_in_a_collective():
            time.sleep(60)
        with watchdog.watching(config, rank=1):
            for step in range(1, 4):
                watchdog.beat(step)
                time.sleep(0.05)
            stuck_in_a_collective()
    """)
    started = time.monotonic()
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 75, result.stderr
    assert time.monotonic() - started < 40
    assert "rank 1 made no progress" in result.stderr and "after step 3" in result.stderr
    assert "stuck_in_a_collective" in result.stderr  # the stack of the stuck thread


def test_faulthandler_dumps_the_stacks_when_the_gil_is_held_and_a_fork_still_exits(tmp_path: Path) -> None:
    """The watchdog's backstop, faulthandler's timer: a training thread that holds the GIL (a C call that never
    returns; here a switch interval of 1000 s) keeps the watchdog thread from running, and faulthandler's own
    thread dumps the stacks anyway, without ending the process. And a child forked while the timer is armed exits
    normally (armed across the fork, CPython's finalizer waits forever for the timer's thread)."""
    script = textwrap.dedent("""
        import os, sys, time
        from hpctrain.process import watchdog
        watchdog.BACKSTOP_MARGIN_S = 0.5
        dog = watchdog.Watchdog(limit_s=1.0, rank=2, startup_limit_s=1.0).start()
        dog.beat(1)
        time.sleep(0.3)  # armed by now
        child = os.fork()
        if child == 0:
            sys.exit(0)  # a normal exit: the interpreter's finalizer runs
        for _ in range(100):
            if os.waitpid(child, os.WNOHANG)[0]:
                print("the forked child exited", flush=True)
                break
            time.sleep(0.05)
        else:
            os.kill(child, 9)
        def holding_the_gil(seconds):
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass
        dog.beat(2)
        sys.setswitchinterval(1000)
        holding_the_gil(3)
        dog.beat(3)  # before any other thread runs: the watchdog itself must not fire
        sys.setswitchinterval(0.005)
        dog.stop()
        print("done", flush=True)
    """)
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout == "the forked child exited\ndone\n", result.stdout + result.stderr
    assert "Timeout (0:00:01.500000)!" in result.stderr and "in holding_the_gil" in result.stderr, result.stderr
    assert "made no progress" not in result.stderr


class HangInLoaderWorker:
    """A batch transform that deadlocks in a loader worker after a few batches (never in the training process)."""

    def __init__(self) -> None:
        self.batches = 0

    def __call__(self, batch):
        import torch.utils.data

        self.batches += 1
        if torch.utils.data.get_worker_info() is not None and self.batches > 4:
            wait_forever_in_worker()
        return batch


def wait_forever_in_worker() -> None:
    import threading

    threading.Event().wait()


@pytest.mark.slow
def test_a_deadlocked_loader_worker_is_found_and_its_stack_shown(tmp_path: Path, tiny_data: Path) -> None:
    """The watchdog of the rank fires, its own stacks and its loader worker's stacks are on stderr, exit code 75."""
    result = launch(tiny_overrides(tiny_data, "data.num_workers=1", "trainer.watchdog_s=5", "trainer.max_steps=400",
                                   "data.transforms=[{_target_: tests.test_signals.HangInLoaderWorker}]"),
                    run_dir=tmp_path, check=False, timeout=240)
    assert result.returncode == 75, result.stderr[-3000:]
    assert "rank 0 made no progress" in result.stdout + result.stderr
    worker = result.stderr.split("--- hpctrain watchdog: Python stacks of loader worker pid")[1]
    assert "wait_forever_in_worker" in worker and "HangInLoaderWorker" not in worker.split("\n")[0], worker[:3000]


def local_ranks(launcher: int) -> list[int]:
    """The pids of a launcher's local ranks: the children of its forkserver (hpctrain.job)."""
    def children(pid: int) -> list[int]:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    servers = [pid for pid in children(launcher) if "forkserver" in Path(f"/proc/{pid}/cmdline").read_text()]
    return [rank for server in servers for rank in children(server)]


def two_local_ranks_past_a_checkpoint(run_dir: Path, overrides: list[str]) -> tuple[zygote.Child, list[int]]:
    """`python -m hpctrain.launch overrides` with two local ranks, a child of the zygote (a real launcher process,
    its ranks forked from its own forkserver), once its first checkpoint is complete: the launcher and its ranks'
    pids. The launcher is killed if it gets no further."""
    from hpctrain.run.checkpoint import CheckpointManager

    command = [PYTHON, "-m", "hpctrain.launch", *overrides, f"hydra.run.dir={run_dir}"]
    job = zygote.start(command, cwd=REPO, output=run_dir.parent / f"{run_dir.name}.log", merge_stderr=True)
    try:
        manager = CheckpointManager(run_dir, keep_last=2)
        deadline = time.monotonic() + 300
        while not manager.complete() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        ranks = local_ranks(job.pid)
        assert len(ranks) == 2, ranks
    except BaseException:
        job.kill()
        raise
    return job, ranks


@pytest.mark.slow
def test_a_stopped_local_rank_ends_the_local_job(tmp_path: Path, tiny_data: Path) -> None:
    """launcher.num_processes=2; one rank SIGSTOPped mid-training: the other's watchdog ends it, and the launcher
    kills the stopped one (which cannot take SIGTERM) instead of waiting for it forever. A checkpoint every step:
    the stop may land in a checkpoint's collectives too, which the watchdog times like a step's."""
    job, ranks = two_local_ranks_past_a_checkpoint(tmp_path, tiny_overrides(
        tiny_data, *EVERY_STEP_CHECKPOINTED, "launcher.num_processes=2", "trainer.watchdog_s=5"))
    os.kill(ranks[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        job.wait(timeout=120)
    finally:
        job.kill()
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output, _ = job.read_output()
    elapsed = time.monotonic() - stopped_at
    print(f"the local job ended {elapsed:.1f} s after a rank was stopped (watchdog_s=5)")
    assert job.returncode != 0 and "made no progress" in output, output[-3000:]
    assert "local ranks failed" in output and "75" in output, output[-3000:]
    assert not Path(f"/proc/{ranks[1]}").exists() or "Z" in Path(f"/proc/{ranks[1]}/stat").read_text().split()[2]


@pytest.mark.slow
def test_local_ranks_end_when_their_launcher_is_killed(tmp_path: Path, tiny_data: Path) -> None:
    """SIGKILL of a launcher of two local ranks mid-training: the ranks end too, within seconds. Their parent is
    the forkserver, which lives as long as any process it forked, so the kernel's parent-death signal never comes;
    each rank watches the launcher that started it instead."""
    # A run that would take hours: the ranks can only end by the kill.
    job, ranks = two_local_ranks_past_a_checkpoint(tmp_path, tiny_overrides(
        tiny_data, *LINGER[1:], "trainer.max_steps=1000000", "launcher.num_processes=2"))
    job.kill()
    job.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has ended
        except OSError:
            return False

    deadline = time.monotonic() + 20
    alive = ranks
    try:
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [pid for pid in ranks if running(pid)]
        assert not alive, f"ranks {alive} outlived their killed launcher"
    finally:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_rank_alone_gives_up_after_the_rendezvous_timeout(tmp_path: Path) -> None:
    """Rank 0 of 2 with no rank 1 (it died at launch): fails after trainer.rendezvous_timeout_s, not 600 s."""
    script = textwrap.dedent("""
        from hpctrain.process.distributed import init_distributed, RendezvousError
        try:
            init_distributed(device_preference="cpu", timeout_s=600, rendezvous_timeout_s=5)
        except RendezvousError as error:
            print("REFUSED", error)
    """)
    # Rank 0 waits for its workers, rank 1 for a master that never listens (another port): both at once.
    started = time.monotonic()
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29000 + os.getpid() % 1000 + rank)}
        processes.append(zygote.start([PYTHON, "-c", script], cwd=REPO, env=env, output=tmp_path / f"rank{rank}.out"))
    for process in processes:
        process.wait(timeout=300)
        stdout, stderr = process.read_output()
        elapsed = time.monotonic() - started
        assert "REFUSED" in stdout and "rendezvous_timeout_s=5" in stdout, stderr[-2000:]
        assert elapsed < 120, elapsed


LINGER = ["trainer.max_steps=400", "trainer.val_every_steps=1000", "callbacks.checkpoint.every_steps=5",
          "callbacks.early_stopping.enabled=false", "callbacks.metrics.plots=false"]
EVERY_STEP_CHECKPOINTED = [override.replace("every_steps=5", "every_steps=1") for override in LINGER]


@pytest.mark.slow
def test_a_lingering_old_process_cannot_commit_into_a_run_taken_over_by_a_new_one(tmp_path: Path,
                                                                                  tiny_data: Path) -> None:
    """Old run stopped (SIGSTOP) mid-training; its directory deleted and re-created by a new run; the old one
    continued: it writes no checkpoint into the new run and ends with its reason."""
    from hpctrain.run.checkpoint import CheckpointManager

    run_dir = tmp_path / "run"
    command = [PYTHON, "-m", "hpctrain.launch", *tiny_overrides(tiny_data, *LINGER), f"hydra.run.dir={run_dir}"]
    old = zygote.start(command, cwd=REPO, output=tmp_path / "old.log", merge_stderr=True)
    manager = CheckpointManager(run_dir, keep_last=2)
    deadline = time.monotonic() + 300
    while not manager.complete() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(old.pid, signal.SIGSTOP)
    try:
        assert manager.complete(), "the old run wrote no checkpoint"
        shutil.rmtree(run_dir)
        launch(tiny_overrides(tiny_data, *LINGER[1:], "trainer.max_steps=10"), run_dir=run_dir)
        new_files = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
        owner = json.loads((run_dir / ".lock").read_text())
        assert owner["pid"] != old.pid and set(owner) == {"job_id", "host", "pid"}
    finally:
        os.kill(old.pid, signal.SIGCONT)
    assert old.wait(timeout=300) != 0
    output, _ = old.read_output()
    assert "was taken over" in output and f"\"pid\": {old.pid}" in output, output[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == new_files
    assert [info.step for info in manager.complete()] == [10, 5]


def test_a_checkpoint_commit_checks_the_lock_it_holds(tmp_path: Path) -> None:
    import torch

    from hpctrain.run.checkpoint import CheckpointManager
    from hpctrain.process.distributed import RunDirectoryTakenOver, run_lock

    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        manager = CheckpointManager(run_dir, keep_last=2)
        manager.save(1, {"w": torch.zeros(2)})
        manager.wait()  # its pruning too
        shutil.rmtree(run_dir)
        run_dir.mkdir()
        (run_dir / ".lock").write_text('{"job_id": "99", "host": "other", "pid": 1}')  # the new job's lock
        with pytest.raises(RunDirectoryTakenOver, match="job 99"):
            manager.save(2, {"w": torch.ones(2)})
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


@pytest.mark.slow
def test_a_refused_sweep_leaves_nothing(tmp_path: Path, tiny_data: Path) -> None:
    result = launch(["-m", "optim.lr=1e-3,-1", *tiny_overrides(tiny_data, "launcher=slurm"), "run_name=bad",
                     f"paths.runs_dir={tmp_path}"], check=False)
    assert result.returncode != 0 and "optim.lr must be > 0" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
