"""Determinism: seeding before the model is built, deterministic kernels (trainer.deterministic), and the RNG
states a checkpoint carries so that a resumed run draws exactly the random numbers an uninterrupted one would."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# cuBLAS reproducibility (https://docs.nvidia.com/cuda/cublas/#results-reproducibility): read when the first cuBLAS
# handle is made, so it must be in the environment before the process's first CUDA matrix product.
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def deterministic_environment() -> dict[str, str]:
    """The environment variables deterministic GPU kernels need, for a process before it starts CUDA."""
    return {"CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE_CONFIG}


def configure_determinism(deterministic: bool) -> None:
    """trainer.deterministic: deterministic algorithms (warnings where an op has none), cuDNN's deterministic
    kernels without autotuning, and the cuBLAS workspace setting (a value the user set is kept). Off: cuDNN
    autotunes its convolution kernels for each new input shape (faster, not reproducible).

    Deterministic algorithms come without torch's filling of every new tensor with NaN
    (torch.utils.deterministic.fill_uninitialized_memory, on by default with them): that fill makes a kernel
    that reads memory it never wrote reproducible, at the cost of writing every op's output twice (4% of the
    debug model's training step on a CPU, benchmarks/ddp_step.py). Runs are reproducible through deterministic
    kernels and seeded, checkpointed random states; the bit-exact resume and DDP tests check it."""
    if deterministic:
        for name, value in deterministic_environment().items():
            if name not in os.environ:
                if torch.cuda.is_initialized():
                    log.warning("trainer.deterministic: CUDA started before %s=%s was set; set it in the job's "
                                "environment for reproducible cuBLAS results", name, value)
                os.environ[name] = value
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # see above
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states; of the CUDA generators only that of `device`, the one this rank drives (every
    rank sees all the node's GPUs: reading the others would start a CUDA context on each)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": {"version": python_state[0], "state": list(python_state[1]), "gauss": python_state[2]},
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore `capture_rng_state`'s states; the CUDA one into this rank's own `device` only."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0].cpu(), device)
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
