"""The density_reversion task: its generator (determinism, layout, atomic writes, the prepare hook), the U-Net,
IRIS's ScaledDensityLoss and the normed residual against hand-computed values, the plots, and training through the
real launcher on one and two ranks. Real HDF5 files and real processes throughout."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpctrain.run.metrics import open_for_reading
from hpctrain.tasks.density import (
    DensityGeneratorConfig,
    DensityPlots,
    DensityUNet,
    NormedResidual,
    ScaledDensityLoss,
    ensure_dataset,
    generate_dataset,
    generate_example,
)

from .. import zygote
from ..conftest import PYTHON, REPO, launch

SMALL = DensityGeneratorConfig(num_samples=24, image_size=16, chunk_samples=8, seed=0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as file:
        return file["observations"][()], file["densities"][()], file["psf_sigma"][()]


def _env() -> dict[str, str]:
    # The commands run in the repository (cwd=REPO), which -m and -c put first on sys.path: no PYTHONPATH, so that
    # they share the suite's zygote instead of starting one of their own.
    return {**os.environ, "HYDRA_FULL_ERROR": "0"}


# ---------------------------------------------------------------------------------------------------- generator


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("density")
    return {
        "one": generate_dataset(directory / "one.h5", SMALL),
        "again": generate_dataset(directory / "again.h5", SMALL),
        "other_chunks": generate_dataset(directory / "chunks.h5", dataclasses.replace(SMALL, chunk_samples=5)),
        "other_seed": generate_dataset(directory / "other.h5", dataclasses.replace(SMALL, seed=1)),
    }


def test_same_seed_same_bytes_other_seed_differs(generated: dict[str, Path]) -> None:
    first, again, other = _read(generated["one"]), _read(generated["again"]), _read(generated["other_seed"])
    for a, b, c in zip(first, again, other):
        assert a.tobytes() == b.tobytes()
        assert not np.array_equal(a, c)


def test_chunk_size_does_not_change_a_bit(generated: dict[str, Path]) -> None:
    for a, b in zip(_read(generated["one"]), _read(generated["other_chunks"])):
        assert a.tobytes() == b.tobytes()


def test_file_rows_are_the_keyed_examples(generated: dict[str, Path]) -> None:
    observations, densities, psf = _read(generated["one"])
    observation, density, sigma = generate_example(SMALL, 13)
    assert observations[13].tobytes() == observation.tobytes() and densities[13].tobytes() == density.tobytes()
    assert psf[13] == np.float32(sigma)
    # Sample i depends on (seed, i) only: a file of 30 samples starts with the same 24.
    longer = generate_example(dataclasses.replace(SMALL, num_samples=30), 13)
    assert longer[1].tobytes() == density.tobytes()


def test_layout_units_and_value_ranges(generated: dict[str, Path]) -> None:
    with h5py.File(generated["one"], "r") as file:
        assert file.attrs["format"] == "hpctrain.density_reversion" and file.attrs["format_version"] == 1
        assert file.attrs["image_size"] == 16 and file.attrs["num_samples"] == 24
        assert file.attrs["density_units"] == "Msun/pc^2" and file.attrs["pixel_size_pc"] == SMALL.pixel_size_pc
        assert json.loads(file.attrs["generator"]) == dataclasses.asdict(SMALL)
        for name, units in (("observations", "dimensionless"), ("densities", "Msun/pc^2")):
            dataset = file[name]
            assert dataset.shape == (24, 16, 16) and dataset.dtype == np.float32 and dataset.chunks == (8, 16, 16)
            assert [dataset.attrs[f"dim_{k}"] for k in range(3)] == [
                "sample index", "row (y decreasing downward)", "column (x)"]
            assert dataset.attrs["units"] == units
        assert file["psf_sigma"].shape == (24,) and file["psf_sigma"].attrs["units"] == "pixel"
    observations, densities, psf = _read(generated["one"])
    assert np.all(densities > 0) and np.all(np.isfinite(observations))
    assert densities.max() / np.median(densities) > 100  # orders of magnitude: the asinh scaling matters
    assert np.all((psf >= SMALL.min_psf_sigma) & (psf <= SMALL.max_psf_sigma))
    # The observation follows the density: brighter where denser.
    assert np.corrcoef(np.log(densities).ravel(), observations.ravel())[0, 1] > 0.8


def test_generate_command_in_two_processes_writes_the_same_data(generated: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "cli.h5"
    command = [PYTHON, "-m", "hpctrain.tasks.density.generate", "data.prepare.num_samples=24",
               "data.prepare.image_size=16", "data.prepare.chunk_samples=8", f"data.dataset.path={target}",
               "--processes", "2"]
    result = zygote.run(command, cwd=REPO, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote 24 samples of 16x16" in result.stdout
    for a, b in zip(_read(generated["one"]), _read(target)):
        assert a.tobytes() == b.tobytes()
    again = zygote.run(command, cwd=REPO, env=_env(), timeout=300)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_interrupted_generation_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "big.h5"
    process = subprocess.Popen(
        [PYTHON, "-m", "hpctrain.tasks.density.generate", "data.prepare.num_samples=2000000",
         "data.prepare.image_size=16", f"data.dataset.path={target}", "--processes", "1"],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # A suite started in the background of a non-interactive shell inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the child Ctrl-C's default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while process.poll() is None and not list(tmp_path.glob(".big.h5.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the generation ended before it could be interrupted"
    time.sleep(0.5)  # well inside the generation loop
    process.send_signal(signal.SIGINT)  # Ctrl-C
    # Python acts on the signal when the current HDF5 call returns, which a loaded machine can delay a while.
    process.wait(timeout=300)
    assert list(tmp_path.iterdir()) == []


def test_prepare_hook_generates_once_and_refuses_stale_files(tmp_path: Path) -> None:
    target = tmp_path / "data" / "d.h5"
    settings = {"num_samples": 12, "image_size": 16, "seed": 3}
    with pytest.raises(ValueError, match="does not exist; generate it first"):
        ensure_dataset(str(target), generate_if_missing=False, **settings)
    ensure_dataset(str(target), **settings)
    written = target.read_bytes()
    ensure_dataset(str(target), chunk_samples=5, **settings)  # storage only: the same data, left alone
    assert target.read_bytes() == written
    with pytest.raises(ValueError, match=r"generated with noise_level=0.02, but data.prepare.noise_level=0.1"):
        ensure_dataset(str(target), noise_level=0.1, **settings)
    foreign = tmp_path / "mine.h5"
    with h5py.File(foreign, "w") as file:  # the user's own observations: not the generator's to judge
        file["observations"] = np.zeros((2, 16, 16), np.float32)
    ensure_dataset(str(foreign), **settings)
    with pytest.raises(ValueError, match="max_psf_sigma must be >= min_psf_sigma"):
        ensure_dataset(str(tmp_path / "x.h5"), min_psf_sigma=2.0, max_psf_sigma=1.0)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"image_size": 4}, "image_size must be >= 8, got 4"),
    ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
    ({"min_structures": 3, "max_structures": 2}, r"max_structures must be >= min_structures \(3\)"),
    ({"max_width": 0.6}, "max_width must be <= 0.5"),
    ({"reference_density": 0.0}, "reference_density must be > 0"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_bad_generator_settings_name_the_key(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DensityGeneratorConfig(**overrides)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 1, 16, 16)])
@pytest.mark.parametrize("depth", [1, 2])
def test_model_maps_images_to_density_images(shape: tuple[int, ...], depth: int) -> None:
    model = DensityUNet(width=4, depth=depth)
    assert model(torch.rand(shape)).shape == (3, 16, 16)
    assert DensityUNet()(torch.rand(2, 32, 32)).shape == (2, 32, 32)


def test_model_output_is_output_scale_times_sinh_of_its_scaled_output() -> None:
    torch.manual_seed(0)
    model = DensityUNet(width=4, depth=1, output_scale=7.0)
    with torch.no_grad():
        model.head.bias.fill_(2.0)
        observation = torch.rand(2, 8, 8)
        torch.testing.assert_close(model(observation), 7.0 * torch.sinh(model.scaled(observation)))


def test_model_uses_group_norm_so_samples_do_not_mix() -> None:
    torch.manual_seed(0)
    model = DensityUNet(width=8, depth=2)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    with torch.no_grad():
        model.head.weight.normal_()  # a head that is not ~0, so the check sees the features
        batch = torch.rand(4, 16, 16)
        together = model.train().scaled(batch)
        alone = torch.cat([model.scaled(batch[i:i + 1]) for i in range(4)])
    # Equal up to float rounding (batched convolutions sum in another order); BatchNorm would differ by O(1).
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_a_micro_batch_of_one_trains() -> None:
    model = DensityUNet(width=4, depth=2)
    loss = ScaledDensityLoss(normalization=10.0)(model(torch.rand(1, 16, 16)), {"density": torch.rand(1, 16, 16)})
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"width": 0}, "width must be an integer >= 1, got 0"),
    ({"depth": 0}, "depth must be an integer >= 1, got 0"),
    ({"output_scale": 0.0}, "output_scale must be a finite number > 0"),
    ({"output_scale": float("nan")}, "output_scale must be a finite number > 0"),
    ({"input_scale": -1.0}, "input_scale must be a finite number > 0"),
    ({"image_size": 20, "depth": 3}, r"image_size=20 must be a positive multiple of 2\*\*model.depth = 8"),
])
def test_bad_model_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DensityUNet(**kwargs)  # type: ignore[arg-type]


def test_model_refuses_images_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="model.image_size=32 but the data has 16x16 images"):
        DensityUNet(width=4, image_size=32)(torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match=r"image size 18 must be a positive multiple of 2\*\*model.depth = 4"):
        DensityUNet(width=4, depth=2)(torch.rand(1, 18, 18))
    with pytest.raises(ValueError, match=r"square single-channel images .* got \(1, 3, 16, 16\)"):
        DensityUNet(width=4)(torch.rand(1, 3, 16, 16))


# ----------------------------------------------------------------------------------------------- loss, metrics

# With s = 4 these densities have closed-form asinh(d / s): asinh(3/4) = ln 2, asinh(4/3) = ln 3, asinh(12/5) = ln 5,
# asinh(15/8) = ln 4 (asinh(x) = ln(x + sqrt(x^2 + 1))).
S = 4.0
PRED = torch.tensor([[[3.0, 0.0], [7.5, 9.6]], [[-3.0, 0.0], [0.0, 0.0]]])
TRUE = torch.tensor([[[0.0, 3.0], [7.5, 16 / 3]], [[3.0, 0.0], [0.0, 0.0]]])


def test_scaled_density_loss_equals_the_hand_computed_value() -> None:
    loss = ScaledDensityLoss(normalization=S)(PRED, {"density": TRUE})
    # sample 0: pixel differences ln2 - 0, 0 - ln2, ln4 - ln4, ln5 - ln3; sample 1: -ln2 - ln2, then zeros.
    expected = [(2 * math.log(2) ** 2 + math.log(5 / 3) ** 2) / 4, (2 * math.log(2)) ** 2 / 4]
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=0)
    np.testing.assert_allclose(expected, [0.3054622, 0.4804530], rtol=1e-6)  # the numbers, written out


def test_normed_residuals_equal_the_hand_computed_values() -> None:
    batch = {"density": TRUE}
    # (pred - true) / 4: sample 0 -> 3/4, -3/4, 0, (9.6 - 16/3)/4 = 16/15; sample 1 -> -6/4, 0, 0, 0.
    mean_abs = NormedResidual(normalization=S)(PRED, batch)
    mean = NormedResidual(normalization=S, reduction="mean")(PRED, batch)
    torch.testing.assert_close(mean_abs, torch.tensor([(0.75 + 0.75 + 16 / 15) / 4, 1.5 / 4]), rtol=1e-6, atol=0)
    torch.testing.assert_close(mean, torch.tensor([(16 / 15) / 4, -1.5 / 4]), rtol=1e-6, atol=1e-7)


def test_loss_takes_channel_dims_is_zero_when_exact_and_units_invariant() -> None:
    loss = ScaledDensityLoss(normalization=S)
    torch.testing.assert_close(loss(PRED.unsqueeze(1), {"density": TRUE}), loss(PRED, {"density": TRUE.unsqueeze(1)}))
    assert torch.equal(loss(TRUE, {"density": TRUE}), torch.zeros(2))
    # The same densities in other units (x 1000) with s in those units: the same loss.
    in_other_units = ScaledDensityLoss(normalization=S * 1000)(PRED * 1000, {"density": TRUE * 1000})
    torch.testing.assert_close(in_other_units, loss(PRED, {"density": TRUE}), rtol=1e-5, atol=0)
    pred = PRED.clone().requires_grad_()
    loss(pred, {"density": TRUE}).sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_bad_objective_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="normalization must be a finite density > 0"):
        ScaledDensityLoss(normalization=0.0)
    with pytest.raises(ValueError, match="reduction must be mean_abs or mean, got 'max'"):
        NormedResidual(normalization=1.0, reduction="max")
    with pytest.raises(ValueError, match=r"predicted densities \(2, 2, 2\) and the batch's 'density' \(2, 3, 3\)"):
        ScaledDensityLoss(normalization=1.0)(PRED, {"density": torch.zeros(2, 3, 3)})


# -------------------------------------------------------------------------------------------------------- plots


def _evaluation(step: int = 40, outputs_shape: tuple[int, ...] = (6, 16, 16)) -> types.SimpleNamespace:
    rng = np.random.default_rng(0)
    density = rng.lognormal(1.0, 2.0, size=(6, 16, 16)).astype(np.float32)
    return types.SimpleNamespace(
        step=step,
        per_sample={"loss": rng.random(40), "abs_normed_residual": rng.random(40),
                    "normed_residual": rng.normal(size=40)},
        sample_index=np.arange(100, 140),
        examples={"observation": np.log10(1 + density / 10), "density": density,
                  "outputs": (density * 1.1 - 0.5).reshape(outputs_shape), "index": np.arange(100, 106)},
    )


def _assert_pngs(paths: list[Path], directory: Path) -> None:
    assert len(paths) == 2
    for path in paths:
        assert path.parent == directory and path.suffix == ".png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in paths)  # no temporary files left


@pytest.mark.parametrize("outputs_shape", [(6, 16, 16), (6, 1, 16, 16)])
def test_plots_write_valid_pngs(tmp_path: Path, outputs_shape: tuple[int, ...]) -> None:
    directory = tmp_path / "plots"
    paths = DensityPlots(num_examples=3)(_evaluation(outputs_shape=outputs_shape), directory)
    _assert_pngs(paths, directory)
    assert {p.name for p in paths} == {"density_examples_step0000040.png", "density_residuals_step0000040.png"}


def test_plots_run_in_threads_without_pyplot(tmp_path: Path) -> None:
    script = f"""
import sys, threading, types
from pathlib import Path
from tests.tasks.test_density import _evaluation
from hpctrain.tasks.density import DensityPlots
plots, results = DensityPlots(), {{}}
def run(step):
    results[step] = plots(_evaluation(step=step), Path({str(tmp_path)!r}) / str(step))
threads = [threading.Thread(target=run, args=(step,)) for step in (10, 20, 30)]
[t.start() for t in threads]; [t.join() for t in threads]
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
print(sorted(results))
"""
    # A child of the suite's zygote, which has not imported matplotlib: the threads still import it first.
    result = zygote.run([PYTHON, "-c", script], cwd=REPO, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[10, 20, 30]"
    for step in (10, 20, 30):
        directory = tmp_path / str(step)
        _assert_pngs(sorted(directory.iterdir()), directory)


def test_plots_refuse_a_bad_example_count() -> None:
    with pytest.raises(ValueError, match="num_examples must be an integer >= 1, got 0"):
        DensityPlots(num_examples=0)


# ------------------------------------------------------------------------------------------- through the launcher

TINY = ["task=density_reversion", "debug=fast", "data.prepare.num_samples=160", "data.prepare.image_size=16",
        "model.width=8", "model.depth=2", "trainer.num_threads=1", "callbacks.metrics.plots=false"]


# The tests that read the two runs share them: one xdist group, so that both workers do not train them each.
shares_the_runs = pytest.mark.xdist_group("density_runs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny task trained on one rank (its data generated by the `data.prepare` hook), then on two ranks."""
    directory = tmp_path_factory.mktemp("density_runs")
    data = directory / "tiny.h5"
    one = launch([*TINY, f"data.dataset.path={data}"], run_dir=directory / "one")
    assert data.is_file() and "generating 160 synthetic density samples of 16x16" in one.stdout + one.stderr
    launch([*TINY, f"data.dataset.path={data}", "launcher.num_processes=2", "trainer.micro_batch_size=8"],
           run_dir=directory / "two")
    return {"one": directory / "one", "two": directory / "two"}


@pytest.mark.parametrize("ranks", ["one", "two"])
@pytest.mark.slow
@shares_the_runs
def test_task_trains_through_the_launcher_and_learns(runs: dict[str, Path], ranks: str) -> None:
    with open_for_reading(runs[ranks] / "metrics.h5") as file:
        assert file["train/step"][()].tolist() == list(range(1, 31))
        loss = file["validation/loss"][()]
        assert loss.shape == (3,) and np.all(np.isfinite(loss))
        assert loss[-1] < 0.9 * loss[0], loss  # it learns
        assert file["validation/sample_index"][()].tolist() == list(range(128, 160))
        for name in ("loss", "abs_normed_residual", "normed_residual"):
            assert file[f"validation/per_sample/{name}"].shape == (3, 32)
        np.testing.assert_allclose(file["validation/loss"][()], file["validation/per_sample/loss"][()].mean(axis=1),
                                   rtol=1e-5)
    # The task's plot hook ran on rank 0 at the end: observation / true / predicted images, as valid PNGs.
    final = sorted((runs[ranks] / "plots" / "final").glob("*.png"))
    assert final and all(path.read_bytes()[:8] == PNG_SIGNATURE for path in final)


@pytest.mark.slow
@shares_the_runs
def test_two_ranks_learn_as_one_rank(runs: dict[str, Path]) -> None:
    # 2 ranks x 8 samples = the global batch of 16 of one rank; GroupNorm never mixes samples, so only float
    # summation order differs.
    with open_for_reading(runs["one"] / "metrics.h5") as one, open_for_reading(runs["two"] / "metrics.h5") as two:
        np.testing.assert_allclose(two["validation/loss"][()], one["validation/loss"][()], rtol=1e-5)
        np.testing.assert_allclose(two["train/loss"][()], one["train/loss"][()], rtol=1e-5)
