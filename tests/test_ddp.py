"""Distributed training with real processes and a real gloo process group on CPU.

SGD keeps the comparison linear in the gradients, so the float rounding that differs between a sum over one
rank and an all-reduce over two stays at rounding level instead of being amplified by Adam's normalisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from hpctrain.components import build_components, build_trainer
from hpctrain.config import Config
from hpctrain.launching.early import asks_for_local_ranks

from .conftest import final_weights, launch, run_two_gloo_ranks, tiny_overrides
from .test_config import compose_config

# 154 training samples, global batch 16: 10 steps per epoch, the 10th with a 10-sample tail; 22 steps cross two.
SGD = ["optim.optimizer=sgd", "optim.lr=0.05", "optim.schedule.warmup=5", "trainer.max_steps=22",
       "callbacks.early_stopping.enabled=false", "trainer.val_every_steps=11"]


def assert_weights_close(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    assert reference.keys() == other.keys()
    for name in reference:
        torch.testing.assert_close(other[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max((reference[name] - other[name]).abs().max().item() for name in reference)
    print(f"largest weight difference: {moved:.3g}")


# The tests that compare with the one-rank run share it: one xdist group, so that both workers do not train it each.
shares_the_reference = pytest.mark.xdist_group("ddp_reference")


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("one_rank")
    launch(tiny_overrides(tiny_data, *SGD, "trainer.micro_batch_size=16"), run_dir=run_dir)
    return final_weights(run_dir)


class EnvironmentProbe:
    """A user callback that writes what its rank's environment says of HPCTRAIN_TEST_PROBE."""

    rank_zero_only = False

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_start(self, run) -> None:
        (self.directory / f"rank{run.rank}.txt").write_text(os.environ.get("HPCTRAIN_TEST_PROBE", "<unset>"))


@shares_the_reference
@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path: Path, tiny_data: Path,
                                                             one_rank_reference: dict[str, torch.Tensor]) -> None:
    # launcher.num_processes=2 on the command line: the ranks' forkserver starts before the launcher's imports,
    # before Hydra sets hydra.job.env_set; the ranks still run in the environment Hydra set.
    probes = tmp_path / "probes"
    probes.mkdir()
    result = launch(tiny_overrides(tiny_data, *SGD, "trainer.micro_batch_size=8", "launcher.num_processes=2",
                                   "+hydra.job.env_set.HPCTRAIN_TEST_PROBE=set-by-hydra",
                                   f"callbacks.user=[{{_target_: tests.test_ddp.EnvironmentProbe, "
                                   f"directory: '{probes}'}}]"),
                    run_dir=tmp_path)
    assert_weights_close(one_rank_reference, final_weights(tmp_path))
    # The preflight's checks ran in a process forked like the ranks; their log reached the launcher's.
    assert "dry step passed: model(image (8, 32, 32) float32)" in result.stdout + result.stderr
    assert [(probes / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["set-by-hydra"] * 2
    # Rank 0's log is in the run directory's hpctrain.log, as a one-rank run's is (rank 1 reports to the terminal).
    log = (tmp_path / "hpctrain.log").read_text()
    assert "run directory:" in log and "step 22: validation" in log and "training finished at step 22" in log
    assert "[rank 0]" in log and "[rank 1]" not in log


class ExitingModel(torch.nn.Module):
    """A user's model whose construction ends its process."""

    def __init__(self, **kwargs) -> None:
        os._exit(3)


class SystemExitModel(torch.nn.Module):
    """A user's model whose construction raises what no component check catches (not an Exception)."""

    def __init__(self, **kwargs) -> None:
        raise SystemExit("the model's own sys.exit")


@pytest.mark.slow
@pytest.mark.parametrize("processes,override,error", [
    (2, "model.width=0", "hpctrain: error: model: model.width must be >= 1, got 0"),
    (2, "model._target_=tests.test_ddp.ExitingModel", "the preflight's check process ended (exit code 3)"),
    (2, "model._target_=tests.test_ddp.SystemExitModel",
     "error: the preflight failed: SystemExit: the model's own sys.exit (in the preflight's check process)"),
    (1, "model._target_=tests.test_ddp.SystemExitModel",
     "error: the preflight failed: SystemExit: the model's own sys.exit")])
def test_runs_are_checked_before_anything_is_written(tmp_path: Path, tiny_data: Path, processes: int, override: str,
                                                     error: str) -> None:
    """With local ranks, the preflight checks the run's components in a process forked like them (with one, in
    the launcher): a refusal is the launcher's one-line error, the check process's death and any other failure
    (a user's sys.exit too) exit 1 with their cause in one line; either way no run directory is made."""
    run_dir = tmp_path / "run"
    result = launch(tiny_overrides(tiny_data, f"launcher.num_processes={processes}", override), run_dir=run_dir,
                    check=False)
    assert result.returncode == (2 if "width" in override else 1) and error in result.stderr, result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("argv,expected", [
    (["launcher.num_processes=2"], True), (["debug=fast", "++launcher.num_processes=4"], True),
    (["launcher=local", "launcher.num_processes=2"], True), (["launcher.num_processes=1"], False),
    (["launcher=slurm", "launcher.num_processes=2"], False), (["-m", "launcher.num_processes=2"], False),
    (["launcher.num_processes=2", "--cfg", "job"], False), (["optim.lr=0.1"], False)])
def test_which_command_lines_ask_for_local_ranks(argv: list[str], expected: bool) -> None:
    assert asks_for_local_ranks(argv) is expected


@shares_the_reference
@pytest.mark.slow
def test_accumulated_microbatches_match_one_larger_batch(tmp_path: Path, tiny_data: Path,
                                                         one_rank_reference: dict[str, torch.Tensor]) -> None:
    launch(tiny_overrides(tiny_data, *SGD, "trainer.micro_batch_size=4", "trainer.num_microbatches=4"),
           run_dir=tmp_path)
    assert_weights_close(one_rank_reference, final_weights(tmp_path))


@shares_the_reference
@pytest.mark.slow
def test_two_ranks_with_accumulation_match_one_rank(tmp_path: Path, tiny_data: Path,
                                                    one_rank_reference: dict[str, torch.Tensor]) -> None:
    launch(tiny_overrides(tiny_data, *SGD, "trainer.micro_batch_size=4", "trainer.num_microbatches=2",
                          "launcher.num_processes=2"), run_dir=tmp_path)
    assert_weights_close(one_rank_reference, final_weights(tmp_path))


class AllReduceCounter:
    """A DDP communication hook that counts gradient all-reduces (one call per gradient bucket)."""

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def hook(counter: "AllReduceCounter", bucket):
        counter.calls += 1
        return default_hooks.allreduce_hook(None, bucket)


def _count_allreduces(rank: int, config: Config, run_dir: str, port: int, results) -> None:
    from hpctrain.process.distributed import init_distributed, shutdown_distributed
    
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist = init_distributed(device_preference="cpu", timeout_s=120)
    counts = []
    for num_microbatches in (1, 3):
        trainer_config = config.trainer.__class__(**{**config.trainer.__dict__,
                                                     "num_microbatches": num_microbatches})
        trainer = build_trainer(config.__class__(**{**config.__dict__, "trainer": trainer_config}),
                                Path(run_dir) / str(num_microbatches), dist, build_components(config))
        counter = AllReduceCounter()
        trainer.ddp_model.register_comm_hook(counter, AllReduceCounter.hook)
        batches = iter(trainer.train_loader)
        backward_passes = 0
        for step in range(4):
            sizes = trainer.sampler.microbatch_sizes(step)
            microbatches = [next(batches) for _ in sizes]
            backward_passes += len(microbatches)
            trainer.train_step(microbatches, sizes, num_samples=trainer.sampler.samples_in_step(step))
        counts.append((num_microbatches, backward_passes, counter.calls))
    results.put((rank, counts))
    shutdown_distributed()


def test_gradients_are_all_reduced_only_on_the_last_microbatch(tmp_path: Path, tiny_data: Path) -> None:
    config = compose_config(*tiny_overrides(tiny_data, "trainer.micro_batch_size=4"))
    outcome = run_two_gloo_ranks(_count_allreduces, config, str(tmp_path))
    for rank in (0, 1):
        (_, passes_single, calls_single), (_, passes_accumulated, calls_accumulated) = outcome[rank]
        assert passes_accumulated == 3 * passes_single == 12
        buckets_per_sync = calls_single // 4
        assert buckets_per_sync >= 1 and calls_single == 4 * buckets_per_sync
        # With 3 micro-batches per step the number of all-reduces is the same: only the last one syncs.
        assert calls_accumulated == calls_single
