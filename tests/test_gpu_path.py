"""The parts of the GPU path whose logic runs on a CPU: trainer.deterministic's settings and environment, the NCCL
environment, each rank's own CUDA RNG state (capture and restore, with torch.cuda's functions recorded: there is no
GPU here), fp16's grad scaler state through a real checkpoint and resume, and the step record's GPU memory column
(absent on a CPU). benchmarks/gpu_check.sh itself is tested in tests/test_gpu_check.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hpctrain.process import seeding
from hpctrain.components import build_components, build_trainer
from hpctrain.process.distributed import DistributedContext, process_group_environment, step_peak_memory
from hpctrain.run.metrics import MetricsWriter, open_for_reading

from .conftest import tiny_overrides
from .test_config import compose_config


@pytest.fixture
def restore_torch_flags():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def test_deterministic_sets_cudnn_cublas_and_keeps_a_users_cublas_value(monkeypatch: pytest.MonkeyPatch,
                                                                       restore_torch_flags: None) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seeding.configure_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    seeding.configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    seeding.configure_determinism(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_nccl_groups_get_async_error_handling_gloo_groups_nothing() -> None:
    assert process_group_environment("nccl") == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert process_group_environment("gloo") == {}


class RecordedCuda:
    """torch.cuda's RNG functions, recorded (this machine has no GPU)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple] = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        for name in ("get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, lambda *args, name=name: pytest.fail(f"{name} called"))

    def get_rng_state(self, device):
        self.calls.append(("get", torch.device(device)))
        return torch.full((16,), torch.device(device).index, dtype=torch.uint8)

    def set_rng_state(self, state, device):
        self.calls.append(("set", torch.device(device), int(state[0])))


def test_each_rank_captures_and_restores_only_its_own_gpus_rng_state(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = RecordedCuda(monkeypatch)
    own = torch.device("cuda", 3)
    state = seeding.capture_rng_state(own)
    assert len(state["cuda"]) == 1 and int(state["cuda"][0][0]) == 3
    seeding.restore_rng_state(state, own)
    assert cuda.calls == [("get", own), ("set", own, 3)]
    cpu_state = seeding.capture_rng_state(torch.device("cpu"))
    assert cpu_state["cuda"] == []
    seeding.restore_rng_state(cpu_state, own)  # a CPU run resumed on a GPU: its CUDA generator left as seeded
    seeding.restore_rng_state(state, torch.device("cpu"))  # and back: nothing to restore on a CPU
    assert len(cuda.calls) == 2


def test_fp16_grad_scaler_state_goes_through_the_checkpoint_and_back(tmp_path: Path, tiny_data: Path) -> None:
    # fp16 is refused on a CPU by the launcher (tests/test_config.py); the Trainer itself runs it with torch's CPU
    # grad scaler, which is enough to follow the scaler's state through a real checkpoint and a resume.
    config = compose_config(*tiny_overrides(tiny_data, "trainer.precision=fp16", "trainer.device=cpu",
                                            "trainer.max_steps=3", "callbacks.early_stopping.enabled=false"))
    context = DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    trainer = build_trainer(config, tmp_path, context, build_components(config))
    assert trainer.step.scaler.is_enabled()
    trainer.fit()
    trained = trainer.step.scaler.state_dict()
    assert trained["_growth_tracker"] == 3 - trainer.state.nonfinite_steps and trained["scale"] > 0
    resumed = build_trainer(config, tmp_path, context, build_components(config))
    assert resumed.step.scaler.state_dict() != trained  # a fresh scaler
    resumed.resume()
    assert resumed.step.scaler.state_dict() == trained


def test_gpu_memory_column_only_on_a_gpu(tmp_path: Path) -> None:
    assert np.isnan(step_peak_memory(torch.device("cpu")))
    for name, memory in (("cpu", np.nan), ("gpu", 1.5e9)):
        writer = MetricsWriter(tmp_path / f"{name}.h5", parameter_groups=["default"],
                               validation_sample_index=np.arange(2), config_json="{}", task_name="t", cursor=None)
        writer.log_step(step=1, epoch=0, loss=1.0, grad_norm=1.0, samples_per_second=1.0, nonfinite=False,
                        learning_rates=[0.1], max_memory_allocated=memory)
        writer.close()
        with open_for_reading(tmp_path / f"{name}.h5") as file:
            assert ("max_memory_allocated" in file["train"]) == (name == "gpu")
            if name == "gpu":
                assert file["train/max_memory_allocated"][()].tolist() == [1.5e9]
