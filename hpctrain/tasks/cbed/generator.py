"""Synthetic distorted CBED patterns and their distortion labels, written once to an HDF5 file.

This module owns the demo task's data: the label convention (``PARAMETER_NAMES``, the label ranges and
their min-max normalisation), the label distribution (emicroml's), the image model (a simplified
fakecbed pattern distorted with distoptica), and the on-disk layout. Generation is parallel, bit-identical
whatever the number of processes (image i draws from ``np.random.default_rng([seed, i])``), and atomic
(a temporary file is renamed onto the target only when complete).

HDF5 layout (also in docs/data-format.md):

- ``images``: (n, N, N) float32 in [0, 1], chunks (chunk_images, N, N), uncompressed.
  attrs ``dim_0`` = "image index", ``dim_1`` = "row (y decreasing downward)", ``dim_2`` = "column (x)".
- ``labels``: (n, 8) float32, physical (unnormalised) distortion parameters in distoptica's fractional
  coordinates, ordered as ``PARAMETER_NAMES``. attrs ``dim_0`` = "image index",
  ``dim_1`` = "distortion parameter", ``parameter_names`` (8 strings), ``normalization_weight`` (8,)
  and ``normalization_bias`` (8,) float32, with x_norm = w * x + b in [0, 1].
- root attrs: ``format`` = "hpctrain.cbed_distortion", ``format_version`` = 1, ``image_size`` = N,
  ``num_images`` = n, ``generator`` = JSON of the ``CBEDGeneratorConfig``, ``distoptica_version``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import distoptica
import h5py
import numpy as np
import torch
import torch.nn.functional as F

from hpctrain.data.hdf5_writer import write_in_chunks

PARAMETER_NAMES: tuple[str, ...] = (
    "quadratic_radial_distortion_amplitude",
    "spiral_distortion_amplitude",
    "elliptical_distortion_vector_x",
    "elliptical_distortion_vector_y",
    "parabolic_distortion_vector_x",
    "parabolic_distortion_vector_y",
    "distortion_center_x",
    "distortion_center_y",
)

# The point the distortion centre scatters around: the image middle, in fractional coordinates.
REFERENCE_POINT = 0.5
_MAX_CENTER_OFFSET = 0.25
_MAX_ELLIPTICAL_AMPLITUDE = 0.125
_MAX_PARABOLIC_AMPLITUDE = 0.35

# (low, high) of each parameter, in PARAMETER_NAMES order; the normalisation maps them onto [0, 1].
PARAMETER_RANGES: tuple[tuple[float, float], ...] = (
    (-0.3, 1.5),
    (-0.75, 0.75),
    (-_MAX_ELLIPTICAL_AMPLITUDE, _MAX_ELLIPTICAL_AMPLITUDE),
    (-_MAX_ELLIPTICAL_AMPLITUDE, _MAX_ELLIPTICAL_AMPLITUDE),
    (-_MAX_PARABOLIC_AMPLITUDE, _MAX_PARABOLIC_AMPLITUDE),
    (-_MAX_PARABOLIC_AMPLITUDE, _MAX_PARABOLIC_AMPLITUDE),
    (REFERENCE_POINT - _MAX_CENTER_OFFSET, REFERENCE_POINT + _MAX_CENTER_OFFSET),
    (REFERENCE_POINT - _MAX_CENTER_OFFSET, REFERENCE_POINT + _MAX_CENTER_OFFSET),
)

FORMAT_NAME = "hpctrain.cbed_distortion"
FORMAT_VERSION = 1

# Spread of the distortion centre around the reference point (emicroml: |N(0, 1/20)| at a random angle).
_CENTER_OFFSET_SCALE = 1 / 20
# Standard deviation of each disk centre's jitter, as a fraction of the lattice spacing.
_LATTICE_JITTER = 0.03
# Range of the background peak's standard deviation, as a fraction of the image width.
_BACKGROUND_WIDTH_RANGE = (0.15, 0.4)


def label_normalization() -> tuple[np.ndarray, np.ndarray]:
    """Return (w, b), float32 arrays of shape (8,), with x_norm = w * x + b mapping each range onto [0, 1]."""
    low, high = np.array(PARAMETER_RANGES, dtype=np.float64).T
    weight = 1.0 / (high - low)
    return weight.astype(np.float32), (-low * weight).astype(np.float32)


@dataclass
class CBEDGeneratorConfig:
    """How to generate a CBED distortion dataset (the keyword arguments of ``ensure_dataset``, the Hydra node
    ``data.prepare`` of the cbed_distortion task).

    Lengths are fractions of the image width unless the name says pixels.

    Attributes:
        num_images: number of images (and label rows) in the file.
        image_size: N, the images are N x N pixels.
        seed: image i draws all its randomness from ``np.random.default_rng([seed, i])``.
        chunk_images: images per HDF5 chunk, and per work item handed to a process.
        min_disk_radius, max_disk_radius: range of the common disk radius of one pattern.
        min_lattice_spacing_in_disk_radii, max_lattice_spacing_in_disk_radii: range of the shortest
            lattice vector, in disk radii (above 2 so disks do not overlap).
        min_background_amplitude, max_background_amplitude: range of the Gaussian background's peak,
            relative to the brightest disk.
        min_blur_sigma, max_blur_sigma: range of the Gaussian blur's standard deviation, in pixels.
        mean_counts_per_pixel: mean electron count per pixel, which sets the Poisson noise level.
        max_blank_frame_fraction: redraw the distortion when distoptica's blank mask frame is wider than
            this fraction of a side.
        max_redraws: redraws allowed per image; after them the last usable draw is kept.
    """

    num_images: int = 2048
    image_size: int = 64
    seed: int = 0
    chunk_images: int = 64
    min_disk_radius: float = 0.04
    max_disk_radius: float = 0.1
    min_lattice_spacing_in_disk_radii: float = 2.5
    max_lattice_spacing_in_disk_radii: float = 4.0
    min_background_amplitude: float = 0.2
    max_background_amplitude: float = 1.0
    min_blur_sigma: float = 0.5
    max_blur_sigma: float = 1.5
    mean_counts_per_pixel: float = 100.0
    max_blank_frame_fraction: float = 1 / 6
    max_redraws: int = 10

    def __post_init__(self) -> None:
        def require(condition: bool, field: str, requirement: str) -> None:
            if not condition:
                raise ValueError(f"{field} must be {requirement}, got {getattr(self, field)!r}")

        def require_ordered(low_field: str, high_field: str) -> None:
            low = getattr(self, low_field)
            require(getattr(self, high_field) >= low, high_field, f">= {low_field} ({low!r})")

        require(self.num_images >= 1, "num_images", ">= 1")
        require(self.image_size >= 16, "image_size", ">= 16")
        require(self.seed >= 0, "seed", ">= 0")
        require(self.chunk_images >= 1, "chunk_images", ">= 1")
        require(self.min_disk_radius > 0, "min_disk_radius", "> 0")
        require(self.max_disk_radius < 0.5, "max_disk_radius", "< 0.5")
        require_ordered("min_disk_radius", "max_disk_radius")
        require(self.min_lattice_spacing_in_disk_radii > 2, "min_lattice_spacing_in_disk_radii", "> 2")
        require_ordered("min_lattice_spacing_in_disk_radii", "max_lattice_spacing_in_disk_radii")
        require(self.min_background_amplitude >= 0, "min_background_amplitude", ">= 0")
        require_ordered("min_background_amplitude", "max_background_amplitude")
        require(self.min_blur_sigma >= 0, "min_blur_sigma", ">= 0")
        require_ordered("min_blur_sigma", "max_blur_sigma")
        require(self.mean_counts_per_pixel > 0, "mean_counts_per_pixel", "> 0")
        require(0 < self.max_blank_frame_fraction <= 0.5, "max_blank_frame_fraction", "in (0, 0.5]")
        require(self.max_redraws >= 0, "max_redraws", ">= 0")


def _sample_labels(rng: np.random.Generator) -> np.ndarray:
    """Draw one label vector from emicroml's distribution (its code, not its docstring)."""
    center_offset = abs(rng.normal(0.0, _CENTER_OFFSET_SCALE))
    center_angle = rng.uniform(0.0, 2 * np.pi)
    quadratic = rng.uniform(*PARAMETER_RANGES[0])
    spiral = rng.uniform(*PARAMETER_RANGES[1])
    elliptical_amplitude = rng.uniform(0.0, _MAX_ELLIPTICAL_AMPLITUDE)
    elliptical_angle = rng.uniform(0.0, np.pi)
    parabolic_amplitude = rng.uniform(0.0, _MAX_PARABOLIC_AMPLITUDE)
    parabolic_angle = rng.uniform(0.0, 2 * np.pi)
    center_low, center_high = PARAMETER_RANGES[6]
    return np.array(
        [
            quadratic,
            spiral,
            elliptical_amplitude * np.cos(2 * elliptical_angle),
            elliptical_amplitude * np.sin(2 * elliptical_angle),
            parabolic_amplitude * np.cos(parabolic_angle),
            parabolic_amplitude * np.sin(parabolic_angle),
            # The clip is a 5-sigma safety net so every label lies inside the normalisation range.
            np.clip(REFERENCE_POINT + center_offset * np.cos(center_angle), center_low, center_high),
            np.clip(REFERENCE_POINT + center_offset * np.sin(center_angle), center_low, center_high),
        ]
    )


def distortion_model(labels: np.ndarray, image_size: int) -> distoptica.DistortionModel:
    """distoptica's model of the distortion a label vector (PARAMETER_NAMES order) describes."""
    quadratic, spiral, elliptical_x, elliptical_y, parabolic_x, parabolic_y, center_x, center_y = labels.tolist()
    params = distoptica.StandardCoordTransformParams(
        center=(center_x, center_y),
        quadratic_radial_distortion_amplitude=quadratic,
        elliptical_distortion_vector=(elliptical_x, elliptical_y),
        spiral_distortion_amplitude=spiral,
        parabolic_distortion_vector=(parabolic_x, parabolic_y),
    )
    # device_name="cpu": left as None, distoptica would pick a GPU inside every worker process.
    return distoptica.generate_standard_distortion_model(
        standard_coord_transform_params=params,
        sampling_grid_dims_in_pixels=(image_size, image_size),
        device_name="cpu",
    )


def _pixel_span(start: float, stop: float, size: int) -> slice:
    """Pixel indices covering [start, stop] (fractions of the width), plus one pixel for soft edges."""
    return slice(max(0, math.floor(start * size) - 1), max(0, math.ceil(stop * size) + 1))


def _render_undistorted_pattern(rng: np.random.Generator, config: CBEDGeneratorConfig) -> np.ndarray:
    """Disks of one radius on a rotated, jittered lattice over a Gaussian background, (N, N) float64."""
    size = config.image_size
    pixel_centres = (np.arange(size) + 0.5) / size
    u_x = pixel_centres[None, :]
    u_y = 1.0 - pixel_centres[:, None]  # y up, as in distoptica: row 0 is the top of the image

    radius = rng.uniform(config.min_disk_radius, config.max_disk_radius)
    spacing = radius * rng.uniform(config.min_lattice_spacing_in_disk_radii, config.max_lattice_spacing_in_disk_radii)
    # With |b| >= |a| and an angle in [60, 90] degrees the shortest lattice vector is a, so disks never overlap.
    rotation = rng.uniform(0.0, np.pi)
    lattice_angle = rng.uniform(np.pi / 3, np.pi / 2)
    second_length = spacing * rng.uniform(1.0, 1.3)
    basis = np.array(
        [
            [spacing * np.cos(rotation), spacing * np.sin(rotation)],
            [second_length * np.cos(rotation + lattice_angle), second_length * np.sin(rotation + lattice_angle)],
        ]
    )
    # Enough lattice sites to cover the image from a zero-order disk at the reference point.
    reach = math.ceil(np.sqrt(0.5) / (spacing * np.sin(lattice_angle))) + 1
    integers = np.arange(-reach, reach + 1)
    site_indices = np.stack(np.meshgrid(integers, integers, indexing="ij"), axis=-1).reshape(-1, 2)
    centres = REFERENCE_POINT + site_indices @ basis
    centres += rng.normal(0.0, _LATTICE_JITTER * spacing, size=centres.shape)
    brightness = rng.uniform(0.5, 1.0, size=len(centres))
    visible = np.all((centres > -radius) & (centres < 1 + radius), axis=1)
    centres, brightness = centres[visible], brightness[visible]

    pattern = np.zeros((size, size))
    for (centre_x, centre_y), disk_brightness in zip(centres, brightness):
        # Only the pixels near the disk: the cost stays proportional to the disk area at any image size.
        columns = _pixel_span(centre_x - radius, centre_x + radius, size)
        rows = _pixel_span(1 - centre_y - radius, 1 - centre_y + radius, size)  # rows count from the top
        distance = np.hypot(u_x[:, columns] - centre_x, u_y[rows, :] - centre_y)
        # Anti-aliased edge: the fraction of a pixel covered, from the signed distance in pixels.
        pattern[rows, columns] += disk_brightness * np.clip((radius - distance) * size + 0.5, 0.0, 1.0)

    background_amplitude = rng.uniform(config.min_background_amplitude, config.max_background_amplitude)
    background_width = rng.uniform(*_BACKGROUND_WIDTH_RANGE)
    squared_distance = (u_x - REFERENCE_POINT) ** 2 + (u_y - REFERENCE_POINT) ** 2
    return pattern + background_amplitude * np.exp(-squared_distance / (2 * background_width**2))


def _distort(
    rng: np.random.Generator, undistorted: np.ndarray, config: CBEDGeneratorConfig, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw labels (redrawing bad ones) and distort the pattern; return (distorted (N, N), labels (8,))."""
    size = config.image_size
    max_frame_width = config.max_blank_frame_fraction * size
    usable: tuple[np.ndarray, distoptica.DistortionModel] | None = None
    for _ in range(config.max_redraws + 1):
        labels = _sample_labels(rng)
        model = distortion_model(labels, size)
        try:
            # (left, right, bottom, top) pixels where distoptica's inverse did not converge; computing
            # it runs the iterative inverse, which raises RuntimeError when it fails altogether.
            frame = model.mask_frame_of_distorted_then_resampled_images
        except RuntimeError:
            continue
        usable = (labels, model)
        if max(frame) <= max_frame_width:
            break
    if usable is None:
        raise RuntimeError(
            f"image {index} (seed {config.seed}): distoptica failed to invert all "
            f"{config.max_redraws + 1} distortions drawn; raise data.generator.max_redraws"
        )
    labels, model = usable
    undistorted_tensor = torch.from_numpy(undistorted.astype(np.float32))[None, None]
    distorted = model.distort_then_resample_images(undistorted_images=undistorted_tensor)
    return distorted[0, 0].numpy().astype(np.float64), labels


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    # Replicate padding: the pattern continues past the edge, zeros would darken the border.
    padded = F.pad(torch.from_numpy(image)[None, None], (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return blurred[0, 0].numpy()


def generate_example(config: CBEDGeneratorConfig, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Return image ``index`` of the dataset ``config`` describes: ((N, N) float32 in [0, 1], (8,) float32)."""
    rng = np.random.default_rng([config.seed, index])
    undistorted = _render_undistorted_pattern(rng, config)
    distorted, labels = _distort(rng, undistorted, config, index)
    blurred = np.clip(_gaussian_blur(distorted, rng.uniform(config.min_blur_sigma, config.max_blur_sigma)), 0, None)
    mean = blurred.mean()
    counts = rng.poisson(blurred * (config.mean_counts_per_pixel / mean)) if mean > 0 else blurred
    low, high = counts.min(), counts.max()
    image = (counts - low) / (high - low) if high > low else np.zeros_like(blurred)
    return image.astype(np.float32), labels.astype(np.float32)


def _generate_chunk(config: CBEDGeneratorConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [start, stop) as ((n, N, N), (n, 8)) float32 arrays."""
    examples = [generate_example(config, index) for index in range(start, stop)]
    return np.stack([image for image, _ in examples]), np.stack([labels for _, labels in examples])


def _init_worker() -> None:
    # One thread per process: the processes already fill the cores, and a fixed thread count keeps
    # torch's CPU kernels bit-identical to the in-process path.
    torch.set_num_threads(1)


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_layout(file: h5py.File, config: CBEDGeneratorConfig) -> tuple[h5py.Dataset, h5py.Dataset]:
    size, count = config.image_size, config.num_images
    file.attrs["format"] = FORMAT_NAME
    file.attrs["format_version"] = FORMAT_VERSION
    file.attrs["image_size"] = size
    file.attrs["num_images"] = count
    file.attrs["generator"] = json.dumps(dataclasses.asdict(config))
    file.attrs["distoptica_version"] = distoptica.__version__
    # Uncompressed: training reads random chunks every epoch, and decompression would cost more than disk.
    images = file.create_dataset(
        "images", shape=(count, size, size), dtype=np.float32, chunks=(min(config.chunk_images, count), size, size)
    )
    images.attrs["dim_0"] = "image index"
    images.attrs["dim_1"] = "row (y decreasing downward)"
    images.attrs["dim_2"] = "column (x)"
    labels = file.create_dataset("labels", shape=(count, len(PARAMETER_NAMES)), dtype=np.float32)
    weight, bias = label_normalization()
    labels.attrs["dim_0"] = "image index"
    labels.attrs["dim_1"] = "distortion parameter"
    labels.attrs["parameter_names"] = list(PARAMETER_NAMES)
    labels.attrs["normalization_weight"] = weight
    labels.attrs["normalization_bias"] = bias
    return images, labels


def generate_dataset(
    path: str | os.PathLike[str],
    config: CBEDGeneratorConfig,
    *,
    num_processes: int = 0,
    progress: bool = True,
) -> Path:
    """Generate the dataset ``config`` describes into the HDF5 file ``path`` and return its path.

    ``num_processes`` = 0 uses every CPU, 1 generates in this process. The file appears at ``path`` only
    once complete: an interrupted run leaves whatever was there before (or nothing), never half a file.
    """
    return write_in_chunks(path, num_samples=config.num_images, chunk_samples=config.chunk_images,
                           layout=functools.partial(_write_layout, config=config),
                           chunk=functools.partial(_generate_chunk, config), num_processes=num_processes,
                           initializer=_init_worker, in_process=_single_threaded_torch, progress=progress,
                           unit="image")


def ensure_dataset(path: str, *, generate_if_missing: bool = True, num_processes: int = 0,
                   **generator: object) -> None:
    """The cbed_distortion task's `data.prepare` hook: generate the file at `path` when it does not exist
    (meant for small debug datasets; generate large ones with `python -m hpctrain.tasks.cbed.generate`)."""
    config = CBEDGeneratorConfig(**generator)  # type: ignore[arg-type]  # its checks name the bad key
    target = Path(path)
    if target.exists():
        return
    if not generate_if_missing:
        raise ValueError(f"data file {target} does not exist; generate it first with `python -m "
                         f"hpctrain.tasks.cbed.generate` and the same overrides")
    import logging

    logging.getLogger(__name__).info("generating %d synthetic images of %dx%d into %s", config.num_images,
                                     config.image_size, config.image_size, target)
    generate_dataset(target, config, num_processes=num_processes)
