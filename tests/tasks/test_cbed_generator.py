"""The CBED dataset generator: determinism across process counts, layout, label ranges, atomic writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpctrain.data import hdf5_writer
from hpctrain.tasks.cbed import (
    PARAMETER_NAMES,
    PARAMETER_RANGES,
    CBEDGeneratorConfig,
    generate_dataset,
    generator,
    label_normalization,
)

# 3 chunks of 8, so chunk boundaries and the ordering of results across processes are exercised.
SMALL = CBEDGeneratorConfig(num_images=24, image_size=32, chunk_images=8, seed=0)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as file:
        return file["images"][()], file["labels"][()]


# The tests that read the generated files share them: one xdist group, so that each worker does not generate them
# again (the two-process file starts two fresh Pythons).
shares_the_files = pytest.mark.xdist_group("cbed_generated")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("cbed")
    return {
        "one_process": generate_dataset(directory / "one.h5", SMALL, num_processes=1, progress=False),
        "two_processes": generate_dataset(directory / "nested" / "two.h5", SMALL, num_processes=2, progress=False),
        "again": generate_dataset(directory / "again.h5", SMALL, num_processes=1, progress=False),
        "other_seed": generate_dataset(
            directory / "other.h5", dataclasses.replace(SMALL, seed=1), num_processes=1, progress=False
        ),
    }


@shares_the_files
def test_process_count_does_not_change_a_bit(generated: dict[str, Path]) -> None:
    images_one, labels_one = _read(generated["one_process"])
    images_two, labels_two = _read(generated["two_processes"])
    assert images_one.tobytes() == images_two.tobytes()
    assert labels_one.tobytes() == labels_two.tobytes()


@shares_the_files
def test_same_seed_repeats_and_other_seed_differs(generated: dict[str, Path]) -> None:
    images, labels = _read(generated["one_process"])
    images_again, labels_again = _read(generated["again"])
    images_other, labels_other = _read(generated["other_seed"])
    assert images.tobytes() == images_again.tobytes() and labels.tobytes() == labels_again.tobytes()
    assert not np.array_equal(images, images_other) and not np.array_equal(labels, labels_other)


@shares_the_files
def test_file_matches_example_generation(generated: dict[str, Path]) -> None:
    images, labels = _read(generated["two_processes"])
    with generator._single_threaded_torch():
        image, label = generator.generate_example(SMALL, 13)
    assert np.array_equal(images[13], image) and np.array_equal(labels[13], label)


@shares_the_files
def test_layout_and_attributes(generated: dict[str, Path]) -> None:
    with h5py.File(generated["two_processes"], "r") as file:
        assert file.attrs["format"] == "hpctrain.cbed_distortion"
        assert file.attrs["format_version"] == 1
        assert file.attrs["image_size"] == 32 and file.attrs["num_images"] == 24
        assert json.loads(file.attrs["generator"]) == dataclasses.asdict(SMALL)
        assert isinstance(file.attrs["distoptica_version"], str)
        images, labels = file["images"], file["labels"]
        assert images.shape == (24, 32, 32) and images.dtype == np.float32 and images.chunks == (8, 32, 32)
        assert [images.attrs[f"dim_{k}"] for k in range(3)] == [
            "image index",
            "row (y decreasing downward)",
            "column (x)",
        ]
        assert labels.shape == (24, 8) and labels.dtype == np.float32
        assert [labels.attrs[f"dim_{k}"] for k in range(2)] == ["image index", "distortion parameter"]
        assert tuple(labels.attrs["parameter_names"]) == PARAMETER_NAMES
        weight, bias = label_normalization()
        assert np.array_equal(labels.attrs["normalization_weight"], weight)
        assert np.array_equal(labels.attrs["normalization_bias"], bias)


@shares_the_files
def test_images_and_labels_lie_in_their_ranges(generated: dict[str, Path]) -> None:
    images, labels = _read(generated["two_processes"])
    assert images.min() == 0.0 and images.max() == 1.0  # per image min-max scaling
    assert np.all(images.min(axis=(1, 2)) == 0) and np.all(images.max(axis=(1, 2)) == 1)
    low, high = np.array(PARAMETER_RANGES, dtype=np.float32).T
    assert np.all((labels >= low) & (labels <= high))
    weight, bias = label_normalization()
    normalized = weight * labels + bias
    assert np.all((normalized >= 0) & (normalized <= 1))
    assert np.all(labels.std(axis=0) > 0)


def test_label_normalization_maps_ranges_onto_unit_interval() -> None:
    weight, bias = label_normalization()
    assert weight.shape == bias.shape == (8,) and weight.dtype == bias.dtype == np.float32
    low, high = np.array(PARAMETER_RANGES).T
    np.testing.assert_allclose(weight * low + bias, 0, atol=1e-6)
    np.testing.assert_allclose(weight * high + bias, 1, atol=1e-6)
    np.testing.assert_allclose(PARAMETER_RANGES[6], (0.25, 0.75))


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_generation_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: BaseException
) -> None:
    real_generate_chunk = generator._generate_chunk

    def fail_on_second_chunk(config: CBEDGeneratorConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        if start > 0:
            raise interruption
        return real_generate_chunk(config, start, stop)

    monkeypatch.setattr(generator, "_generate_chunk", fail_on_second_chunk)
    target = tmp_path / "data.h5"
    with pytest.raises(type(interruption)):
        generate_dataset(target, SMALL, num_processes=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_worker_processes_run_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class InterruptAfterFirstChunk(hdf5_writer.tqdm):  # type: ignore[misc, name-defined]
        def update(self, n: float | None = 1) -> bool | None:
            raise KeyboardInterrupt  # what Ctrl-C does while the main process waits on the pool

    monkeypatch.setattr(hdf5_writer, "tqdm", InterruptAfterFirstChunk)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "data.h5", SMALL, num_processes=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_regeneration_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = CBEDGeneratorConfig(num_images=2, image_size=16, chunk_images=1)
    target = generate_dataset(tmp_path / "data.h5", config, num_processes=1, progress=False)
    before = target.read_bytes()

    def fail(config: CBEDGeneratorConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("boom")

    monkeypatch.setattr(generator, "_generate_chunk", fail)
    with pytest.raises(RuntimeError, match="boom"):
        generate_dataset(target, config, num_processes=1, progress=False)
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 8}, "image_size must be >= 16, got 8"),
        ({"num_images": 0}, "num_images must be >= 1, got 0"),
        (
            {"min_disk_radius": 0.2, "max_disk_radius": 0.1},
            r"max_disk_radius must be >= min_disk_radius \(0.2\), got 0.1",
        ),
        ({"min_lattice_spacing_in_disk_radii": 1.5}, "min_lattice_spacing_in_disk_radii must be > 2"),
        ({"max_blank_frame_fraction": 0.0}, r"max_blank_frame_fraction must be in \(0, 0.5\]"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_config_raises(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CBEDGeneratorConfig(**overrides)  # type: ignore[arg-type]


def test_negative_process_count_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_processes must be >= 0, got -1"):
        generate_dataset(tmp_path / "data.h5", SMALL, num_processes=-1)


@shares_the_files
def test_generate_command_writes_the_configured_file_and_keeps_an_existing_one(
        generated: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hpctrain.tasks.cbed.generate import main

    target = tmp_path / "cli.h5"
    args = ["data.prepare.num_images=24", "data.prepare.image_size=32", "+data.prepare.chunk_images=8",
            f"data.dataset.path={target}", "--processes", "1"]
    assert main(args) == 0
    assert "wrote 24 images of 32x32" in capsys.readouterr().out
    for written, expected in zip(_read(target), _read(generated["one_process"])):
        assert written.tobytes() == expected.tobytes()
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--skip-existing"]) == 0 and "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--overwrite", "data.prepare.seed=-1"])
    assert "data.prepare: seed must be >= 0" in capsys.readouterr().err
    for written, expected in zip(_read(target), _read(generated["one_process"])):  # the failed run kept the file
        assert written.tobytes() == expected.tobytes()
