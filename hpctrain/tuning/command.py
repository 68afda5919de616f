"""`python -m hpctrain.tune [--config-dir DIR] [overrides]`: a hyperparameter search as an Optuna study on shared
storage, run by `tune.parallel` workers (one SLURM job array with launcher=slurm, local processes with
launcher=local) that each ask a trial, train it in its own run directory, tell the result and ask the next, until
the study has `tune.n_trials` trials (docs/tuning.md).

The search space is Hydra's Optuna-sweeper syntax, as sweep overrides on the command line
(`optim.lr='tag(log, interval(1e-4, 1e-2))'`, `model.width=choice(8,16)`) or under `tune.search_space`. Before
anything is written or queued, `preflight` checks the expressions, that every key exists in the config (a trial's
config composed and checked like a run's, with one dry step), the storage, and optuna itself; each failure is one
line `hpctrain: error: <key>: ...`, exit code 2.

Running the same command again continues the study: it starts only the workers still needed (those whose trial
was interrupted, which resume it, and as many more as trials remain, up to tune.parallel), leaving alone those
still running or queued.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path
from typing import Any

from hpctrain.config import Config, ConfigError
from hpctrain.tuning.space import distributions, flatten, representative, split_overrides, trial_overrides
from hpctrain.tuning.study import (StudySpec, ask_lock, asked, check_heartbeat_api, check_storage, counts,
                                   fail_stale, heartbeat_settings, is_rdb_url, make_pruner, make_sampler, open_study,
                                   require_optuna, storage_location)


def preflight(overrides: list[str], config_dir: str | None) -> tuple[StudySpec, Config]:
    """Everything checked before anything is written: returns the study's spec and the base config."""
    from hpctrain.components import check_run_inputs
    from hpctrain.launching.job import check_run_dir_writable
    from hpctrain.launching.app import compose_config

    require_optuna()
    plain, sweeps = split_overrides(overrides)
    config = compose_config(plain, config_dir=config_dir)
    space = {**{key: str(value) for key, value in flatten(config.tune.search_space).items()}, **sweeps}
    found = distributions(space)
    if config.launcher.name == "srun":
        raise ConfigError("launcher.name=srun: a study's workers are started by hpctrain.tune; use launcher=local "
                          "or launcher=slurm")
    for position, params in enumerate(config.tune.enqueue):
        for key in flatten(params):
            if key not in found:
                raise ConfigError(f"tune.enqueue[{position}].{key}: not a key of tune.search_space "
                                  f"({', '.join(found)})")
    trial = _trial_config(plain, config_dir, {key: representative(d) for key, d in found.items()})
    tune_dir = Path(config.tune.dir).absolute()
    try:
        check_run_dir_writable(tune_dir)
    except ConfigError as error:  # it names hydra.run.dir, which a study does not use
        raise ConfigError(str(error).replace("hydra.run.dir=", "tune.dir=", 1)) from None
    storage = storage_location(config.tune, tune_dir)
    check_storage(storage)
    heartbeat_s, grace_s = heartbeat_settings()
    if is_rdb_url(storage):
        check_heartbeat_api()
    check_run_inputs(trial, prepare=True)  # the user's components and one dry step, as for a run
    if config.launcher.name == "slurm":
        from hpctrain.launching.slurm import check_resources

        check_resources(config.launcher)
    spec = StudySpec(tune_dir=str(tune_dir), storage=storage, study_name=config.tune.study_name or config.run_name,
                     overrides=plain, config_dir=None if config_dir is None else str(Path(config_dir).absolute()),
                     search_space=space, n_trials=config.tune.n_trials,
                     direction="minimize" if config.callbacks.monitor.mode == "min" else "maximize",
                     metric=config.callbacks.monitor.metric, heartbeat_s=heartbeat_s, grace_s=grace_s)
    return spec, config


def _trial_config(plain: list[str], config_dir: str | None, params: dict[str, Any]) -> Config:
    """A trial's config with these values; a key the config lacks is named as tune.search_space.<key>."""
    from hpctrain.launching.app import compose_config

    try:
        return compose_config([*plain, *trial_overrides(params)], config_dir=config_dir)
    except ConfigError:
        for key, value in params.items():  # which key? compose with each one alone
            try:
                compose_config([*plain, *trial_overrides({key: value})], config_dir=config_dir)
            except ConfigError as error:
                raise ConfigError(f"tune.search_space.{key}: {error}") from None
        raise


def start_study(spec: StudySpec, config: Config) -> Any:
    """Create the study (or open it) and write the tune directory's record; enqueue tune.enqueue once."""
    spec.path.mkdir(parents=True, exist_ok=True)
    spec.write()
    study = open_study(spec, sampler=make_sampler(config.tune, config.seed), pruner=make_pruner(config.tune),
                       create=True)
    with ask_lock(spec.path):
        if config.tune.enqueue and not study.get_trials(deepcopy=False):
            for params in config.tune.enqueue:
                study.enqueue_trial(flatten(params))
    return study


def workers_to_start(spec: StudySpec, study: Any, parallel: int, *, active: set[int]) -> list[int]:
    """The worker indices to start: each inactive one with an interrupted trial (it resumes it), then as many new
    ones as trials remain untaken (with an RDB storage, the retries of trials whose heartbeat went stale among
    them), up to `parallel` workers in all."""
    from optuna.trial import TrialState

    from hpctrain.tuning.worker import held_trials, worker_indices

    with ask_lock(spec.path):
        if spec.heartbeats:
            fail_stale(study)
        trials = study.get_trials(deepcopy=False)
        running = {t.number for t in trials if t.state is TrialState.RUNNING}
        held = held_trials(spec, trials)
        interrupted = sorted(index for index in held if index not in active)
        # The journal's orphans (recorded by no worker) are taken over by the next worker that asks; an RDB
        # storage's are found by their heartbeat and retried (counted in asked()).
        orphans = 0 if spec.heartbeats else len(running - set(held.values()))
        untaken = max(0, spec.n_trials - asked(study)) + orphans
    known = worker_indices(spec.path)
    slots = max(0, parallel - len(active) - len(interrupted))
    fresh = [index for index in range(parallel + len(known)) if index not in active and index not in interrupted]
    return interrupted + fresh[:min(slots, untaken)]


def run_local_workers(spec: StudySpec, indices: list[int]) -> list[tuple[int, int]]:
    """The workers as local processes; returns (index, exit code) of those that failed."""
    from hpctrain.tuning.worker import local_worker_main

    context = multiprocessing.get_context("spawn")
    processes = [(index, context.Process(target=local_worker_main, args=(spec, index),
                                         name=f"hpctrain-tune-worker-{index}")) for index in indices]
    for _, process in processes:
        process.start()
    for _, process in processes:
        process.join()
    return [(index, process.exitcode) for index, process in processes if process.exitcode != 0]


def submit_workers(spec: StudySpec, config: Config, indices: list[int]) -> str:
    """The workers as one SLURM job array; returns its id."""
    from hpctrain.launching.slurm import SUBMITIT_DIRNAME, make_executor, record_job
    from hpctrain.tuning.worker import TuneWorker, worker_dir

    executor = make_executor(spec.path / SUBMITIT_DIRNAME, config.launcher)
    with executor.batch():
        jobs = [executor.submit(TuneWorker(spec, index)) for index in indices]
    for index, job in zip(indices, jobs):
        worker_dir(spec.path, index).mkdir(parents=True, exist_ok=True)
        record_job(worker_dir(spec.path, index), job)
    return jobs[0].job_id.split("_")[0]


def active_workers(spec: StudySpec, config: Config) -> set[int]:
    """Workers still running (a local process holding its lock) or queued or running in SLURM."""
    from hpctrain.tuning.worker import is_alive_locally, worker_dir, worker_indices

    active = set()
    for index in worker_indices(spec.path):
        if is_alive_locally(spec.path, index):
            active.add(index)
        elif config.launcher.name == "slurm":
            from hpctrain.launching.slurm import ACTIVE_STATES, job_state, recorded_job_id

            job_id = recorded_job_id(worker_dir(spec.path, index))
            if job_id is not None and job_state(job_id) in ACTIVE_STATES:
                active.add(index)
    return active


def _state_line(study: Any, n_trials: int) -> str:
    found = counts(study)
    return (f"{found['complete']} complete, {found['pruned']} pruned, {found['failed']} failed, {found['running']} "
            f"running of tune.n_trials={n_trials}")


def run(overrides: list[str], config_dir: str | None) -> int:
    spec, config = preflight(overrides, config_dir)
    study = start_study(spec, config)
    inspect = f"python -m hpctrain.inspect {spec.path}"
    active = active_workers(spec, config)
    indices = workers_to_start(spec, study, config.tune.parallel, active=active)
    if not indices:
        state = "still running: workers " + ", ".join(map(str, sorted(active))) if active else "finished"
        print(f"study {spec.study_name} {state} ({_state_line(study, spec.n_trials)})\n  results: {inspect}",
              flush=True)
        return 0
    if config.launcher.name == "slurm":
        array_id = submit_workers(spec, config, indices)
        print(f"submitted job array {array_id}: {len(indices)} worker(s) ({', '.join(map(str, indices))}) of study "
              f"{spec.study_name}, {_state_line(study, spec.n_trials)}\n  tune directory: {spec.path}\n"
              f"  results:        {inspect}", flush=True)
        return 0
    print(f"study {spec.study_name}: starting {len(indices)} local worker(s) ({', '.join(map(str, indices))}), "
          f"{_state_line(study, spec.n_trials)}\n  tune directory: {spec.path}", flush=True)
    failed = run_local_workers(spec, indices)
    print(f"study {spec.study_name}: {_state_line(study, spec.n_trials)}\n  results: {inspect}", flush=True)
    if failed:
        print("hpctrain: error: worker(s) ended with an error (index, exit code): "
              f"{failed}; run the same command again to continue the study", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    parser = argparse.ArgumentParser(prog="python -m hpctrain.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", default=None, help="your own config directory (as for hpctrain.launch)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides; key=<search expression> sweeps")
    args = parser.parse_args(argv)
    try:
        return run(args.overrides, args.config_dir)
    except ConfigError as error:
        print(f"hpctrain: error: {error}", file=sys.stderr)
        return 2

