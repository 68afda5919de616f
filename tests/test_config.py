"""The typed config: composition of the real conf/, and every kind of bad input refused up front."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from hpctrain.config import Config, ConfigError, from_json, to_json
from hpctrain.launching.app import compose_config as launch_compose

from .conftest import launch, tiny_overrides


def compose_config(*overrides: str) -> Config:
    return launch_compose(list(overrides))


def test_default_config_is_debug_mode_on_the_builtin_task() -> None:
    config = compose_config()
    assert config.task.name == "cbed_distortion"
    assert config.launcher.name == "local" and config.launcher.num_processes == 1
    assert config.model["_target_"] == "hpctrain.tasks.cbed.DistopticaNet"
    assert config.data.prepare["image_size"] == 64 and config.task.inputs == ["image"]


def test_every_package_and_the_configs_are_in_the_wheels_package_list() -> None:
    """pyproject.toml lists the packages (so that conf/ can join them as hpctrain.conf): a new package must be
    added there, or a non-editable install would lack it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from setuptools import find_namespace_packages

    repo = Path(__file__).resolve().parents[1]
    settings = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {name for name in find_namespace_packages(str(repo), include=["hpctrain*", "hydra_plugins.*"])
             if not name.startswith("hpctrain.conf")
             and any((repo / name.replace(".", "/")).glob("*.py"))}
    assert found <= set(settings["packages"]), f"missing from pyproject.toml packages: {found - set(settings['packages'])}"
    assert settings["package-dir"]["hpctrain.conf"] == "conf" and (repo / "conf" / "config.yaml").is_file()


def test_config_round_trips_through_json() -> None:
    config = compose_config("optim.lr=3e-4", "model.width=32")
    assert from_json(to_json(config)) == config


def test_range_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="trainer.num_microbatches"):
        compose_config("trainer.num_microbatches=0")
    with pytest.raises(ConfigError, match="callbacks.checkpoint.keep_last"):
        compose_config("callbacks.checkpoint.keep_last=1")


@pytest.fixture
def broken_files(tmp_path: Path) -> dict[str, Path]:
    no_labels = tmp_path / "no_labels.h5"
    with h5py.File(no_labels, "w") as file:
        file.create_dataset("images", shape=(4, 32, 32), dtype="f4")
    not_hdf5 = tmp_path / "not_hdf5.h5"
    not_hdf5.write_text("this is not HDF5")
    return {"no_labels": no_labels, "not_hdf5": not_hdf5}


# (overrides, text the single error message must contain)
BAD_INPUTS = [
    (["trainer.max_stepz=5"], "Key 'max_stepz' not in 'TrainerConfig'"),
    (["trainer.max_steps=many"], "trainer.max_steps"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["optim.optimizer=lbfgs"], "optim.optimizer must be one of"),
    (["model.norm=layer"], "model: model.norm must be one of"),
    (["trainer.precision=fp8"], "trainer.precision must be one of"),
    (["data.dataset.path=/nonexistent/cbed.h5"], "data file /nonexistent/cbed.h5 does not exist"),
    (["data.dataset.fields.image=pictures"], "data.dataset: field 'image': "),
    (["+model.image_size=64"], "model.image_size=64 but the data has 32x32 images"),
    (["model.num_stages=6"], "must be a positive multiple of 2**model.num_stages"),
    (["trainer.device=cpu", "trainer.precision=fp16"], "fp16 needs a CUDA device"),
    (["+optim.param_groups=[{name: head, params: [nothing.*]}]"], "matches no parameter"),
    (["data.val_fraction=1.5"], "data.val_fraction must be in (0, 1)"),
    (["optim.schedule.scheduler={_target_: torch.optim.lr_scheduler.SequentialLR, milestones: [5], schedulers: "
      "[{_target_: torch.optim.lr_scheduler.LinearLR, total_iters: 5}, "
      "{_target_: torch.optim.lr_scheduler.CosineAnnealingLR, T_mx: 10}]}"],
     "optim.schedule.scheduler.schedulers[1]: CosineAnnealingLR.__init__() got an unexpected keyword argument 'T_mx'"),
    (["callbacks.monitor.metric=accuracy"], "callbacks.monitor.metric: 'accuracy' is not a validation value; "
                                            "available: loss, baseline_no_distortion, "),
    (["callbacks.monitor.mode=maximum"], "callbacks.monitor.mode must be one of min, max"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
@pytest.mark.slow
def test_bad_input_is_refused_before_any_work(tmp_path: Path, tiny_data: Path, overrides: list[str],
                                              message: str) -> None:
    run_dir = tmp_path / "run"
    result = launch(tiny_overrides(tiny_data, *overrides), run_dir=run_dir, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists(), "a refused run must leave no run directory behind"


# Hydra's own composition errors, in hpctrain's style: (override, the one line's message after "hpctrain: error: ").
HYDRA_ERRORS = [
    ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.max_step=1", "trainer.max_step: Key 'max_step' not in 'TrainerConfig'; did you mean trainer.max_steps?"),
    ("task=nosuch", "In 'config': Could not find 'task/nosuch'; Available options in 'task': cbed_distortion, "
                    "density_reversion"),
    ("trainer.max_steps=[1", "trainer.max_steps=[1: no viable alternative at input '[1'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override,message", HYDRA_ERRORS[:2], ids=[override for override, _ in HYDRA_ERRORS[:2]])
def test_hydra_composition_errors_are_one_line_with_exit_code_2(tmp_path: Path, override: str,
                                                                message: str) -> None:
    result = launch([override], run_dir=tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == f"hpctrain: error: {message}", result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", HYDRA_ERRORS, ids=[override for override, _ in HYDRA_ERRORS])
def test_hydra_composition_errors_name_the_key_in_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        compose_config(override)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_key_typo_inside_a_yaml_file_is_one_line_naming_the_key_and_the_file(tmp_path: Path) -> None:
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  max_stpes: 5\n")
    with pytest.raises(ConfigError) as error:
        launch_compose(["experiment=typo"], config_dir=str(tmp_path))
    assert str(error.value) == ("trainer.max_stpes: Key 'max_stpes' not in 'TrainerConfig' (in experiment/typo); "
                                "did you mean trainer.max_steps?")


@pytest.mark.parametrize("kind,message", [("no_labels", "has no HDF5 dataset 'labels'"),
                                          ("not_hdf5", "is not a readable HDF5 file")])
@pytest.mark.slow
def test_broken_data_files_are_refused(tmp_path: Path, broken_files: dict[str, Path], tiny_data: Path, kind: str,
                                       message: str) -> None:
    run_dir = tmp_path / "run"
    result = launch([*tiny_overrides(tiny_data), f"data.dataset.path={broken_files[kind]}"], run_dir=run_dir,
                    check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_unwritable_run_directory_is_refused(tmp_path: Path, tiny_data: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = launch(tiny_overrides(tiny_data), run_dir=blocker / "run", check=False)
    assert result.returncode != 0 and "is a file, not a directory" in result.stderr, result.stderr


@pytest.mark.slow
def test_read_only_run_directory_is_refused(tmp_path: Path, tiny_data: Path) -> None:
    # /proc refuses new files even to root, so this holds whoever runs the suite.
    result = launch(tiny_overrides(tiny_data), run_dir=Path("/proc/hpctrain-run"), check=False)
    assert result.returncode != 0 and "hydra.run.dir=/proc/hpctrain-run: cannot write in /proc" in result.stderr, \
        result.stderr


def test_cluster_presets_compose() -> None:
    gpu = compose_config("launcher=slurm_gpu")
    assert gpu.launcher.name == "slurm" and gpu.launcher.tasks_per_node == gpu.launcher.gpus_per_node == 4
    assert gpu.trainer.precision == "bf16"
    cluster = compose_config("experiment=cbed_cluster")
    assert cluster.model["coord_channels"] and cluster.model["image_size"] == 128 == cluster.data.prepare["image_size"]
    assert cluster.launcher.gpus_per_node == 4 and cluster.trainer.device == "cuda"
    assert cluster.launcher.nodes == 2 and cluster.data.dataset["path"].endswith("cbed_128px_200000.h5")


def test_a_long_sweep_point_name_fits_a_file_name_and_stays_distinct() -> None:
    from hpctrain.config import sweep_point_dirname
    short = ["optim.lr=0.001", "model.width=8"]
    assert sweep_point_dirname(short) == "model.width=8,optim.lr=0.001"
    long_a = [f"model.block_{i}.some_long_option_name=value_{i}" for i in range(12)]
    long_b = long_a[:-1] + ["model.block_11.some_long_option_name=other"]
    names = {sweep_point_dirname(long_a), sweep_point_dirname(long_b)}
    assert len(names) == 2 and all(len(name.encode()) <= 200 for name in names)
    assert sweep_point_dirname(list(reversed(long_a))) == sweep_point_dirname(long_a)  # the order does not matter
    assert all(name.startswith("model.block_0.some_long_option_name=value_0,") for name in names)
