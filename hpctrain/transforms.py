"""Batch transforms for `data.transforms`, run in the loader workers on whole batches (dicts of named tensors):
deterministic ones (Normalize, Cast) and augmentations drawn at random (AddNoise, AddLitter).

A transform is a callable `transform(batch) -> batch`, or `transform(batch, context) -> batch` when it draws
random numbers: `context.generators()` gives one numpy Generator per sample, keyed on (seed, stage, epoch, sample
index, position of the transform in the list) and on nothing else, so the augmented batch is the same for any
number of loader workers and ranks, and a resumed run draws exactly what an uninterrupted one would.

Device transforms (`task.device_transforms`, `apply_device_transforms`) follow the same contract in the training
process, on the batch after it is on the device and before the forward pass (e.g. interpolating a volume on the
GPU at a batch's coordinates, as dwi_ml does): `transform(batch) -> batch`, or `transform(batch, context)` with a
`DeviceTransformContext`, whose `generators()` are torch Generators on the batch's device, one per sample, keyed on
(seed, stage, epoch, sample index, position) apart from the loader transforms' keys.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch

Batch = dict[str, torch.Tensor]
# The order fixes each stage's random key: new stages go at the end.
STAGES = ("train", "validation", "test", "predict")
# Where a random transform applies unless it lists its stages: predictions (hpctrain.predict) read the data as
# it is.
DEFAULT_STAGES = ("train", "validation", "test")


@dataclass(frozen=True)
class TransformContext:
    """Where a batch comes from, for transforms that draw random numbers."""

    seed: int
    stage: str  # train, validation, test or predict
    epoch: int
    indices: np.ndarray
    position: int  # of the transform in data.transforms

    def generators(self) -> list[np.random.Generator]:
        stage = STAGES.index(self.stage)
        return [np.random.default_rng([self.seed, stage, self.epoch, int(index), self.position])
                for index in self.indices]


@dataclass(frozen=True)
class DeviceTransformContext:
    """Where a batch on the device comes from, for device transforms that draw random numbers."""

    seed: int
    stage: str  # train, validation or test
    epoch: int  # the training epoch; 0 in validation and the test phase (as for the loader's transforms)
    indices: np.ndarray  # the batch's sample indices (batch["index"]), on the host
    position: int  # of the transform in task.device_transforms
    device: torch.device

    def seeds(self) -> list[int]:
        """One 63-bit seed per sample, a function of (seed, stage, epoch, sample index, position) only."""
        stage = STAGES.index(self.stage)
        return [int(np.random.SeedSequence([self.seed, stage, self.epoch, int(index), self.position, _DEVICE])
                    .generate_state(1, np.uint64)[0] >> np.uint64(1)) for index in self.indices]

    def generators(self) -> list[torch.Generator]:
        """One torch Generator per sample, on the batch's device: draw sample i's numbers with
        `torch.rand(shape, generator=generators[i], device=context.device)`."""
        generators = []
        for seed in self.seeds():
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            generators.append(generator)
        return generators


# Keeps the device transforms' keys apart from the loader transforms' (same seed, stage, epoch, index, position).
_DEVICE = 1


def apply_device_transforms(transforms: Sequence[Callable[..., Any]], batch: Batch, *, seed: int, stage: str,
                            epoch: int = 0) -> Batch:
    """Run task.device_transforms, in order, on a batch already on its device (training, validation, the test
    phase and prediction all call this). `epoch` is the training epoch (0 outside training)."""
    if not transforms:
        return batch
    indices = batch["index"].cpu().numpy()  # one small copy to the host (a sync on a GPU) per batch
    device = batch["index"].device
    for position, transform in enumerate(transforms):
        if takes_context(transform):
            batch = transform(batch, DeviceTransformContext(seed=seed, stage=stage, epoch=epoch, indices=indices,
                                                            position=position, device=device))
        else:
            batch = transform(batch)
    return batch


def takes_context(transform: Callable[..., Any]) -> bool:
    """Whether a transform is called with a TransformContext as well as the batch."""
    try:
        inspect.signature(transform).bind({}, None)
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): batch only
        return False
    return True


def check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    stages = tuple(stages)
    if not stages or any(stage not in STAGES for stage in stages):
        raise ValueError(f"stages must name some of {', '.join(STAGES)}, got {list(stages)}")
    return stages


class Normalize:
    """(x - mean) / std of one field, as float32; mean and std are numbers or per-channel sequences that
    broadcast against the field's trailing axes."""

    def __init__(self, *, field: str, mean: float | Sequence[float] = 0.0, std: float | Sequence[float] = 1.0) -> None:
        self.field = field
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        if (self.std <= 0).any():
            raise ValueError(f"std must be > 0, got {std}")

    def __call__(self, batch: Batch) -> Batch:
        return {**batch, self.field: (batch[self.field].float() - self.mean) / self.std}


class Cast:
    """Convert one field to a torch dtype (e.g. float16 storage trained as float32)."""

    def __init__(self, *, field: str, dtype: str = "float32") -> None:
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, int64, ...), got {dtype!r}")
        self.field, self.dtype = field, getattr(torch, dtype)

    def __call__(self, batch: Batch) -> Batch:
        return {**batch, self.field: batch[self.field].to(self.dtype)}


class AddNoise:
    """Noise on one field, drawn per sample (IRIS, dwi_ml): `gaussian` adds std * N(0, 1); `poisson` replaces x by
    Poisson(x * counts) / counts (x >= 0, `counts` events per unit). Applied in the listed stages only."""

    def __init__(self, *, field: str, kind: str = "gaussian", std: float = 0.1, counts: float = 100.0,
                 probability: float = 1.0, stages: Sequence[str] = DEFAULT_STAGES) -> None:
        if kind not in ("gaussian", "poisson"):
            raise ValueError(f"kind must be gaussian or poisson, got {kind!r}")
        if std < 0 or counts <= 0 or not 0.0 <= probability <= 1.0:
            raise ValueError(f"need std >= 0, counts > 0 and probability in [0, 1]; got std={std}, counts={counts}, "
                             f"probability={probability}")
        self.field, self.kind, self.std, self.counts, self.probability = field, kind, std, counts, probability
        self.stages = check_stages(stages)

    def __call__(self, batch: Batch, context: TransformContext) -> Batch:
        if context.stage not in self.stages:
            return batch
        values = batch[self.field].numpy().astype(np.float32, copy=True)
        for row, rng in enumerate(context.generators()):
            if rng.random() >= self.probability:
                continue
            if self.kind == "gaussian":
                values[row] += (self.std * rng.standard_normal(values.shape[1:])).astype(np.float32)
            else:
                values[row] = rng.poisson(np.clip(values[row], 0, None) * self.counts) / self.counts
        return {**batch, self.field: torch.from_numpy(values)}


class AddLitter:
    """IRIS's litter: with `probability`, add `scale` times a sample drawn at random from a separate HDF5 dataset
    (its own file and dataset, treated as an endless supply) to one field, per sample."""

    def __init__(self, *, field: str, path: str, dataset: str, probability: float = 0.5, scale: float = 1.0,
                 stages: Sequence[str] = DEFAULT_STAGES) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if not os.path.isfile(path):
            raise ValueError(f"litter file {path} does not exist")
        with h5py.File(path, "r") as file:
            if not isinstance(file.get(dataset), h5py.Dataset) or file[dataset].shape[0] == 0:
                raise ValueError(f"{path} has no non-empty HDF5 dataset {dataset!r}")
            self.num_litter = file[dataset].shape[0]
            self.row_shape = file[dataset].shape[1:]
        self.field, self.path, self.dataset = field, path, dataset
        self.probability, self.scale = probability, scale
        self.stages = check_stages(stages)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __call__(self, batch: Batch, context: TransformContext) -> Batch:
        if context.stage not in self.stages:
            return batch
        if self._file is None or self._pid != os.getpid():  # one handle per loader worker
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        values = batch[self.field].numpy().astype(np.float32, copy=True)
        if values.shape[1:] != self.row_shape:
            raise ValueError(f"litter {self.path}:/{self.dataset} rows {self.row_shape} do not match field "
                             f"{self.field!r} {values.shape[1:]}")
        litter = self._file[self.dataset]
        for row, rng in enumerate(context.generators()):
            if rng.random() < self.probability:
                values[row] += self.scale * litter[int(rng.integers(self.num_litter))].astype(np.float32)
        return {**batch, self.field: torch.from_numpy(values)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}
