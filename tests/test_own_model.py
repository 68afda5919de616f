"""A user's own model, data and loss, trained through hpctrain as a new user would: an outside package
(tests/outside, copied out of the repository) with its own configs, `python -m hpctrain.launch --config-dir conf
task=molecules` run from that directory against a non-editable install of hpctrain (`pip install --target`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain.run.checkpoint import CheckpointManager
from hpctrain.run.metrics import open_for_reading

from . import zygote
from .conftest import PYTHON, REPO, TINY_DEFAULTS, expect_slow_test, final_weights, kill_after_checkpoint

# End-to-end runs of the launcher, each a few seconds: not in the quick loop (`-m "not slow and not slurm"`).
pytestmark = pytest.mark.slow

OUTSIDE = Path(__file__).resolve().parent / "outside"
SHORT = ["trainer.max_steps=24", "trainer.micro_batch_size=8", "trainer.val_every_steps=6",
         "callbacks.checkpoint.every_steps=4", "callbacks.early_stopping.enabled=false", "data.num_workers=0",
         "trainer.progress_bar=false", "callbacks.metrics.flush_every_seconds=0",
         *(f"{key}={value}" for key, value in TINY_DEFAULTS.items() if key != "task.plot")]


# The tests that run the installed package share it: one xdist group, so that both workers do not install it each
# (the SLURM test, in the SLURM group, installs its own). tests/test_model_use.py's tests join the group.
shares_the_install = pytest.mark.xdist_group("own_model_install")


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hpctrain built and installed as a wheel (not editable) into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # The repository's own outputs are left out at its top level only (conf/data/ is part of the package).
    left_out = {".venv", ".git", "runs", "data", "build", "tests"}
    shutil.copytree(REPO, build / "src", ignore=lambda directory, names: [
        name for name in names if name == "__pycache__" or name.endswith(".egg-info")
        or (Path(directory) == REPO and name in left_out)])
    subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(build / "src")],
                   check=True, capture_output=True, text=True, timeout=600)
    for config in ("config.yaml", "task/cbed_distortion.yaml", "data/cbed_synthetic.yaml"):
        assert (target / "hpctrain" / "conf" / config).is_file(), f"conf/{config} not packaged"
    assert not list(target.glob("__editable__*")), "the install must not be editable"
    return target


def make_project(directory: Path) -> Path:
    """The user's project directory: their package, their configs and their data file, outside the repository."""
    shutil.copytree(OUTSIDE, directory, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(directory))
    try:
        import molecules

        molecules.make_file(directory / "molecules.h5")
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("molecules", None)
    return directory


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


def user_env(installed: Path, project: Path) -> dict[str, str]:
    # The installed hpctrain first; the user's package from their project (as on their PYTHONPATH).
    return {**os.environ, "PYTHONPATH": f"{installed}{os.pathsep}{project}", "HYDRA_FULL_ERROR": "0"}


def user_launch(installed: Path, project: Path, *overrides: str, run_dir: Path, check: bool = True,
                timeout: float = 300) -> subprocess.CompletedProcess:
    expect_slow_test()
    command = [PYTHON, "-m", "hpctrain.launch", "--config-dir", "conf", "task=molecules", *overrides,
               f"hydra.run.dir={run_dir}"]
    result = zygote.run(command, cwd=project, env=user_env(installed, project), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def user_inspect(installed: Path, project: Path, run_dir: Path) -> dict:
    result = zygote.run([PYTHON, "-m", "hpctrain.inspect", str(run_dir), "--json"], cwd=project, check=True,
                        env=user_env(installed, project))
    return json.loads(result.stdout)


@shares_the_install
def test_the_installed_package_is_the_one_that_runs(installed: Path, project: Path) -> None:
    result = subprocess.run([PYTHON, "-c", "import hpctrain, molecules; print(hpctrain.__file__, "
                                           "hpctrain.__version__, molecules.__file__)"],
                            cwd=project, env=user_env(installed, project), capture_output=True, text=True, check=True)
    hpctrain_file, version, molecules_file = result.stdout.split()
    assert hpctrain_file.startswith(str(installed)) and version != "0.0.0+unknown"
    assert molecules_file.startswith(str(project))


@shares_the_install
def test_own_task_trains_with_its_named_fields_components_and_metrics(installed: Path, project: Path,
                                                                      tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = user_launch(installed, project, *SHORT, run_dir=run_dir)
    output = result.stdout + result.stderr
    assert "dry step passed: model(positions (8, " in output  # padded to the longest molecule of the batch
    assert "3) float32, positions_length (8,) int64, descriptors (8, 4) float32)" in output
    summary = user_inspect(installed, project, run_dir)
    assert summary["task"] == "molecules" and summary["newest_checkpoint"]["finished"]
    with open_for_reading(run_dir / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, 25))
        squared, absolute, loss = (file[f"train/{name}"][()] for name in ("loss.squared", "loss.absolute", "loss"))
        np.testing.assert_allclose(squared + absolute, loss, rtol=1e-12)  # the components sum to the loss
        per_sample = file["validation/per_sample/absolute_error"][()]
        assert per_sample.shape == (4, 40) and file["validation/sample_index"][()].tolist() == list(range(120, 160))
        np.testing.assert_allclose(file["validation/absolute_error"][()], per_sample.mean(axis=1), rtol=1e-5)
        assert file["validation/per_sample/loss.squared"].shape == (4, 40)
        # The user's LR multiplier (halving every 10 steps) and optimizer class (RMSprop) were used.
        lr = file["train/lr"][()][:, 0]
        np.testing.assert_allclose(lr[[0, 9, 10, 20]], [3e-3, 3e-3, 1.5e-3, 7.5e-4])
        assert file["validation/loss"][-1] < file["validation/loss"][0]  # it learns
    state = CheckpointManager.load(CheckpointManager(run_dir, keep_last=2).newest_valid())
    assert "alpha" in state["optimizers"][0]["param_groups"][0]  # RMSprop's own hyperparameter


@shares_the_install
def test_own_task_on_two_ranks_equals_one_rank(installed: Path, project: Path, tmp_path: Path) -> None:
    sgd = [*SHORT, "optim.optimizer=sgd", "optim.lr=0.02"]
    user_launch(installed, project, *sgd, run_dir=tmp_path / "one")
    user_launch(installed, project, *sgd, "trainer.micro_batch_size=2", "trainer.num_microbatches=2",
                "launcher.num_processes=2", run_dir=tmp_path / "two")
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


@shares_the_install
def test_own_task_killed_and_restarted_is_bit_exact(installed: Path, project: Path, tmp_path: Path) -> None:
    run = [*SHORT, "trainer.max_steps=40", "data.num_workers=1"]
    user_launch(installed, project, *run, run_dir=tmp_path / "reference")
    kill_after_checkpoint(["--config-dir", "conf", "task=molecules", *run], tmp_path / "resumed", 13,
                          cwd=project, env=user_env(installed, project))
    restarted = user_launch(installed, project, *run, run_dir=tmp_path / "resumed")
    assert "resumed from" in restarted.stdout + restarted.stderr
    reference = user_inspect(installed, project, tmp_path / "reference")
    resumed = user_inspect(installed, project, tmp_path / "resumed")
    assert reference["newest_checkpoint"]["model_sha256"] == resumed["newest_checkpoint"]["model_sha256"]
    with open_for_reading(tmp_path / "resumed" / "metrics.h5") as res, \
            open_for_reading(tmp_path / "reference" / "metrics.h5") as ref:
        assert res["train/step"][()].tolist() == list(range(1, 41))
        for name in ("train/loss.squared", "validation/per_sample/absolute_error"):
            np.testing.assert_array_equal(res[name][()], ref[name][()])


# (overrides, text the one error message must contain)
BAD_COMPONENTS = [
    (["model._target_=molecules.EnergyNett"], "model._target_: cannot import 'molecules.EnergyNett'"),
    (["model._target_=no_such_package.Model"], "model._target_: cannot import 'no_such_package.Model'"),
    (["model.hidden=0"], "model: hidden must be >= 1, got 0"),
    (["+model.depth=3"], "model: EnergyNet.__init__() got an unexpected keyword argument 'depth'"),
    (["task.loss._target_=molecules.WrongShapeLoss", "~task.loss.absolute_weight"],
     "task.loss: the dry step failed on outputs (8,) and batch"),
    (["task.inputs=[descriptors,positions_length,positions]"], "model: the dry step's forward pass model("
                                                               "descriptors (8, 4) float32"),
    (["data.dataset.fields.energy=targets/enrgy"], "data.dataset: field 'energy': "),
    (["task.inputs=[positions,atoms]"], "task.inputs: the batch has no field 'atoms'"),
    # A value of the wrong type reaching the user's constructor: its TypeError, with the argument named.
    (["model.hidden=abc"], "model: '<' not supported between instances of 'str' and 'int' "
                           "(model.hidden='abc': a str where EnergyNet expects int)"),
    # A plain-function loss without `_partial_: true` is called at once, without its arguments.
    (["task.loss._target_=molecules.absolute_error", "~task.loss.absolute_weight"],
     "task.loss: absolute_error() missing 2 required positional arguments: 'predicted' and 'batch'; "
     "absolute_error is a function: add `_partial_: true` to task.loss"),
]


@shares_the_install
@pytest.mark.parametrize("overrides,message", BAD_COMPONENTS, ids=[" ".join(o) for o, _ in BAD_COMPONENTS])
def test_bad_user_components_are_refused_with_the_key_named(installed: Path, project: Path, tmp_path: Path,
                                                            overrides: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    result = user_launch(installed, project, *SHORT, *overrides, run_dir=run_dir, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpctrain: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists(), "a refused run must leave no run directory behind"


@shares_the_install
def test_corrupt_ragged_offsets_are_refused_before_the_run(installed: Path, project: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(project))
    try:
        import molecules

        path = molecules.make_file(project / "molecules.h5", num_molecules=2000)  # 2000 molecules, not 160
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("molecules", None)
    with h5py.File(path, "r+") as file:  # offsets that decrease at samples 1000/1001, far from the dry step's
        offsets = file["atoms/offsets"]
        offsets[1001] = offsets[1000] - 11
    run_dir = tmp_path / "run"
    result = user_launch(installed, project, *SHORT, run_dir=run_dir, check=False)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hpctrain: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    # The file as the config names it (data.dataset.path: molecules.h5).
    assert errors[0].startswith("hpctrain: error: data.dataset: field 'positions': molecules.h5:/atoms/offsets "
                                "decreases at sample 1000: offsets[1000]="), errors[0]
    assert not run_dir.exists(), "a refused run must leave no run directory behind"


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_own_task_trains_as_a_slurm_job_and_a_bad_one_queues_nothing(installed: Path, project: Path,
                                                                     tmp_path: Path) -> None:
    from .test_slurm import known_jobs

    slurm = ["launcher=slurm", "launcher.nodes=2", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
             "launcher.timeout_min=10"]
    before = known_jobs()
    refused = user_launch(installed, project, *SHORT, *slurm, "model._target_=molecules.Missing",
                          run_dir=tmp_path / "refused", check=False)
    assert refused.returncode == 2 and "model._target_: cannot import 'molecules.Missing'" in refused.stderr
    assert known_jobs() - before == set() and not (tmp_path / "refused").exists()

    run_dir = tmp_path / "job"
    result = user_launch(installed, project, *SHORT, *slurm, "launcher.wait=true", run_dir=run_dir, timeout=600)
    assert "submitted SLURM job" in result.stdout
    summary = user_inspect(installed, project, run_dir)
    assert summary["task"] == "molecules" and summary["newest_checkpoint"]["finished"]
    with open_for_reading(run_dir / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, 25))
        assert file["validation/per_sample/absolute_error"].shape == (4, 40)


@shares_the_install
def test_separate_validation_and_test_files_are_read_and_checked(installed: Path, project: Path,
                                                                tmp_path: Path) -> None:
    sys.path.insert(0, str(project))
    try:
        import molecules

        molecules.make_file(project / "val.h5", num_molecules=24, seed=1)
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("molecules", None)
    run_dir = tmp_path / "run"
    refused = user_launch(installed, project, *SHORT, "data.val_dataset={path: val.h5}",
                          "data.test_dataset={path: missing.h5}", run_dir=run_dir, check=False)
    assert refused.returncode == 2 and "data.test_dataset: data file missing.h5 does not exist" in refused.stderr
    user_launch(installed, project, *SHORT, "trainer.max_steps=6", "data.val_dataset={path: val.h5}",
                "data.test_dataset={path: val.h5}", run_dir=run_dir)
    with open_for_reading(run_dir / "metrics.h5") as file:
        assert file["validation/sample_index"][()].tolist() == list(range(24))  # all of val.h5
        assert file["validation/per_sample/absolute_error"].shape == (1, 24)
