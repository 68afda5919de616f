"""Hyperparameter search (`python -m hpctrain.tune`): the search space and preflight (quick), a local study of 2
worker processes with a SIGKILLed worker and a rerun, on the journal file and on MariaDB (slow), a MariaDB study
whose killed worker's trial is found by Optuna's heartbeat and retried in its run directory (slow), a SLURM job
array with a worker requeued mid-trial on MariaDB (slurm), and a study of two-node trials on SLURM: pruned on both
ranks, requeued mid-trial, cancelled and continued by the same command, which then finds it finished (slurm)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hpctrain.run.checkpoint import CheckpointManager, state_dict_digest
from hpctrain.config import ConfigError
from hpctrain.run.metrics import open_for_reading

from .conftest import PYTHON, REPO, expect_slow_test, final_weights, launch, tiny_overrides

optuna = pytest.importorskip("optuna")

from hpctrain.tuning import command as tune  # noqa: E402
from hpctrain.tuning.space import distribution, split_overrides, trial_overrides  # noqa: E402
from hpctrain.tuning.study import StudySpec, check_storage, heartbeat_settings, open_study  # noqa: E402
from . import zygote

# A trial: 15 steps, an evaluation every 3 (the pruner's chances), a checkpoint every 3 (a kill's resume point).
TRIAL = ["trainer.max_steps=15", "trainer.val_every_steps=3", "callbacks.checkpoint.every_steps=3",
         "callbacks.early_stopping.enabled=false"]
# Two good learning rates first, then one that learns nothing: once a trial is complete (each worker tells its
# trial before it asks the next), the median pruner with one startup trial must prune trial 2 at one of its
# evaluations; trial 3's loss is NaN at step 2 (trainer.nonfinite=stop): it fails; trials 4 and 5 are the sampler's.
STUDY = ["optim.lr=tag(log, interval(1e-4, 3e-2))", "tune.n_trials=6", "tune.parallel=2", "tune.pruner=median",
         "tune.n_startup_trials=1", "trainer.nonfinite=stop",
         "tune.enqueue=[{optim.lr: 0.01}, {optim.lr: 0.009}, {optim.lr: 1e-7}, {optim.lr: 1e9}]"]


# -- quick: the search space and preflight ------------------------------------------------------------------------
def test_hydra_optuna_sweeper_expressions_become_optuna_distributions() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert distribution("optim.lr", "tag(log, interval(1e-4, 1e-2))") == FloatDistribution(1e-4, 1e-2, log=True)
    assert distribution("model.width", "int(interval(8, 64))") == IntDistribution(8, 64)
    assert distribution("model.width", "tag(log, int(interval(8, 64)))") == IntDistribution(8, 64, log=True)
    assert distribution("model.width", "choice(8, 16)") == CategoricalDistribution([8, 16])
    assert distribution("model.width", "range(8, 33, step=8)") == IntDistribution(8, 32, step=8)
    plain, sweeps = split_overrides(["run_name=x", "optim.lr=interval(0.1, 0.2)", "model.width=8,16"])
    assert plain == ["run_name=x"] and sweeps == {"optim.lr": "interval(0.1, 0.2)", "model.width": "8,16"}
    assert trial_overrides({"optim.lr": 0.1 / 3, "task.name": "a b"}) == [f"optim.lr={0.1 / 3!r}", "task.name='a b'"]


def test_pruners_and_samplers_by_name() -> None:
    from hpctrain.config import TuneConfig
    from hpctrain.tuning.study import make_pruner, make_sampler

    kinds = {name: type(make_pruner(TuneConfig(pruner=name))).__name__
             for name in ("median", "successive_halving", "hyperband", "none")}
    assert kinds == {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
                     "hyperband": "HyperbandPruner", "none": "NopPruner"}
    assert type(make_sampler(TuneConfig(sampler="random"), seed=1)).__name__ == "RandomSampler"
    with pytest.raises(ConfigError, match="tune.pruner must be one of"):
        TuneConfig(pruner="asha")


@pytest.mark.parametrize("expression,message", [
    ("interval(1e-4", "tune.search_space.optim.lr=interval(1e-4: not an expression Hydra can parse"),
    ("0.1", "tune.search_space.optim.lr=0.1: not a search space expression"),
    ("tag(log, interval(-1, 1))", "tune.search_space.optim.lr=tag(log, interval(-1, 1)):"),
])
def test_a_bad_search_space_expression_names_its_key(expression: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        distribution("optim.lr", expression)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("url,message", [
    ("nosuchdb://localhost/x", "SQLAlchemy knows no database 'nosuchdb'"),
    ("mysql+pymysql://user:secret@127.0.0.1:1/x", "cannot connect"),
    ("sqlite:////no/such/dir/study.db", "does not exist"),
])
def test_a_bad_storage_url_is_refused_without_its_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_storage(url)
    assert str(error.value).startswith("tune.storage=") and message in str(error.value)
    assert "secret" not in str(error.value)


@pytest.mark.parametrize("value,expected", [("", (60, 600)), ("2", (2, 20)), ("1,3", (1, 3)), ("3,2", None),
                                            ("x", None), ("0", None)])
def test_heartbeat_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str,
                                                      expected: tuple[int, int] | None) -> None:
    monkeypatch.setenv("HPCTRAIN_TUNE_HEARTBEAT_S", value)
    if expected is None:
        with pytest.raises(ConfigError, match="HPCTRAIN_TUNE_HEARTBEAT_S="):
            heartbeat_settings()
    else:
        assert heartbeat_settings() == expected


def test_an_optuna_without_the_heartbeat_api_is_refused_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpctrain.tuning.study import check_heartbeat_api

    check_heartbeat_api()  # the installed one has it all
    monkeypatch.delattr(optuna.storages, "fail_stale_trials")
    with pytest.raises(ConfigError, match=r"lacks optuna.storages.fail_stale_trials; hpctrain is written for "
                                          r"optuna>=4.0,<6"):
        check_heartbeat_api()


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=interval(1e-4, 1e-2)"], "tune.search_space.optim.lrr: optim.lrr: Key 'lrr' not in 'OptimConfig'; did you mean optim.lr?"),
    (["optim.lr=interval(1e-2, 1e-4)"], "tune.search_space.optim.lr=interval(1e-2, 1e-4):"),
    (["optim.lr=interval(1e-4, 1e-2)", "tune.storage=mysql+pymysql://u:p@127.0.0.1:1/x"], "cannot connect"),
    (["run_name=x"], "tune.search_space is empty"),
    (["optim.lr=interval(1e-4, 1e-2)", "tune.dir=/proc/tune"], "tune.dir=/proc/tune: cannot write in /proc"),
    (["optim.lr=interval(1e-4, 1e-2)", "tune.enqueue=[{model.width: 8}]"],
     "tune.enqueue[0].model.width: not a key"),
])
def test_preflight_refuses_a_bad_study_in_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str], message: str) -> None:
    assert tune.main([*overrides, f"paths.runs_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hpctrain: error: ") and message in error and "\n" not in error
    assert list(tmp_path.iterdir()) == []


def test_preflight_without_optuna_says_how_to_install_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert tune.main(["optim.lr=interval(1e-4, 1e-2)", f"paths.runs_dir={tmp_path}"]) == 2
    assert "pip install 'hpctrain[optuna]'" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def _two_trials_then_none(rank: int, port: int, results) -> None:
    """A multi-rank worker's ranks: rank 0 shares two trials, then none. In trial 0 rank 0's user code raises at
    once after the group formed, while rank 1 leaves the trial 5 s later (its collective's error, then a slow
    exit). Trial 1's process group forms on its own prefix of the one store, with a timeout of 3 s, and sums the
    ranks: rank 0 must not go ahead into trial 1 before rank 1 has left trial 0."""
    import torch
    import torch.distributed

    from hpctrain.process.distributed import init_distributed, shutdown_distributed
    from hpctrain.tuning.ranks import Assignment, TrialRanks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    ranks = TrialRanks(rank, 2, timeout_s=60, rendezvous_timeout_s=60)
    seen = []
    for number in (0, 1):
        shared = Assignment(number, 10 + number, f"/runs/trial_{number}", [f"optim.lr={number}"])
        trial = ranks.share(shared if rank == 0 else None)
        total = torch.tensor([rank + 1.0])
        init_distributed(device_preference="cpu", timeout_s=60 if number == 0 else 3, store=trial.store)
        try:
            if number == 0 and rank == 0:
                raise RuntimeError("the user's code raised on rank 0 only")
            torch.distributed.all_reduce(total)
        except RuntimeError:
            total = torch.tensor([-1.0])
            if rank == 1:
                time.sleep(5)
        finally:
            shutdown_distributed(clean=False)
        seen.append((trial.assignment, total.item()))
        ranks.trial_ended()
    seen.append((ranks.share(None).assignment, None))
    results.put((rank, seen))


def test_a_multi_rank_workers_ranks_train_the_trials_rank_0_shares_in_step_each_in_a_group_of_its_own() -> None:
    from hpctrain.tuning.ranks import Assignment

    from .conftest import run_two_gloo_ranks

    seen = run_two_gloo_ranks(_two_trials_then_none)
    assert seen[0] == seen[1] == [(Assignment(0, 10, "/runs/trial_0", ["optim.lr=0"]), -1.0),
                                  (Assignment(1, 11, "/runs/trial_1", ["optim.lr=1"]), 3.0), (None, None)]


# -- slow: a local study, a killed worker, the rerun ---------------------------------------------------------------
def run_tune(args: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    expect_slow_test()
    return zygote.run([PYTHON, "-m", "hpctrain.tune", *args], cwd=REPO, timeout=timeout)


def mariadb_url(*, through_socket: bool = False) -> str:
    """A database and user for Optuna on the MariaDB server of the SLURM test cluster (slurm/cluster-up.sh).
    through_socket: by the server's Unix socket, which the cluster's nodes reach (they share the host's file
    system, but each has a network namespace of its own, and the server listens on the host's 127.0.0.1 only)."""
    socket = "/run/mysqld/mysqld.sock"
    reason = ("needs root" if os.geteuid() != 0 else "" if Path(socket).exists()
              else "no MariaDB server (slurm/cluster-up.sh starts one)")
    if not reason:
        created = subprocess.run(
            ["mariadb", "--no-defaults", "--protocol=socket", "-S", socket, "-e",
             "CREATE DATABASE IF NOT EXISTS hpctrain_optuna; "
             "CREATE USER IF NOT EXISTS 'hpctrain_optuna'@'127.0.0.1' IDENTIFIED BY 'optuna'; "
             "GRANT ALL PRIVILEGES ON hpctrain_optuna.* TO 'hpctrain_optuna'@'127.0.0.1'; "
             "CREATE USER IF NOT EXISTS 'hpctrain_optuna'@'localhost' IDENTIFIED BY 'optuna'; "
             "GRANT ALL PRIVILEGES ON hpctrain_optuna.* TO 'hpctrain_optuna'@'localhost'; FLUSH PRIVILEGES;"],
            capture_output=True, text=True, timeout=60)
        reason = "" if created.returncode == 0 else f"cannot create the database: {created.stderr.strip()}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the MariaDB storage test needs the local server under CI=true: {reason}")
        pytest.skip(f"MariaDB storage not tested: {reason}")
    if through_socket:
        return f"mysql+pymysql://hpctrain_optuna:optuna@localhost/hpctrain_optuna?unix_socket={socket}"
    return "mysql+pymysql://hpctrain_optuna:optuna@127.0.0.1:3306/hpctrain_optuna"


def storage_overrides(storage: str, *, through_socket: bool = False) -> list[str]:
    """The overrides of a study on `storage` (journal: the default; mariadb: a study of its own in the database)."""
    if storage == "journal":
        return []
    return [f'tune.storage="{mariadb_url(through_socket=through_socket)}"',
            f"tune.study_name=test_{uuid.uuid4().hex[:12]}"]


def trial_record(tune_dir: Path, index: int) -> dict:
    try:
        return json.loads((tune_dir / "workers" / str(index) / "trial.json").read_text())
    except (OSError, ValueError):
        return {}


def worker_trials(tune_dir: Path) -> dict[int, dict]:
    """Worker index -> {"number", "pid"} of the trial it trains: its record in workers/<i>/trial.json (the journal
    file), or the RUNNING trial's user attributes (an RDB storage, where hpctrain writes no records)."""
    try:
        spec = StudySpec.read(tune_dir)
    except (OSError, ValueError):  # not written yet
        return {}
    if not spec.heartbeats:
        return {index: record for index in (0, 1) if (record := trial_record(tune_dir, index)).get("number") is not None}
    from optuna.trial import TrialState

    try:
        running = open_study(spec).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except KeyError:  # tune.json is written before the study is created
        return {}
    return {t.user_attrs["worker"]: {"number": t.number, "pid": t.user_attrs["pid"]} for t in running
            if "pid" in t.user_attrs}


def kill_a_worker_mid_trial(tune_dir: Path, process: zygote.Child | subprocess.Popen) -> int:
    """SIGKILL the first worker seen with a checkpoint of an unfinished trial; returns that trial's number."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        for record in worker_trials(tune_dir).values():
            run_dir = tune_dir / f"trial_{record['number']:04d}"
            if CheckpointManager(run_dir, keep_last=2).complete() and not (run_dir / "result.json").exists():
                os.kill(record["pid"], signal.SIGKILL)
                return record["number"]
        time.sleep(0.02 if (tune_dir / "study.journal").exists() else 0.1)  # a database query each time
    raise AssertionError(f"no worker was seen mid-trial; the study ended first ({process.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", "mariadb"])
def test_local_study_prunes_survives_a_killed_worker_and_the_rerun_finishes_it(
        tmp_path: Path, tiny_data: Path, storage: str) -> None:
    args = [*tiny_overrides(tiny_data, *TRIAL), *STUDY, *storage_overrides(storage), f"paths.runs_dir={tmp_path}",
            "run_name=study"]
    tune_dir = tmp_path / "study"
    expect_slow_test()
    log = tmp_path / "first.log"
    first = zygote.start([PYTHON, "-m", "hpctrain.tune", *args], cwd=REPO, output=log, merge_stderr=True)
    try:
        killed = kill_a_worker_mid_trial(tune_dir, first)
    except AssertionError:
        first.wait(timeout=300)
        raise AssertionError(log.read_text()[-3000:]) from None
    first.wait(timeout=300)
    output = log.read_text()
    assert first.returncode == 1 and "-9)]; run the same command again" in output, output[-3000:]

    second = run_tune(args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "starting 1 local worker(s)" in second.stdout  # only the killed worker's trial was left

    summary = json.loads(zygote.run([PYTHON, "-m", "hpctrain.inspect", str(tune_dir), "--json"], cwd=REPO,
                                    check=True).stdout)
    states = [trial["state"] for trial in summary["trials"]]
    assert [trial["number"] for trial in summary["trials"]] == list(range(6)), states
    # The first trial to complete cannot be pruned (nothing to compare with): at least one is complete.
    assert states[2] == "pruned" and states[3] == "fail" and "complete" in states, states
    assert set(states[4:]) <= {"complete", "pruned"} and summary["counts"]["running"] == 0
    assert summary["trials"][3]["fail_reason"].startswith("non-finite loss nan")
    assert sorted(p.name for p in tune_dir.glob("trial_*")) == [f"trial_{n:04d}" for n in range(6)]
    for trial in summary["trials"][:3] + summary["trials"][4:]:  # each trained once: steps 1..its last, each once
        run_dir = Path(trial["run_dir"])
        with open_for_reading(run_dir / "metrics.h5") as file:
            steps = file["train/step"][()].tolist()
        result = json.loads((run_dir / "result.json").read_text())
        assert steps == list(range(1, result["step"] + 1)), (trial["number"], steps)
        assert result["stop_reason"].startswith("pruned" if trial["state"] == "pruned" else "reached")
    assert "resumed from" in (tune_dir / f"trial_{killed:04d}" / "hpctrain.log").read_text()
    best = summary["best"]
    assert best["rerun"].startswith("python -m hpctrain.launch ") and best["rerun"].endswith(
        f"{' '.join(best['overrides'])} run_name=best_of_{summary['study_name']}")
    assert best["value"] == min(t["value"] for t in summary["trials"] if t["state"] == "complete")
    assert {p.name for p in (tune_dir / "plots").iterdir()} == {"history.png", "importances.png",
                                                               "parallel_coordinates.png"}
    import hpctrain

    model = hpctrain.load_model(best["run_dir"])  # a trial's run directory is a normal run
    assert not model.training


@pytest.mark.slow
def test_rdb_study_finds_a_killed_workers_trial_by_its_heartbeat_and_retries_it_in_the_same_run_directory(
        tmp_path: Path, tiny_data: Path) -> None:
    """MariaDB, heartbeats every second, a 3 s grace: a worker SIGKILLed mid-trial stops its trial's heartbeat;
    once the grace is over, the next worker to ask (the other one, or the rerun's) has Optuna fail the trial and
    retry it; the retry trains in the original's run directory, resumes from its checkpoint and ends bitwise
    equal to the same trial trained alone. hpctrain writes no trial records for an RDB storage."""
    interval, grace = 1, 3
    env = {**os.environ, "HPCTRAIN_TUNE_HEARTBEAT_S": f"{interval},{grace}"}
    args = [*tiny_overrides(tiny_data, *TRIAL), "optim.lr=tag(log, interval(1e-4, 3e-2))", "tune.n_trials=3",
            "tune.parallel=2", "tune.pruner=none", *storage_overrides("mariadb"), f"paths.runs_dir={tmp_path}",
            "run_name=study"]
    tune_dir = tmp_path / "study"
    expect_slow_test()
    log = tmp_path / "first.log"
    first = zygote.start([PYTHON, "-m", "hpctrain.tune", *args], cwd=REPO, env=env, output=log, merge_stderr=True)
    try:
        killed = kill_a_worker_mid_trial(tune_dir, first)
    except AssertionError:
        first.wait(timeout=300)
        raise AssertionError(log.read_text()[-3000:]) from None
    killed_at = time.monotonic()
    first.wait(timeout=300)
    output = log.read_text()
    assert first.returncode == 1 and "-9)]; run the same command again" in output, output[-3000:]
    time.sleep(max(0.0, killed_at + grace + interval + 2 - time.monotonic()))  # stale by now (1 s timestamps)
    second = zygote.run([PYTHON, "-m", "hpctrain.tune", *args], cwd=REPO, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "starting 1 local worker(s)" in second.stdout or "finished" in second.stdout, second.stdout

    summary = json.loads(zygote.run([PYTHON, "-m", "hpctrain.inspect", str(tune_dir), "--json"], cwd=REPO,
                                    check=True).stdout)
    trials = {trial["number"]: trial for trial in summary["trials"]}
    retries = [trial for trial in trials.values() if trial["retry_of"] is not None]
    assert [trial["retry_of"] for trial in retries] == [killed], summary["trials"]
    retry = retries[0]
    assert trials[killed]["state"] == "fail" and f"retried as trial {retry['number']}" in trials[killed]["fail_reason"]
    assert "no heartbeat" in trials[killed]["fail_reason"]
    assert summary["counts"] == {"complete": 3, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "retried": 1}
    run_dir = tune_dir / f"trial_{killed:04d}"
    assert retry["state"] == "complete" and retry["run_dir"] == str(run_dir)
    used = sorted(f"trial_{t['retry_of'] if t['retry_of'] is not None else t['number']:04d}"
                  for t in trials.values() if t["number"] != killed)
    assert sorted(p.name for p in tune_dir.glob("trial_*")) == used  # the retry made no directory of its own
    assert not list(tune_dir.glob("workers/*/trial.json"))
    with open_for_reading(run_dir / "metrics.h5") as file:
        steps = file["train/step"][()].tolist()
    assert steps == list(range(1, 16)), steps  # resumed: every step once
    assert "resumed from" in (run_dir / "hpctrain.log").read_text()
    alone = tmp_path / "alone"
    launch([*tiny_overrides(tiny_data, *TRIAL), *retry["overrides"]], run_dir=alone)
    assert state_dict_digest(final_weights(run_dir)) == state_dict_digest(final_weights(alone))


# -- SLURM: a job array, one worker requeued mid-trial -------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_study_is_one_job_array_and_a_requeued_worker_resumes_its_trial_bit_exact(
        tmp_path: Path, tiny_data: Path) -> None:
    """One-rank trials, MariaDB through its Unix socket (the journal file: the two-node study below)."""
    storage = "mariadb"
    from .test_slurm import history_reasons, queue_state, release_when_requeued, sh, wait_until

    slurm = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.timeout_min=10", "trainer.max_steps=40",
             "trainer.val_every_steps=20", "callbacks.checkpoint.every_steps=4",
             "callbacks.early_stopping.enabled=false"]
    args = [*tiny_overrides(tiny_data, *slurm), "optim.lr=tag(log, interval(1e-4, 3e-2))", "tune.n_trials=4",
            "tune.parallel=2", "tune.pruner=none", *storage_overrides(storage, through_socket=True),
            f"paths.runs_dir={tmp_path}", "run_name=study"]
    tune_dir = tmp_path / "study"
    submitted = run_tune(args, timeout=120)
    assert submitted.returncode == 0 and "submitted job array" in submitted.stdout, submitted.stderr[-3000:]
    from hpctrain.launching.slurm import recorded_job_id

    job_ids = [recorded_job_id(tune_dir / "workers" / str(index)) for index in (0, 1)]
    array_id = job_ids[0].split("_")[0]
    assert job_ids == [f"{array_id}_0", f"{array_id}_1"]
    requeued: dict = {}

    def worker_0_mid_trial() -> bool:
        number = worker_trials(tune_dir).get(0, {}).get("number")
        if number is None:
            return False
        manager = CheckpointManager(tune_dir / f"trial_{number:04d}", keep_last=2)
        if manager.complete():  # its first checkpoint (step 4 of 40): the requeue lands well before the end
            requeued["number"] = number
            return True
        return False

    wait_until(worker_0_mid_trial, timeout=300, what="a checkpoint of worker 0's trial", interval=0.05)
    sh("scontrol", "requeue", job_ids[0])
    release_when_requeued(job_ids[0])
    wait_until(lambda: sh("squeue", "--noheader", "--jobs", array_id) == "", timeout=400, what="the job array")

    summary = json.loads(zygote.run([PYTHON, "-m", "hpctrain.inspect", str(tune_dir), "--json"], cwd=REPO,
                                    check=True).stdout)
    assert [(t["number"], t["state"]) for t in summary["trials"]] == [(n, "complete") for n in range(4)]
    run_dir = tune_dir / f"trial_{requeued['number']:04d}"
    assert history_reasons(run_dir) == ["requeued_by_slurm", "completed"]  # trained by one worker, resumed once
    assert queue_state(job_ids[0]) == ""
    trial = summary["trials"][requeued["number"]]
    alone = tmp_path / "alone"
    launch([*tiny_overrides(tiny_data, *slurm), *trial["overrides"], "launcher=local"], run_dir=alone)
    assert state_dict_digest(final_weights(run_dir)) == state_dict_digest(final_weights(alone))
    shutil.rmtree(alone)


# -- SLURM: trials of two ranks on two nodes ---------------------------------------------------------------------
# Evaluations (the pruner's chances) every 4 steps, checkpoints every 3: a trial seen with its newest checkpoint at
# a step that is no evaluation is mid-way, not ending.
TWO_NODE_TRIAL = ["launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
                  "launcher.timeout_min=10", "trainer.max_steps=24", "trainer.val_every_steps=4",
                  "callbacks.checkpoint.every_steps=3", "callbacks.early_stopping.enabled=false"]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_two_node_trials_agree_on_pruning_resume_requeued_and_cancelled_and_the_rerun_submits_only_what_is_needed(
        tmp_path: Path, tiny_data: Path) -> None:
    """A study of 2-rank trials (one rank on each of the two nodes), 2 workers: trial 2 learns nothing and is
    pruned at an evaluation (both ranks stop there, and the worker goes on); a worker is requeued mid-trial and
    resumes it bit-exactly; the study is cancelled mid-trial and the same command submits only the workers still
    needed, which finish it with every step of every trial trained once, the cancelled trial bit-exactly; run
    again, it submits nothing."""
    from hpctrain.launching.slurm import recorded_job_id
    from hpctrain.process.history import attempts, read

    from .test_slurm import history_reasons, known_jobs, release_when_requeued, sh, wait_until

    args = [*tiny_overrides(tiny_data, *TWO_NODE_TRIAL), "optim.lr=tag(log, interval(1e-4, 3e-2))",
            "tune.n_trials=5", "tune.parallel=2", "tune.pruner=median", "tune.n_startup_trials=1",
            "tune.enqueue=[{optim.lr: 0.01}, {optim.lr: 0.009}, {optim.lr: 1e-7}]", f"paths.runs_dir={tmp_path}",
            "run_name=study"]
    tune_dir = tmp_path / "study"
    submitted = run_tune(args, timeout=120)
    assert submitted.returncode == 0 and "submitted job array" in submitted.stdout, submitted.stderr[-3000:]
    first_jobs = [recorded_job_id(tune_dir / "workers" / str(index)) for index in (0, 1)]
    array_id = first_jobs[0].split("_")[0]

    def mid_trial(*, past_evaluation: bool = False) -> tuple[int, int] | None:
        """(worker, trial) of a trial that a worker is training, mid-way: a checkpoint since its attempt started, at
        a step that is no evaluation (with `past_evaluation`, past the first one, where the pruner may end it),
        with at least 15 of its 24 steps to go (a stop sent now lands in it, unless the pruner ends it first)."""
        for worker, record in worker_trials(tune_dir).items():
            run_dir = tune_dir / f"trial_{record['number']:04d}"
            rows = attempts(read(run_dir))
            steps = [info.step for info in CheckpointManager(run_dir, keep_last=2).complete()]
            if (rows and rows[-1]["reason"] is None and steps and rows[-1]["resume_step"] < max(steps) <= 9
                    and max(steps) % 4 and (max(steps) > 4 or not past_evaluation)):
                return worker, record["number"]
        return None

    seen: dict = {}

    def requeue_target() -> bool:
        seen["mid_trial"] = mid_trial(past_evaluation=True)
        return seen["mid_trial"] is not None

    wait_until(requeue_target, timeout=300, what="a trial past its first evaluation", interval=0.05)
    requeued_job = first_jobs[seen["mid_trial"][0]]
    sh("scontrol", "requeue", requeued_job)
    release_when_requeued(requeued_job)
    # Cancel the whole study mid-trial, once a trial has ended since the requeue.
    wait_until(lambda: any(p.exists() for p in tune_dir.glob("trial_*/result.json")) and mid_trial() is not None,
               timeout=300, what="a trial mid-way after one ended", interval=0.05)
    sh("scancel", array_id)
    wait_until(lambda: sh("squeue", "--noheader", "--jobs", array_id) == "", timeout=120, what="the cancelled array")
    cancelled = [int(p.parent.name[6:]) for p in tune_dir.glob("trial_*/jobs.jsonl")
                 if history_reasons(p.parent)[-1] == "cancelled"]
    assert cancelled, [history_reasons(p.parent) for p in tune_dir.glob("trial_*/jobs.jsonl")]

    study = open_study(StudySpec.read(tune_dir))
    running = {t.number for t in study.get_trials() if t.state.name == "RUNNING"}
    interrupted = {index for index, record in worker_trials(tune_dir).items() if record["number"] in running}
    untaken = 5 - sum(t.state.name in ("COMPLETE", "PRUNED", "FAIL", "RUNNING") for t in study.get_trials())
    assert set(cancelled) <= running and interrupted, (running, worker_trials(tune_dir))
    before = known_jobs()
    again = run_tune(args, timeout=120)
    assert again.returncode == 0 and "submitted job array" in again.stdout, again.stdout + again.stderr[-3000:]
    started = {index for index in (0, 1) if recorded_job_id(tune_dir / "workers" / str(index)) not in first_jobs}
    assert interrupted <= started and len(started) == min(2, len(interrupted) + untaken), (started, again.stdout)
    second_array = recorded_job_id(tune_dir / "workers" / str(min(started))).split("_")[0]
    wait_until(lambda: sh("squeue", "--noheader", "--jobs", second_array) == "", timeout=400, what="the rerun")

    summary = json.loads(zygote.run([PYTHON, "-m", "hpctrain.inspect", str(tune_dir), "--json"], cwd=REPO,
                                    check=True).stdout)
    states = [trial["state"] for trial in summary["trials"]]
    assert [trial["number"] for trial in summary["trials"]] == list(range(5)), states
    assert states[2] == "pruned" and set(states) <= {"complete", "pruned"}, states
    for trial in summary["trials"]:  # each step once, on both ranks together: a disagreement would hang
        run_dir = Path(trial["run_dir"])
        result = json.loads((run_dir / "result.json").read_text())
        with open_for_reading(run_dir / "metrics.h5") as file:
            assert file["train/step"][()].tolist() == list(range(1, result["step"] + 1)), trial["number"]
        assert result["stop_reason"].startswith("pruned" if trial["state"] == "pruned" else "reached")
    # The requeue lands in the trial seen, or (if the pruner ended that one first) in the worker's next trial.
    requeued = [trial["number"] for trial in summary["trials"]
                if "requeued_by_slurm" in history_reasons(Path(trial["run_dir"]))]
    assert len(requeued) == 1, requeued
    assert history_reasons(tune_dir / f"trial_{requeued[0]:04d}")[:1] == ["requeued_by_slurm"]
    assert history_reasons(tune_dir / f"trial_{cancelled[0]:04d}")[-2:] == ["cancelled", "completed"]
    for number in {requeued[0], cancelled[0]}:  # resumed bit-exactly: as 2 local ranks uninterrupted
        run_dir = tune_dir / f"trial_{number:04d}"
        last = json.loads((run_dir / "result.json").read_text())["step"]  # 24, or the step it was pruned at
        alone = tmp_path / f"alone_{number}"
        launch([*tiny_overrides(tiny_data, *TWO_NODE_TRIAL), *summary["trials"][number]["overrides"],
                "launcher=local", "launcher.num_processes=2",
                "callbacks.checkpoint.every_steps=1", "callbacks.checkpoint.keep_last=24"], run_dir=alone)
        at_last = next(info for info in CheckpointManager(alone, keep_last=24).complete() if info.step == last)
        assert (state_dict_digest(final_weights(run_dir))
                == state_dict_digest(CheckpointManager.load(at_last)["model"])), number

    finished = run_tune(args, timeout=120)
    assert finished.returncode == 0 and "finished" in finished.stdout and "submitted" not in finished.stdout
    assert all(job.startswith(f"{second_array}_") for job in known_jobs() - before), known_jobs() - before


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_study_of_trials_bigger_than_the_cluster_is_refused_before_anything_is_queued(
        tmp_path: Path, tiny_data: Path) -> None:
    from .test_slurm import known_jobs

    before = known_jobs()
    result = run_tune([*tiny_overrides(tiny_data, *TWO_NODE_TRIAL), "launcher.nodes=3",
                       "optim.lr=tag(log, interval(1e-4, 3e-2))", f"paths.runs_dir={tmp_path}"], timeout=120)
    error = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in error, error
    assert error.startswith("hpctrain: error: launcher.nodes=3: partition debug has only 2 nodes"), error
    assert list(tmp_path.iterdir()) == [] and known_jobs() - before == set()
