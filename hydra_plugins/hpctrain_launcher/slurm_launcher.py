"""A Hydra launcher that submits a whole sweep as one SLURM job array and returns at once.

Unlike hydra-submitit-launcher it never blocks the login node, and it can be re-run: points that finished are
skipped, points whose job is still queued or running are left alone, and the others (cancelled, failed,
never submitted) are submitted again and resume from their own checkpoints. Every point is validated, and the
resource request checked against the cluster, before anything is submitted.
"""

# No `from __future__ import annotations`: Hydra loads plugins without registering the module in sys.modules,
# and dataclasses cannot resolve string annotations then.
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class HpctrainSlurmLauncherConf:
    _target_: str = "hydra_plugins.hpctrain_launcher.slurm_launcher.HpctrainSlurmLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="hpctrain_slurm", node=HpctrainSlurmLauncherConf,
                             provider="hpctrain")


class HpctrainSlurmLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hpctrain.config import ConfigError
        from hpctrain.launching.app import checked_config, fail
        from hpctrain.launching.sweep import SweepPoint, submit_sweep

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        points, configs = [], []
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        try:
            for index, overrides in enumerate(job_overrides, start=initial_job_idx):
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(sweep_config):
                    sweep_config.hydra.job.id = str(index)
                    sweep_config.hydra.job.num = index
                HydraConfig.instance().set_config(sweep_config)
                run_dir = Path(str(sweep_config.hydra.sweep.dir), str(sweep_config.hydra.sweep.subdir)).absolute()
                config = checked_config(sweep_config)
                if config.launcher.name != "slurm":
                    raise ConfigError("hydra/launcher=hpctrain_slurm submits to SLURM: use launcher=slurm")
                points.append(SweepPoint(index=index, overrides=list(overrides), run_dir=run_dir, config=config))
                configs.append(sweep_config)
            outcomes = submit_sweep(points, sweep_dir)
        except ConfigError as error:
            _remove_sweep_leftovers(sweep_dir)
            fail(str(error))
            raise  # unreachable

        returns = []
        for point, sweep_config, outcome in zip(points, configs, outcomes):
            hydra_output = point.run_dir / ".hydra"
            hydra_output.mkdir(parents=True, exist_ok=True)
            task_config = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
            OmegaConf.save(task_config, hydra_output / "config.yaml")
            OmegaConf.save(OmegaConf.create(point.overrides), hydra_output / "overrides.yaml")
            job_return = JobReturn(overrides=point.overrides, cfg=task_config, hydra_cfg=sweep_config,
                                   working_dir=str(point.run_dir), task_name=str(sweep_config.hydra.job.name),
                                   status=JobStatus.COMPLETED)
            job_return.return_value = outcome
            returns.append(job_return)
        return returns


def _remove_sweep_leftovers(sweep_dir: Path) -> None:
    """A refused sweep submits nothing and leaves nothing: Hydra wrote multirun.yaml into the sweep directory
    before calling the launcher; remove it, and the directory if that leaves it empty."""
    (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
    try:
        sweep_dir.rmdir()  # only if empty: a re-run sweep keeps its points
    except OSError:
        pass
