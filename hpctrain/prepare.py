"""`python -m hpctrain.prepare [--config-dir DIR] [--scan] [OVERRIDES]`: prepare and check a run without training
it.

Runs the task's `data.prepare` hook (e.g. generates a missing synthetic file) and every check the launcher makes
before a run starts or is queued: the typed config, every `_target_`, the datasets, the model, the loss and
metrics, and one dry step. Use it on a login node to check a config, or in a plain sbatch script before `srun`
(slurm/train.sbatch), where the ranks must find the data ready instead of racing to make it.

`--scan` also reads every row of every field of every HDF5 file the config names, in parallel, and reports
non-finite values, chunks that do not decode and ragged offsets that do not add up, by file, field and row
(hpctrain.data.scan); it exits with 1 if it found any. Run it once on new data, before a long run is queued.
"""

from __future__ import annotations

import argparse
import sys

from hpctrain.components import check_run_inputs
from hpctrain.config import ConfigError
from hpctrain.launching.app import compose_config, fail
from hpctrain.run.contract import Components


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    parser = argparse.ArgumentParser(prog="python -m hpctrain.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m hpctrain.launch")
    parser.add_argument("--config-dir", "-cd", help="your own config directory (as Hydra's --config-dir)")
    parser.add_argument("--scan", action="store_true", help="also read every row of every HDF5 field and report "
                                                            "non-finite values, undecodable chunks, bad offsets")
    parser.add_argument("--workers", type=int, default=None, help="processes of the scan (default: the CPUs)")
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
    return scan_data(components, workers=args.workers) if args.scan else 0


def scan_data(components: Components, *, workers: int | None) -> int:
    """Scan the training, validation and test files; 1 if a problem was found."""
    from hpctrain.data.scan import fields_of, scan

    datasets = [components.split.train_dataset, components.split.val_dataset, components.test_dataset]
    items = fields_of(dataset for dataset in datasets if dataset is not None)
    if not items:
        print("scan: no HDF5 field to scan (only hpctrain.data.HDF5Dataset's files are scanned)", flush=True)
        return 0
    problems = scan(items, workers=workers, progress=sys.stderr.isatty())
    files = {item.path for item in items}
    for problem in problems:
        print(f"scan: {problem}", flush=True)
    print(f"scan: {len(items)} field(s) of {len(files)} file(s) read: "
          + (f"{len(problems)} problem(s)" if problems else "no problem found"), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
