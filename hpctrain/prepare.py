"""`python -m hpctrain.prepare [--config-dir DIR] [OVERRIDES]`: prepare and check a run without training it.

Runs the task's `data.prepare` hook (e.g. generates a missing synthetic file) and every check the launcher makes
before a run starts or is queued: the typed config, every `_target_`, the datasets, the model, the loss and
metrics, and one dry step. Use it on a login node to check a config, or in a plain sbatch script before `srun`
(slurm/train.sbatch), where the ranks must find the data ready instead of racing to make it.
"""

from __future__ import annotations

import argparse
import sys

from hpctrain.components import check_run_inputs
from hpctrain.config import ConfigError
from hpctrain.launching.app import compose_config, fail


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    parser = argparse.ArgumentParser(prog="python -m hpctrain.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m hpctrain.launch")
    parser.add_argument("--config-dir", "-cd", help="your own config directory (as Hydra's --config-dir)")
    args = parser.parse_args(argv)
    # launcher=srun in an sbatch script: still prepare here, this process runs once before the ranks start.
    overrides = [override for override in args.overrides if not override.startswith("launcher=")]
    try:
        config = compose_config(overrides, config_dir=args.config_dir)
        components = check_run_inputs(config, prepare=True)
    except ConfigError as error:
        fail(str(error))
    split = components.split
    print(f"ready: task {config.task.name}, {len(split.train_indices)} training / {len(split.val_indices)} "
          f"validation samples, model {type(components.model).__name__} with "
          f"{sum(p.numel() for p in components.model.parameters()):,} parameters", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
