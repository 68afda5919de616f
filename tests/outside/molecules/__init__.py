"""A toy molecular-energy task: a ragged field of atom positions per molecule, molecule descriptors, an energy.

Written only against hpctrain's public contract (a dict batch of named tensors, a per-sample loss and metrics).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn


def make_file(path: str | Path, *, num_molecules: int = 160, seed: int = 0) -> Path:
    """An HDF5 file with the user's own field names: atoms as values + offsets (ragged), descriptors, energies."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(2, 9, size=num_molecules)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    positions = rng.normal(size=(offsets[-1], 3)).astype(np.float32)
    descriptors = rng.normal(size=(num_molecules, 4)).astype(np.float32)
    weights = np.array([0.5, -1.0, 0.25, 2.0], dtype=np.float32)
    energy = np.array([0.1 * (positions[a:b] ** 2).sum() for a, b in zip(offsets[:-1], offsets[1:])])
    energy = (energy + descriptors @ weights).astype(np.float64)
    path = Path(path)
    with h5py.File(path, "w") as file:
        file["atoms/positions"] = positions
        file["atoms/offsets"] = offsets
        file["molecule/descriptors"] = descriptors
        file["molecule/charge"] = rng.integers(-1, 2, size=num_molecules).astype(np.int16)
        file["targets/energy"] = energy
    return path


class EnergyNet(nn.Module):
    """A deep-set: a per-atom MLP summed over each molecule's real atoms, plus a linear map of the descriptors."""

    def __init__(self, hidden: int = 16, num_descriptors: int = 4) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.atom = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.descriptors = nn.Linear(num_descriptors, 1)

    def forward(self, positions: torch.Tensor, num_atoms: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(positions.shape[1], device=positions.device)[None, :] < num_atoms[:, None]
        per_atom = self.atom(positions).squeeze(-1) * mask
        return per_atom.sum(dim=1) + self.descriptors(descriptors).squeeze(-1)


class PerAtomEnergies(EnergyNet):
    """The same network (the same weights load) returning each molecule's energy and its atoms' contributions: a
    ragged output, padded, with its lengths in `per_atom_length`."""

    def forward(self, positions: torch.Tensor, num_atoms: torch.Tensor,
                descriptors: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = torch.arange(positions.shape[1], device=positions.device)[None, :] < num_atoms[:, None]
        per_atom = self.atom(positions).squeeze(-1) * mask
        return {"energy": per_atom.sum(dim=1) + self.descriptors(descriptors).squeeze(-1),
                "per_atom": per_atom, "per_atom_length": num_atoms}


class EnergyLoss:
    """Squared error of the energy, plus a small absolute-error term: two named per-sample components."""

    def __init__(self, *, target: str = "energy", absolute_weight: float = 0.1) -> None:
        self.target, self.absolute_weight = target, absolute_weight

    def __call__(self, predicted: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        error = predicted - batch[self.target].to(predicted.dtype)
        return {"squared": error**2, "absolute": self.absolute_weight * error.abs()}


def absolute_error(predicted: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (predicted - batch["energy"].to(predicted.dtype)).abs()


class WrongShapeLoss:
    """A broken loss for the tests: the mean over the batch, not one value per sample."""

    def __call__(self, predicted: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((predicted - batch["energy"].to(predicted.dtype)) ** 2).mean()


def halving_every(interval: int, *, every: int) -> float:
    """A user LR multiplier: halve the learning rate every `every` intervals."""
    return 0.5 ** (interval // every)
