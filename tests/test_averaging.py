"""Weight averaging (optim.weight_averaging, hpctrain.run.averaging): EMA and SWA on torch's AveragedModel, kept in
every checkpoint, resumed bit-exactly, identical on every rank, and the weights every consumer takes.

The EMA kill/resume case is tests/test_resume.py's (its RUN keeps an EMA); SWA's (SWALR, BatchNorm recomputed at
the end) is here."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from hpctrain.config import ConfigError, InitFromConfig, WeightAveragingConfig
from hpctrain.process.distributed import DistributedContext
from hpctrain.run.averaging import WeightAveraging, averaged_weights, weights_kind, weights_of
from hpctrain.run.checkpoint import CheckpointManager, state_dict_digest

from .conftest import PYTHON, REPO, kill_after_checkpoint, launch, run_two_gloo_ranks, tiny_overrides
from .test_config import compose_config
from . import zygote


def _one_rank() -> DistributedContext:
    return DistributedContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def test_ema_follows_torchs_update_with_a_warmed_up_decay_and_counts_only_applied_due_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    config = WeightAveragingConfig(kind="ema", decay=0.99, warmup=True, start_step=2, every_steps=2)
    averaging = WeightAveraging(config, model, [], dist=_one_rank(), inputs=["x"])
    expected = None
    for step in range(1, 9):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model(torch.randn(5, 3))  # BatchNorm's running statistics move too (EMA averages buffers)
        applied = step != 6  # a skipped (non-finite) step is not averaged
        averaging.after_step(step, applied=applied, last=False)
        current = {name: value.detach().clone() for name, value in model.state_dict().items()}
        if applied and step >= 2 and step % 2 == 0:
            if expected is None:
                expected, updates = current, 0
            else:
                decay = min(0.99, (1 + updates) / (10 + updates))
                expected = {name: value if not value.is_floating_point() else value + (1 - decay) * (
                    current[name] - value) for name, value in expected.items()}
            updates += 1
    state = {"model": model.state_dict(), "weight_averaging": averaging.state_dict()}
    averaged = averaged_weights(state)
    assert int(averaging.averaged.n_averaged) == 3  # steps 2, 4, 8 (6 was skipped)
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[name], value, rtol=0, atol=1e-6)
    taken = weights_of(state)
    assert taken.keys() == averaged.keys() and all(torch.equal(taken[name], averaged[name]) for name in taken)
    assert any(not torch.equal(taken[name], state["model"][name]) for name in taken)
    assert weights_kind(state) == "ema" and weights_kind(state, raw=True) == "raw"
    assert weights_of(state, raw=True) is state["model"]
    fresh = WeightAveraging(config, model, [], dist=_one_rank(), inputs=["x"])  # no update yet: the raw weights
    assert weights_kind({"model": {}, "weight_averaging": fresh.state_dict()}) == "raw"


@pytest.mark.parametrize("override, message", [
    ("{kind: polyak}", "optim.weight_averaging.kind must be null, ema or swa"),
    ("{kind: ema, decay: 1.0}", "optim.weight_averaging.decay must be in (0, 1)"),
    ("{kind: ema, swa_lr: 0.1}", "optim.weight_averaging.swa_lr must be > 0 and only with kind=swa"),
    ("{kind: swa, every_steps: 0}", "optim.weight_averaging.every_steps must be >= 1"),
])
def test_a_bad_weight_averaging_is_refused_naming_its_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose_config(f"optim.weight_averaging={override}")


def _train_two_ranks(rank: int, configs: list, run_dir: str, port: int, results) -> None:
    import os

    from hpctrain.components import build_components, build_trainer
    from hpctrain.process.distributed import init_distributed, shutdown_distributed

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist = init_distributed(device_preference="cpu", timeout_s=120)
    found = []
    for index, config in enumerate(configs):
        (Path(run_dir) / str(index)).mkdir(exist_ok=True)
        trainer = build_trainer(config, Path(run_dir) / str(index), dist, build_components(config))
        trainer.fit()
        averaged = trainer.averaging.averaged
        found.append((state_dict_digest(averaged.state_dict()), int(averaged.n_averaged),
                      # The parameters: a raw model's BatchNorm statistics are each rank's own under DDP.
                      state_dict_digest(dict(trainer.model.named_parameters())),
                      [float(group.optimizer.param_groups[0]["lr"]) for group in trainer.groups]))
    results.put((rank, found))
    shutdown_distributed()


@pytest.mark.slow
def test_two_ranks_keep_bitwise_the_same_average(tmp_path: Path, tiny_data: Path) -> None:
    """2 gloo ranks: an EMA with gradient accumulation (one update per optimizer step), and SWA with SWALR and
    BatchNorm statistics recomputed over each rank's shard at the end: the same average on both ranks."""
    common = ["trainer.max_steps=8", "trainer.val_every_steps=4", "callbacks.checkpoint.every_steps=4",
              "callbacks.early_stopping.enabled=false", "trainer.micro_batch_size=4"]
    configs = [compose_config(*tiny_overrides(tiny_data, *common, "trainer.num_microbatches=2",
                                              "optim.weight_averaging={kind: ema, decay: 0.9}")),
               compose_config(*tiny_overrides(tiny_data, *common, "model.norm=batch",
                                              "optim.weight_averaging={kind: swa, start_step: 4, swa_lr: 0.01}"))]
    outcome = run_two_gloo_ranks(_train_two_ranks, configs, str(tmp_path))
    assert outcome[0] == outcome[1]  # averages, update counts, raw weights, learning rates: bitwise alike
    (_, ema_updates, _, _), (_, swa_updates, _, swa_lrs) = outcome[0]
    assert ema_updates == 8  # once per optimizer step, not per micro-batch
    assert swa_updates == 5 and swa_lrs == [0.01]  # steps 4..8; SWALR took the learning rate to swa_lr


SWA = ["trainer.max_steps=20", "trainer.val_every_steps=5", "callbacks.checkpoint.every_steps=3",
       "callbacks.metrics.flush_every_seconds=0", "callbacks.early_stopping.enabled=false", "model.norm=batch",
       "optim.weight_averaging={kind: swa, start_step: 6, every_steps: 2, swa_lr: 0.002, anneal_steps: 4}"]


def _bitwise_equal(a: object, b: object) -> bool:
    """Nested containers of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_bitwise_equal, a, b))
    return a == b


def _newest_state(run_dir: Path) -> dict:
    manager = CheckpointManager(run_dir, keep_last=2)
    return CheckpointManager.load(manager.newest_valid())


@pytest.mark.slow
def test_swa_killed_after_its_start_resumes_bit_exact_and_every_consumer_takes_the_average(
        tmp_path: Path, tiny_data: Path) -> None:
    from hpctrain.run.fine_tune import initial_weights
    from hpctrain.use.export import METADATA_NAME, export_run
    from hpctrain.use.runs import load_model

    args = tiny_overrides(tiny_data, *SWA)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    launch(args, run_dir=reference)
    killed_at = kill_after_checkpoint(args, resumed, 9)  # after SWA's start (SWALR's state in the checkpoint)
    assert 9 <= killed_at < 20
    assert "resumed from" in launch(args, run_dir=resumed).stdout

    expected, found = _newest_state(reference), _newest_state(resumed)
    assert found["step"] == expected["step"] == 20
    for key in ("model", "weight_averaging", "optimizers", "schedulers", "train_state"):
        assert _bitwise_equal(found[key], expected[key]), key
    with h5py.File(reference / "metrics.h5") as ref, h5py.File(resumed / "metrics.h5") as res:
        np.testing.assert_array_equal(res["validation/loss"][()], ref["validation/loss"][()])
        np.testing.assert_array_equal(res["train/lr"][()], ref["train/lr"][()])
        assert ref["train/lr"][-1, 0] == pytest.approx(0.002)

    # The BatchNorm statistics of the average were recomputed over the training data at the end.
    averaged, raw = averaged_weights(expected), expected["model"]
    running = [name for name in raw if name.endswith("running_mean")]
    assert running and all(not torch.equal(averaged[name], raw[name]) for name in running)

    # Every consumer takes the average, or the raw weights when asked.
    averaged_sha, raw_sha = state_dict_digest(averaged), state_dict_digest(raw)
    assert averaged_sha != raw_sha
    assert state_dict_digest(load_model(reference, "latest").state_dict()) == averaged_sha
    assert state_dict_digest(load_model(reference, "latest", raw_weights=True).state_dict()) == raw_sha
    model = load_model(reference, "latest")
    taken = initial_weights(model, InitFromConfig(run=str(reference), checkpoint="latest"))
    assert state_dict_digest(taken) == averaged_sha
    raw_taken = initial_weights(model, InitFromConfig(run=str(reference), checkpoint="latest", raw_weights=True))
    assert state_dict_digest(raw_taken) == raw_sha
    exported = export_run(reference, form="torchscript", checkpoint="latest")
    extra = {METADATA_NAME: ""}
    torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra[METADATA_NAME])["model_sha256"] == averaged_sha
    assert json.loads(extra[METADATA_NAME])["weights"] == "swa"
    summary = zygote.run([PYTHON, "-m", "hpctrain.inspect", str(reference)], check=True, cwd=REPO).stdout
    assert f"sha256 {averaged_sha} (step 20, swa)" in summary and f"raw weights sha256 {raw_sha}" in summary
    output = tmp_path / "predicted.h5"
    zygote.run([PYTHON, "-m", "hpctrain.predict", str(reference), "--checkpoint", "latest", "--input",
                str(tiny_data), "--output", str(output), "--raw-weights"], check=True, cwd=REPO)
    with h5py.File(output) as file:
        assert file.attrs["weights"] == "raw" and file.attrs["model_sha256"] == raw_sha
