"""`python -m hpctrain.launch`: the Hydra app over the configs shipped in hpctrain/conf/ (add your own with
`--config-dir DIR`). With no arguments it trains the built-in task in debug mode (one local process);
`launcher.num_processes=N` runs N local DDP ranks; `launcher=slurm` submits the run to SLURM with submitit and
returns at once (`-m` sweeps become one job array, see hydra_plugins/hpctrain_launcher).

Bad input is refused by `Preflight`, a Hydra callback that runs after composition and before Hydra creates the
run directory: the typed config, the run directory, every `_target_`, the datasets, the model, the loss and one
dry step are all checked first, and the one error found is printed without a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hpctrain.components import check_run_inputs
from hpctrain.config import Config, ConfigError, register_configs, to_config, to_json
from hpctrain.job import check_run_dir_writable, remove_launcher_leftovers, run_local
from hpctrain.slurm import check_resources, follow_instructions, run_srun_task, submit_run

log = logging.getLogger("hpctrain")

# The configs ship inside the package, so an installed hpctrain composes them from any directory.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
# The config Preflight checked in this process (JSON), so the task function does not check it a second time.
_checked_by_preflight: str | None = None


def fail(message: str, *, exit_code: int = 2) -> None:
    print(f"hpctrain: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def checked_config(cfg: DictConfig) -> Config:
    return to_config(cfg)


def check_inputs(config: Config) -> None:
    """All checks of a run's inputs; srun tasks all start at once: they must find the data, not race to make it."""
    check_run_inputs(config, prepare=config.launcher.name != "srun")
    if config.launcher.name == "slurm":
        check_resources(config.launcher)


def compose_config(overrides: list[str], *, config_dir: str | None = None) -> Config:
    """The typed config the launcher would run with these overrides (composed, not run); `config_dir` adds a
    user's config directory, like `--config-dir`."""
    register_configs()
    if config_dir is not None:
        overrides = [*overrides, f"hydra.searchpath=[file://{Path(config_dir).absolute()}]"]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as error:  # names the key at fault
        raise ConfigError(str(error).splitlines()[0]) from None
    return checked_config(cfg)


class Preflight(Callback):
    """Validates a single run completely before anything is written (sweep points are checked per job)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _checked_by_preflight
        HydraConfig.instance().set_config(config)  # lets `${hydra:...}` interpolations resolve this early
        try:
            typed = checked_config(config)
            check_run_dir_writable(Path(config.hydra.run.dir).absolute())
            check_inputs(typed)
        except ConfigError as error:
            fail(str(error))
        _checked_by_preflight = to_json(typed)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
    try:
        config = checked_config(cfg)
        if to_json(config) != _checked_by_preflight:  # a multirun point: the preflight callback did not see it
            check_inputs(config)
        if config.launcher.name == "slurm":
            return submit(config, run_dir)
        if config.launcher.name == "srun":
            return run_srun_task(config, run_dir)
        log.info("run directory: %s", run_dir)
        summary = run_local(config, run_dir)
        if summary.get("finished"):
            from hpctrain.runs import how_to_use

            print(how_to_use(run_dir), flush=True)
        return summary
    except ConfigError as error:
        remove_launcher_leftovers(run_dir)
        fail(str(error))
        raise  # unreachable: fail() exits


def submit(config: Config, run_dir: Path) -> dict[str, Any]:
    job = submit_run(config, run_dir)
    print(follow_instructions(job.job_id, run_dir), flush=True)
    if not config.launcher.wait:
        return {"job_id": job.job_id, "run_dir": str(run_dir)}
    summary = job.results()[0]  # rank 0's summary; raises with the job's error if it failed
    print(f"job {job.job_id} done: {summary}", flush=True)
    return summary


register_configs()

if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: Hydra instantiates the Preflight callback from
    # `hpctrain.launch`, and both must share its record of what was checked.
    from hpctrain.launch import main as imported_main

    imported_main()
