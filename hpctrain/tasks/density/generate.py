"""`python -m hpctrain.tasks.density.generate [OVERRIDES]`: write a synthetic density-reversion dataset of any size
to the path the density_reversion task reads (`data.dataset.path`), with the generator settings of its
`data.prepare` node.

Takes the same Hydra overrides as the launcher (`task=density_reversion` is implied), so the file a run expects is
the file this makes, e.g.
    python -m hpctrain.tasks.density.generate data.prepare.num_samples=100000 data.prepare.image_size=64 \\
        data.dataset.path=/scratch/$USER/density_64px_100k.h5 --processes 16
Generation is bit-identical for a given seed whatever the number of processes, and writes to a temporary file
renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hpctrain.config import ConfigError
from hpctrain.launch import compose_config, fail
from hpctrain.tasks.density.generator import DensityGeneratorConfig, generate_dataset

_HOOK_KEYS = ("_target_", "path", "generate_if_missing", "num_processes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpctrain.tasks.density.generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.prepare.num_samples=100000")
    parser.add_argument("--processes", type=int, default=0, help="worker processes (default: one per CPU)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing file")
    existing.add_argument("--skip-existing", action="store_true", help="do nothing if the file exists")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if not any(override.startswith("task=") for override in overrides):
        overrides.insert(0, "task=density_reversion")
    try:
        config = compose_config(overrides)
    except ConfigError as error:
        fail(str(error))
    prepare = dict(config.data.prepare or {})
    if not str(prepare.get("_target_", "")).startswith("hpctrain.tasks.density."):
        fail("data.prepare is not the density_reversion task's generator (use task=density_reversion)")
    if args.processes < 0:
        fail(f"--processes must be >= 0, got {args.processes}")
    path = Path(config.data.dataset["path"])
    if path.exists() and args.skip_existing:
        print(f"{path} exists: nothing to do")
        return 0
    if path.exists() and not args.overwrite:
        fail(f"data.dataset.path={path} exists; pass --overwrite to replace it")
    try:
        generator = DensityGeneratorConfig(**{key: value for key, value in prepare.items() if key not in _HOOK_KEYS})
    except (TypeError, ValueError) as error:
        fail(f"data.prepare: {error}")
    started = time.perf_counter()
    generate_dataset(path, generator, num_processes=args.processes, progress=True)
    elapsed = time.perf_counter() - started
    print(f"wrote {generator.num_samples} samples of {generator.image_size}x{generator.image_size} to {path} "
          f"in {elapsed:.1f} s ({generator.num_samples / elapsed:.0f} samples/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
