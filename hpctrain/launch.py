"""`python -m hpctrain.launch`: the Hydra app over conf/. With no arguments it trains the built-in task in
debug mode (one local process); `launcher.num_processes=N` runs N local DDP ranks.

Bad input is refused by `Preflight`, a Hydra callback that runs after composition and before Hydra creates the
run directory: the typed config, the run directory, the data file and the model are all checked first, and
the one error found is printed without a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from hpctrain.config import Config, ConfigError, register_configs, to_config
from hpctrain.job import absolute_paths, check_run_dir_writable, prepare, remove_launcher_leftovers, run_local

log = logging.getLogger("hpctrain")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def fail(message: str, *, exit_code: int = 2) -> None:
    print(f"hpctrain: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def checked_config(cfg: DictConfig) -> Config:
    return absolute_paths(to_config(cfg))


class Preflight(Callback):
    """Validates a single run completely before anything is written (sweep points are checked per job)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # lets `${hydra:...}` interpolations resolve this early
        try:
            typed = checked_config(config)
            check_run_dir_writable(Path(config.hydra.run.dir).absolute())
            prepare(typed, generate=True)
        except ConfigError as error:
            fail(str(error))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(HydraConfig.get().runtime.output_dir).absolute()
    try:
        config = checked_config(cfg)
        prepare(config, generate=True)
        log.info("run directory: %s", run_dir)
        return run_local(config, run_dir)
    except ConfigError as error:
        remove_launcher_leftovers(run_dir)
        fail(str(error))
        raise  # unreachable: fail() exits


register_configs()

if __name__ == "__main__":
    main()
