"""A tune worker: ask the study for a trial, train it as a normal run in TUNE_DIR/trial_<number>, tell the study,
ask the next, until `n_trials` trials are taken; no barrier between workers.

Worker `i` marks the trial it is training as its own, under the study's ask lock, together with the ask: in
TUNE_DIR/workers/<i>/trial.json for the journal file, in the trial's user attribute `worker` for an RDB storage. A
worker that starts again with the same index (a requeued SLURM array element, the same command run again) finds
that trial still RUNNING in the study and resumes it from its run directory's newest checkpoint: the same trial
number, bit-exact with an uninterrupted trial.

A trial whose worker does not come back is found in two ways. With an RDB storage, by Optuna's heartbeats (the
worker records its trial's heartbeat while it trains; hpctrain.tuning.study, "Optuna's heartbeats"): once it is
older than the grace period, the next worker that asks fails it and Optuna's retry callback enqueues it again, as
a new trial whose `retried_trial_number` is the original; the worker that takes the retry trains it in the
original's run directory, so it resumes from the original's checkpoint. With the journal file, which has no
heartbeats, a RUNNING trial that no worker records (its worker died between the ask and the record) is taken over
by the next worker that asks.

The pruning decision is rank 0's (`TrialJudge`, given to the trainer as its evaluation_stop): at each evaluation
it reports the monitored value to the trial and asks the pruner; the trainer broadcasts the answer, so all ranks
stop at the same step boundary, with a checkpoint, and the run's stop reason starts with "pruned".

Under SLURM, `TuneWorker` creates the task's stop protocol (hpctrain.process.stop) and installs its handlers first
thing (unpickling it imports no torch); every trial runs under that one protocol, so a stop signal that came
between two trials stops the next one. A worker whose job has several tasks (launcher.nodes x
launcher.tasks_per_node) trains multi-rank trials: its rank 0 does all of the above and shares each trial with the
other ranks (hpctrain.tuning.ranks), which train it with it and never open the study.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import submitit

from hpctrain.config import Config
from hpctrain.launching import slurm
from hpctrain.process.stop import StopProtocol
from hpctrain.tuning.ranks import Assignment, TrialRanks
from hpctrain.tuning.space import trial_overrides
from hpctrain.tuning.study import (Heartbeat, StudySpec, ask_lock, ask_quietly, asked, claim, fail_stale,
                                   make_pruner, make_sampler, open_study, retried_from)

log = logging.getLogger(__name__)

WORKERS_DIRNAME = "workers"
TRIAL_RECORD = "trial.json"
ALIVE_LOCK = "alive.lock"


def worker_dir(tune_dir: Path, index: int) -> Path:
    return tune_dir / WORKERS_DIRNAME / str(index)


def trial_dirname(number: int) -> str:
    return f"trial_{number:04d}"


def recorded_trial(tune_dir: Path, index: int) -> int | None:
    try:
        return json.loads((worker_dir(tune_dir, index) / TRIAL_RECORD).read_text())["number"]
    except (OSError, ValueError, KeyError):
        return None


def _record_trial(tune_dir: Path, index: int, number: int | None) -> None:
    path = worker_dir(tune_dir, index) / TRIAL_RECORD
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"number": number, "pid": os.getpid()}))
    os.replace(temporary, path)


def worker_indices(tune_dir: Path) -> list[int]:
    directory = tune_dir / WORKERS_DIRNAME
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@contextlib.contextmanager
def alive(tune_dir: Path, index: int) -> Iterator[None]:
    """Held by a local worker while it lives, so that the same command run again leaves it alone."""
    directory = worker_dir(tune_dir, index)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ALIVE_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def is_alive_locally(tune_dir: Path, index: int) -> bool:
    path = worker_dir(tune_dir, index) / ALIVE_LOCK
    if not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


class TrialJudge:
    """Rank 0's evaluation_stop for the trainer: report the monitored value, ask the pruner (picklable: it opens
    the study in the process that trains)."""

    def __init__(self, spec: StudySpec, config: Config, trial_id: int) -> None:
        self.spec, self.config, self.trial_id = spec, config, trial_id
        self._trial: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "config": self.config, "trial_id": self.trial_id, "_trial": None}

    def __call__(self, step: int, value: float) -> str:
        import optuna

        try:
            if self._trial is None:
                study = open_study(self.spec, pruner=make_pruner(self.config.tune))
                self._trial = optuna.trial.Trial(study, self.trial_id)
            if not math.isfinite(value):
                return ""
            self._trial.report(value, step)  # a step reported before a resume is ignored by Optuna
            if self._trial.should_prune():
                return (f"pruned by tune.pruner={self.config.tune.pruner} at step {step} "
                        f"({self.spec.metric} {value:.5g})")
        except Exception as error:  # the storage out of reach: train on, unpruned
            log.warning("trial %d: could not report to the study: %s", self.trial_id, error)
        return ""


def _train_local(config: Config, run_dir: Path, judge: TrialJudge) -> dict[str, Any]:
    from hpctrain.launching.job import run_local

    return run_local(config, run_dir, work=_local_rank, args=(judge,))


def _local_rank(config: Config, run_dir: Path, judge: TrialJudge) -> dict[str, Any]:
    from hpctrain.launching.job import run_rank

    return run_rank(config, run_dir, evaluation_stop=judge)


def _slurm_trainer(stop: StopProtocol, ranks: TrialRanks | None
                   ) -> Callable[[Config, Path, TrialJudge], dict[str, Any]]:
    """Each trial a SLURM run of its own, under the worker's one stop protocol: a signal between two trials stops
    the next one. With several ranks, each trial's process group forms on the store of the trial last shared."""

    def train(config: Config, run_dir: Path, judge: TrialJudge) -> dict[str, Any]:
        store = None if ranks is None else ranks.current.store
        return slurm.run_task(config, run_dir, stop=stop, evaluation_stop=judge, store=store)

    return train


def run_worker(spec: StudySpec, index: int, *, stop: StopProtocol | None = None) -> str:
    """Worker `index`'s loop; returns why it ended: "done" (n_trials taken) or "stopped" (a stop request: the
    trial it was training stays RUNNING, to be resumed). `stop`: under SLURM, the task's stop protocol (its
    handlers installed); None: a local worker, whose trials run on local ranks."""
    from hpctrain.launching.app import compose_config
    from hpctrain.launching.job import configure_rank_logging
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    base = compose_config(spec.overrides, config_dir=spec.config_dir)
    ranks = None if stop is None else TrialRanks.of_job(base.trainer.distributed_timeout_s,
                                                         base.trainer.rendezvous_timeout_s)
    configure_rank_logging(0 if ranks is None else ranks.rank)
    train = _train_local if stop is None else _slurm_trainer(stop, ranks)
    if ranks is not None and not ranks.is_main:
        return _follow_rank_0(spec, ranks, train)
    tune_dir = spec.path
    study = open_study(spec, pruner=make_pruner(base.tune))
    # A seed of its own for each worker and each start of it: a restarted worker must not draw its first values again.
    seed = hash((base.seed, index, len(study.get_trials(deepcopy=False)))) % 2**32
    study.sampler = make_sampler(base.tune, seed)
    while True:
        # A stop signal that came between two trials stops the next one after its first step: the trainer then
        # checkpoints and run_task acts on the signal's cause (requeue the worker, or end it) as for any run.
        taken = _resume_or_ask(study, spec, index)
        if taken is None:
            if ranks is not None:
                ranks.share(None)
            log.info("worker %d: the study has its %d trials; done", index, spec.n_trials)
            return "done"
        trial, heartbeat = taken
        try:
            assignment = _assign(spec, study, trial, index)
            if ranks is not None:
                ranks.share(assignment)
            summary = _run_trial(spec, study, trial, assignment, index, train)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
        if summary is not None and not summary.get("finished"):
            log.warning("worker %d: trial %d stopped at step %d: it resumes when this worker runs again", index,
                        trial.number, summary.get("step", 0))
            return "stopped"
        if ranks is not None:
            ranks.trial_ended()
        if not spec.heartbeats:
            _record_trial(tune_dir, index, None)


def _follow_rank_0(spec: StudySpec, ranks: TrialRanks,
                   train: Callable[[Config, Path, TrialJudge], dict[str, Any]]) -> str:
    """A multi-rank worker's other ranks: train each trial that rank 0 shares, until it shares none. A failed
    trial is rank 0's to tell; a stopped one stopped every rank at the same step."""
    from hpctrain.process.distributed import RunDirectoryTakenOver

    while (assignment := ranks.share().assignment) is not None:
        try:
            summary = _train_assignment(spec, assignment, train)
        except (RunDirectoryTakenOver, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            log.error("rank %d: trial %d failed: %s: %s", ranks.rank, assignment.number, type(error).__name__, error)
        else:
            if not summary.get("finished"):
                return "stopped"
        ranks.trial_ended()
    return "done"


def _train_assignment(spec: StudySpec, assignment: Assignment,
                      train: Callable[[Config, Path, TrialJudge], dict[str, Any]]) -> dict[str, Any]:
    """Train the trial on this rank: its config composed from the study's overrides and the trial's."""
    from hpctrain.launching.app import compose_config

    config = compose_config([*spec.overrides, *assignment.overrides], config_dir=spec.config_dir)
    return train(config, Path(assignment.run_dir), TrialJudge(spec, config, assignment.trial_id))


def _assign(spec: StudySpec, study: Any, trial: Any, index: int) -> Assignment:
    """The trial's run directory (made) and overrides, recorded in its user attributes."""
    overrides = trial_overrides(trial.params)
    number = run_number(spec, study, trial)
    run_dir = spec.path / trial_dirname(number)
    run_dir.mkdir(exist_ok=True)
    for key, value in (("run_dir", str(run_dir)), ("overrides", overrides)):
        trial.set_user_attr(key, value)
    retry = f" (a retry of trial {number}, whose worker was lost)" if number != trial.number else ""
    log.info("worker %d: trial %d%s: %s", index, trial.number, retry, " ".join(overrides))
    return Assignment(number=trial.number, trial_id=trial._trial_id, run_dir=str(run_dir), overrides=overrides)


def _run_trial(spec: StudySpec, study: Any, trial: Any, assignment: Assignment, index: int,
               train: Callable[[Config, Path, TrialJudge], dict[str, Any]]) -> dict[str, Any] | None:
    """Train the trial in its run directory and tell the study how it ended; returns the run's summary (None: it
    failed with an exception), and tells nothing for a run that stopped unfinished (it resumes)."""
    from hpctrain.process.distributed import RunDirectoryTakenOver

    try:
        with _trial_log(Path(assignment.run_dir)):
            summary = _train_assignment(spec, assignment, train)
    except (RunDirectoryTakenOver, KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # NaN loss, a crash of the user's code: the trial fails, the worker goes on
        reason = f"{type(error).__name__}: {error}"[:1000]
        log.error("worker %d: trial %d failed: %s", index, trial.number, reason)
        _tell(study, trial, state="FAIL", reason=reason)
        return None
    if not summary.get("finished"):
        return summary
    if summary["stop_reason"].startswith("pruned"):
        _tell(study, trial, state="PRUNED")
    elif not summary.get("failed") and summary["best_value"] is not None and math.isfinite(summary["best_value"]):
        _tell(study, trial, value=summary["best_value"])
    else:  # stopped by a non-finite loss, unreadable data or a failed write, or never a finite evaluation
        _tell(study, trial, state="FAIL", reason=summary["stop_reason"][:1000] if summary.get("failed")
              else "no finite validation value")
    log.info("worker %d: trial %d: %s", index, trial.number, summary["stop_reason"])
    return summary


def run_number(spec: StudySpec, study: Any, trial: Any) -> int:
    """The number whose run directory the trial trains in: its own, or for a retry (RDB storages) that of the
    trial it retries, whose checkpoints it resumes from."""
    if not spec.heartbeats:
        return trial.number
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    original = retried_from(frozen)
    return trial.number if original is None else original


def _tell(study: Any, trial: Any, *, value: float | None = None, state: str | None = None,
          reason: str | None = None) -> None:
    import optuna
    from optuna.trial import TrialState

    wanted = TrialState.COMPLETE if state is None else TrialState[state]
    try:
        if reason is not None:
            trial.set_user_attr("fail_reason", reason)
        told = study.tell(trial.number, value, state=None if state is None else wanted, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:  # the attribute, on a trial finished meanwhile
        told = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    if told.state is not wanted:  # finished meanwhile: failed as stale while it trained (heartbeats missed)
        log.warning("trial %d was already %s when its worker told it %s: its heartbeats stopped for longer than the "
                    "grace period while it trained (HPCTRAIN_TUNE_HEARTBEAT_S), so it was failed and retried; "
                    "this result stays in its run directory only", trial.number, told.state.name, wanted.name)


def held_trials(spec: StudySpec, trials: list[Any]) -> dict[int, int]:
    """Worker index -> the RUNNING trial it marked as its own (it trains it, or was training it when it stopped)."""
    from optuna.trial import TrialState

    running = {trial.number: trial for trial in trials if trial.state is TrialState.RUNNING}
    if spec.heartbeats:
        return {trial.user_attrs["worker"]: number for number, trial in running.items() if "worker" in trial.user_attrs}
    recorded = {index: recorded_trial(spec.path, index) for index in worker_indices(spec.path)}
    return {index: number for index, number in recorded.items() if number in running}


def _resume_or_ask(study: Any, spec: StudySpec, index: int) -> tuple[Any, Heartbeat | None] | None:
    """This worker's RUNNING trial, else (journal file) one no worker records, else a new one or a retry while
    fewer than n_trials are taken; None when the study has them all. With an RDB storage the trial's heartbeat
    starts here, before the lock is released."""
    import optuna

    from hpctrain.tuning.space import distributions

    tune_dir = spec.path
    with ask_lock(tune_dir):
        trials = study.get_trials(deepcopy=False)
        held = held_trials(spec, trials)
        mine = held.get(index)
        if mine is None and spec.heartbeats:
            fail_stale(study)  # the lost workers' trials: failed and enqueued again as retries, taken by the ask
        elif mine is None:
            # The journal file has no heartbeats (only Optuna's RDBStorage does), so hpctrain keeps its own records
            # for it: a RUNNING trial that no worker records lost its worker between the ask and the record.
            orphans = sorted({t.number for t in trials if t.state.name == "RUNNING"} - set(held.values()))
            mine = orphans[0] if orphans else None
        if mine is not None:
            trial = optuna.trial.Trial(study, next(t for t in trials if t.number == mine)._trial_id)
            log.info("worker %d: resuming trial %d", index, mine)
        elif asked(study) < spec.n_trials:
            trial = ask_quietly(study, distributions(spec.search_space))
        else:
            return None
        heartbeat = Heartbeat(spec, trial._trial_id).start() if spec.heartbeats else None
        claim(trial, index)
        if not spec.heartbeats:
            _record_trial(tune_dir, index, trial.number)
    return trial, heartbeat


@contextlib.contextmanager
def _trial_log(run_dir: Path) -> Iterator[None]:
    """The trial's log lines also go to its run directory's hpctrain.log, as a launched run's do."""
    handler = logging.FileHandler(run_dir / "hpctrain.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def local_worker_main(spec: StudySpec, index: int) -> None:
    """A local worker process (launcher=local)."""
    from hpctrain.process.distributed import exit_with_parent

    exit_with_parent()
    with alive(spec.path, index):
        run_worker(spec, index)


class TuneWorker(submitit.helpers.Checkpointable):
    """What each element of the tune job array runs (launcher=slurm): worker `index`."""

    def __init__(self, spec: StudySpec, index: int) -> None:
        self.spec, self.index = spec, index

    def __call__(self) -> str:
        # First, as TrainingJob does: the stop protocol's handlers before anything slow (torch, Optuna).
        stop = StopProtocol()
        stop.install()
        return run_worker(self.spec, self.index, stop=stop)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # As TrainingJob: the state is on disk (the study, the worker's record, the trial's checkpoints).
        return submitit.helpers.DelayedSubmission(TuneWorker(self.spec, self.index))
