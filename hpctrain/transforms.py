"""Built-in batch transforms for `data.transforms`: callables batch -> batch, run in the loader workers on whole
batches (a dict of named tensors). A user's own transform is any such callable named by `_target_`."""

from __future__ import annotations

from typing import Sequence

import torch

Batch = dict[str, torch.Tensor]


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
