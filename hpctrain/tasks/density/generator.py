"""Synthetic (observation, top-down density) image pairs for the density_reversion task, written once to HDF5.

This module owns the task's data: the density model (a background floor plus a few elongated Gaussian clouds
and filaments whose peak densities span orders of magnitude), the observation model (a Gaussian PSF blur whose
width is drawn per sample, a logarithmic response, additive noise), and the on-disk layout. Generation is pure
numpy, bit-identical whatever the number of processes and the chunk size (sample i draws all its randomness, in a
fixed order, from ``np.random.default_rng([seed, i])``), and atomic (a temporary file in the same directory is
renamed onto the target only when complete).

HDF5 layout (also in docs/density-task.md):

- ``observations``: (n, N, N) float32, the observed image, dimensionless (log10 of 1 + the PSF-blurred density
  over ``reference_density``, plus noise). chunks (chunk_samples, N, N).
  attrs ``dim_0`` = "sample index", ``dim_1`` = "row (y decreasing downward)", ``dim_2`` = "column (x)",
  ``units`` = "dimensionless".
- ``densities``: (n, N, N) float32 >= 0, the true top-down surface density, attrs ``dim_*`` as above and
  ``units`` = "Msun/pc^2".
- ``psf_sigma``: (n,) float32, each sample's PSF standard deviation, attrs ``dim_0`` = "sample index",
  ``units`` = "pixel".
- root attrs: ``format`` = "hpctrain.density_reversion", ``format_version`` = 1, ``image_size`` = N,
  ``num_samples`` = n, ``density_units`` = "Msun/pc^2", ``pixel_size_pc``, ``generator`` = JSON of the
  ``DensityGeneratorConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hpctrain.data.hdf5_writer import write_in_chunks

FORMAT_NAME = "hpctrain.density_reversion"
FORMAT_VERSION = 1
DENSITY_UNITS = "Msun/pc^2"

# Settings that change how the file is stored but not a single value in it.
_STORAGE_ONLY = ("chunk_samples",)


@dataclass
class DensityGeneratorConfig:
    """How to generate a density-reversion dataset (the keyword arguments of ``ensure_dataset``, the Hydra node
    ``data.prepare`` of the density_reversion task).

    Attributes:
        num_samples: number of (observation, density) pairs in the file.
        image_size: N, both images are N x N pixels.
        seed: sample i draws all its randomness from ``np.random.default_rng([seed, i])``.
        chunk_samples: samples per HDF5 chunk, and per work item handed to a process.
        min_structures, max_structures: range of the number of clouds/filaments per sample (inclusive).
        min_log10_peak, max_log10_peak: range of log10 of each structure's peak density in Msun/pc^2 (uniform in
            the log, so peaks span orders of magnitude and the loss's asinh scaling matters).
        min_width, max_width: range of a structure's minor-axis standard deviation, a fraction of the image width.
        max_elongation: a structure's major/minor axis ratio is log-uniform in [1, max_elongation] (filaments).
        background_density: mean of the uniform density floor, Msun/pc^2 (each sample: 0.5 to 1.5 times it).
        pixel_size_pc: the side of a pixel in parsec (recorded in the file; the generator works in pixels).
        min_psf_sigma, max_psf_sigma: range of the Gaussian PSF's standard deviation, in pixels.
        reference_density: observation = log10(1 + blurred density / reference_density) + noise, Msun/pc^2.
        noise_level: standard deviation of the additive Gaussian noise on the observation.
    """

    num_samples: int = 2048
    image_size: int = 32
    seed: int = 0
    chunk_samples: int = 64
    min_structures: int = 2
    max_structures: int = 6
    min_log10_peak: float = 0.0
    max_log10_peak: float = 3.5
    min_width: float = 0.03
    max_width: float = 0.12
    max_elongation: float = 6.0
    background_density: float = 1.0
    pixel_size_pc: float = 0.5
    min_psf_sigma: float = 0.5
    max_psf_sigma: float = 1.5
    reference_density: float = 10.0
    noise_level: float = 0.02

    def __post_init__(self) -> None:
        def require(condition: bool, field: str, requirement: str) -> None:
            if not condition:
                raise ValueError(f"{field} must be {requirement}, got {getattr(self, field)!r}")

        def require_ordered(low_field: str, high_field: str) -> None:
            low = getattr(self, low_field)
            require(getattr(self, high_field) >= low, high_field, f">= {low_field} ({low!r})")

        require(self.num_samples >= 1, "num_samples", ">= 1")
        require(self.image_size >= 8, "image_size", ">= 8")
        require(self.seed >= 0, "seed", ">= 0")
        require(self.chunk_samples >= 1, "chunk_samples", ">= 1")
        require(self.min_structures >= 0, "min_structures", ">= 0")
        require_ordered("min_structures", "max_structures")
        require(math.isfinite(self.min_log10_peak), "min_log10_peak", "finite")
        require(math.isfinite(self.max_log10_peak), "max_log10_peak", "finite")
        require_ordered("min_log10_peak", "max_log10_peak")
        require(self.min_width > 0, "min_width", "> 0")
        require(self.max_width <= 0.5, "max_width", "<= 0.5")
        require_ordered("min_width", "max_width")
        require(self.max_elongation >= 1, "max_elongation", ">= 1")
        require(self.background_density >= 0, "background_density", ">= 0")
        require(self.pixel_size_pc > 0, "pixel_size_pc", "> 0")
        require(self.min_psf_sigma >= 0, "min_psf_sigma", ">= 0")
        require_ordered("min_psf_sigma", "max_psf_sigma")
        require(self.reference_density > 0, "reference_density", "> 0")
        require(self.noise_level >= 0, "noise_level", ">= 0")


def _density(rng: np.random.Generator, config: DensityGeneratorConfig) -> np.ndarray:
    """A background floor plus rotated anisotropic Gaussians, (N, N) float64 in Msun/pc^2, all >= 0."""
    size = config.image_size
    centres = np.arange(size) + 0.5  # pixel centres, in pixels
    x = centres[None, :]
    y = centres[:, None]
    density = np.full((size, size), config.background_density * rng.uniform(0.5, 1.5))
    count = int(rng.integers(config.min_structures, config.max_structures + 1))
    for _ in range(count):
        centre_x, centre_y = rng.uniform(0.1, 0.9, size=2) * size
        minor = rng.uniform(config.min_width, config.max_width) * size
        major = minor * math.exp(rng.uniform(0.0, math.log(config.max_elongation)))
        angle = rng.uniform(0.0, math.pi)
        peak = 10.0 ** rng.uniform(config.min_log10_peak, config.max_log10_peak)
        along = (x - centre_x) * math.cos(angle) + (y - centre_y) * math.sin(angle)
        across = -(x - centre_x) * math.sin(angle) + (y - centre_y) * math.cos(angle)
        density += peak * np.exp(-0.5 * ((along / major) ** 2 + (across / minor) ** 2))
    return density


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D image with mirror ("reflect") edges, in pure numpy (deterministic, no
    threads): each output pixel is a fixed-order sum over its window."""
    if sigma <= 0:
        return image.copy()
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    windows = np.lib.stride_tricks.sliding_window_view
    rows = (windows(np.pad(image, ((0, 0), (radius, radius)), mode="reflect"), kernel.size, axis=1) * kernel).sum(-1)
    return (windows(np.pad(rows, ((radius, radius), (0, 0)), mode="reflect"), kernel.size, axis=0) * kernel).sum(-1)


def generate_example(config: DensityGeneratorConfig, index: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Sample ``index`` of the dataset ``config`` describes: (observation (N, N) float32, density (N, N) float32
    in Msun/pc^2, PSF sigma in pixels)."""
    rng = np.random.default_rng([config.seed, index])
    density = _density(rng, config)
    psf_sigma = float(rng.uniform(config.min_psf_sigma, config.max_psf_sigma))
    blurred = gaussian_blur(density, psf_sigma)
    observation = np.log10(1.0 + blurred / config.reference_density)
    observation += config.noise_level * rng.standard_normal(observation.shape)
    return observation.astype(np.float32), density.astype(np.float32), psf_sigma


def _generate_chunk(config: DensityGeneratorConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
    """Samples [start, stop) as ((n, N, N), (n, N, N), (n,)) float32 arrays."""
    examples = [generate_example(config, index) for index in range(start, stop)]
    return (np.stack([observation for observation, _, _ in examples]),
            np.stack([density for _, density, _ in examples]),
            np.array([sigma for _, _, sigma in examples], dtype=np.float32))


def settings(config: DensityGeneratorConfig) -> dict[str, object]:
    """The settings that determine the file's contents (the config without its storage-only fields)."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key not in _STORAGE_ONLY}


_IMAGE_DIMS = ("sample index", "row (y decreasing downward)", "column (x)")


def _write_layout(file: h5py.File, config: DensityGeneratorConfig) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
    size, count = config.image_size, config.num_samples
    file.attrs["format"] = FORMAT_NAME
    file.attrs["format_version"] = FORMAT_VERSION
    file.attrs["image_size"] = size
    file.attrs["num_samples"] = count
    file.attrs["density_units"] = DENSITY_UNITS
    file.attrs["pixel_size_pc"] = config.pixel_size_pc
    file.attrs["generator"] = json.dumps(dataclasses.asdict(config))
    chunks = (min(config.chunk_samples, count), size, size)
    observations = file.create_dataset("observations", shape=(count, size, size), dtype=np.float32, chunks=chunks)
    densities = file.create_dataset("densities", shape=(count, size, size), dtype=np.float32, chunks=chunks)
    for dataset, units in ((observations, "dimensionless"), (densities, DENSITY_UNITS)):
        for axis, name in enumerate(_IMAGE_DIMS):
            dataset.attrs[f"dim_{axis}"] = name
        dataset.attrs["units"] = units
    observations.attrs["description"] = (f"log10(1 + PSF-blurred density / {config.reference_density} {DENSITY_UNITS})"
                                         f" + N(0, {config.noise_level}^2) noise")
    densities.attrs["description"] = "true top-down surface density"
    psf = file.create_dataset("psf_sigma", shape=(count,), dtype=np.float32)
    psf.attrs["dim_0"] = "sample index"
    psf.attrs["units"] = "pixel"
    return observations, densities, psf


def generate_dataset(path: str | os.PathLike[str], config: DensityGeneratorConfig, *, num_processes: int = 1,
                     progress: bool = False) -> Path:
    """Generate the dataset ``config`` describes into the HDF5 file ``path`` and return its path.

    ``num_processes`` = 0 uses every CPU, 1 generates in this process; the contents do not depend on it. The file
    appears at ``path`` only once complete: an interrupted run leaves whatever was there before, never half a file.
    """
    return write_in_chunks(path, num_samples=config.num_samples, chunk_samples=config.chunk_samples,
                           layout=functools.partial(_write_layout, config=config),
                           chunk=functools.partial(_generate_chunk, config), num_processes=num_processes,
                           progress=progress)


def ensure_dataset(path: str, *, generate_if_missing: bool = True, num_processes: int = 1,
                   **generator: object) -> None:
    """The density_reversion task's `data.prepare` hook: generate the file at `path` when it does not exist (meant
    for small datasets; large ones: `python -m hpctrain.tasks.density.generate`).

    A file that exists and was written by this generator must have been generated with the same settings (else a
    ValueError names the first that differs), so a changed `data.prepare` never trains silently on stale data. Any
    other file (the user's own observations) is left alone.
    """
    config = DensityGeneratorConfig(**generator)  # type: ignore[arg-type]  # its checks name the bad key
    target = Path(path)
    if target.exists():
        _check_existing(target, config)
        return
    if not generate_if_missing:
        raise ValueError(f"data file {target} does not exist; generate it first with `python -m "
                         f"hpctrain.tasks.density.generate` and the same overrides")
    logging.getLogger(__name__).info("generating %d synthetic density samples of %dx%d into %s", config.num_samples,
                                     config.image_size, config.image_size, target)
    generate_dataset(target, config, num_processes=num_processes)


def _check_existing(path: Path, config: DensityGeneratorConfig) -> None:
    try:
        with h5py.File(path, "r") as file:
            if file.attrs.get("format") != FORMAT_NAME:
                return
            stored = json.loads(file.attrs["generator"])
    except (OSError, KeyError, ValueError):
        return  # not ours to judge: the dataset's own checks report an unreadable file
    wanted = settings(config)
    for key, value in wanted.items():
        if stored.get(key) != value:
            raise ValueError(f"{path} was generated with {key}={stored.get(key)!r}, but data.prepare.{key}={value!r}; "
                             f"delete the file, or point data.dataset.path elsewhere")
