"""The test phase, `python -m hpctrain.test RUN_DIR`: the best checkpoint over the whole test set with the run's
own config (noise included), every test sample exactly once, the same from 1 and 2 ranks and from a SLURM job,
and the training state untouched."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from . import zygote

from .conftest import PYTHON, REPO, expect_slow_test, launch, tiny_overrides

# End-to-end runs of the launcher, each a few seconds: not in the quick loop (`-m "not slow and not slurm"`).
pytestmark = pytest.mark.slow

NOISE = "data.transforms=[{_target_: hpctrain.transforms.AddNoise, field: image, std: 0.05}]"


def run_test(run_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    expect_slow_test()
    result = zygote.run([PYTHON, "-m", "hpctrain.test", str(run_dir), *args], cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"hpctrain.test failed:\n{result.stdout}\n{result.stderr}")
    return result


def fingerprint(run_dir: Path) -> dict[str, str]:
    files = [*sorted((run_dir / "checkpoints").iterdir()), run_dir / "metrics.h5", run_dir / "result.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# The tests that read the finished run share it: one xdist group, so that both workers do not train it each.
shares_the_run = pytest.mark.xdist_group("test_phase_run")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("test_phase") / "run"
    launch(tiny_overrides(tiny_data, NOISE, "trainer.max_steps=20", f"+data.test_dataset={{path: {tiny_data}}}"),
           run_dir=run_dir)
    return run_dir


def per_sample(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as file:
        return {name: file[f"test/per_sample/{name}"][()] for name in file["test/per_sample"]} | {
            "_index": file["test/sample_index"][()], "_step": np.array(file.attrs["checkpoint_step"])}


@shares_the_run
def test_best_checkpoint_on_one_and_two_ranks_evaluates_every_sample_once(finished_run: Path) -> None:
    before = fingerprint(finished_run)
    one = run_test(finished_run, "--name", "one")
    assert "test of step 20: 192 samples" in one.stdout and "loss / baseline_no_distortion" in one.stdout
    run_test(finished_run, "--name", "two", "--num-processes", "2")
    first, second = per_sample(finished_run / "test" / "one.h5"), per_sample(finished_run / "test" / "two.h5")
    assert first["_index"].tolist() == second["_index"].tolist() == list(range(192))  # each sample exactly once
    assert first.keys() == second.keys() and "baseline_label_mean" in first
    for name in first:
        np.testing.assert_allclose(second[name], first[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert fingerprint(finished_run) == before  # the training state is never touched


@shares_the_run
def test_noise_uses_the_test_seed_and_another_file_can_be_named(finished_run: Path, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    run_test(finished_run, "--name", "seed0", "--seed", "0")
    run_test(finished_run, "--name", "seed1", "--seed", "1")
    assert not np.array_equal(per_sample(finished_run / "test" / "seed0.h5")["loss"],
                              per_sample(finished_run / "test" / "seed1.h5")["loss"])
    small = tmp_path / "small.h5"
    with h5py.File(tiny_data) as source, h5py.File(small, "w") as target:
        for name in ("images", "labels"):
            target[name] = source[name][:40]
    run_test(finished_run, f"data.test_dataset.path={small}", "--name", "small", "--checkpoint", "latest")
    assert per_sample(finished_run / "test" / "small.h5")["_index"].tolist() == list(range(40))
    refused = run_test(finished_run, "data.test_dataset.path=/nope.h5", check=False)
    assert refused.returncode == 2 and "data.test_dataset: data file /nope.h5 does not exist" in refused.stderr


@shares_the_run
def test_a_nan_test_sample_is_named_and_left_out_of_the_means(finished_run: Path, tiny_data: Path,
                                                              tmp_path: Path) -> None:
    poisoned = tmp_path / "poisoned.h5"
    with h5py.File(tiny_data) as source, h5py.File(poisoned, "w") as target:
        target["images"], target["labels"] = source["images"][:40], source["labels"][:40]
        image = target["images"][17]
        image.flat[3] = np.nan
        target["images"][17] = image
    result = run_test(finished_run, f"data.test_dataset.path={poisoned}", "--name", "poisoned")
    assert f"sample 17 ({poisoned}, row 17): non-finite image" in result.stderr
    assert "1 sample(s) with a non-finite loss or value, left out of the means" in result.stdout
    with h5py.File(finished_run / "test" / "poisoned.h5") as file:
        losses, mean = file["test/per_sample/loss"][()], float(file["test/loss"][()])
        assert int(file["test/nonfinite_samples"][()]) == 1
    assert np.isnan(losses[17]) and mean == np.delete(losses, 17).astype(np.float64).mean()


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_the_test_phase_runs_as_a_slurm_job(finished_run: Path) -> None:
    result = run_test(finished_run, "--name", "slurm", "--slurm", "launcher.nodes=2", "launcher.tasks_per_node=1",
                      "launcher.cpus_per_task=1", "launcher.timeout_min=10")
    assert "submitted SLURM test job" in result.stdout
    run_test(finished_run, "--name", "local")
    slurm, local = per_sample(finished_run / "test" / "slurm.h5"), per_sample(finished_run / "test" / "local.h5")
    assert slurm["_index"].tolist() == list(range(192))
    for name in local:
        np.testing.assert_allclose(slurm[name], local[name], rtol=1e-5, atol=1e-7, err_msg=name)


@shares_the_run
def test_a_test_phase_is_a_logger_run_of_its_own(finished_run: Path) -> None:
    """The test phase's means reach the run's loggers (here given on the command line): an MLflow run of its own
    in the run directory's SQLite store, tagged with its phase, holding each test value once at the checkpoint's
    step."""
    from mlflow import MlflowClient

    run_test(finished_run, "--name", "logged", "callbacks.loggers=[mlflow]")
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_run / 'mlflow.db'}")
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["hpctrain.phase"] == "test/logged" and run.info.run_name.endswith("/test/logged")
    assert run.data.tags["hpctrain.run_dir"] == str(finished_run) and run.info.status == "FINISHED"
    with h5py.File(finished_run / "test" / "logged.h5") as file:
        expected = {name: float(file[f"test/{name}"][()]) for name in file["test/per_sample"]}
    for name in ("loss", "baseline_label_mean"):
        history = client.get_metric_history(run.info.run_id, f"test/{name}")
        assert [(point.step, point.value) for point in history] == [(20, expected[name])]
    assert "test/loss/baseline_label_mean" in run.data.metrics
    assert (finished_run / "loggers" / "mlflow.test.logged.json").exists()
