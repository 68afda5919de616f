"""`python -m hpctrain.tasks.cbed.generate [OVERRIDES]`: write a synthetic CBED dataset of any size to the path
the cbed_distortion task reads (`data.dataset.path`), with the generator settings of its `data.prepare` node.

Takes the same Hydra overrides as the launcher, so the file a run expects is the file this makes, e.g.
    python -m hpctrain.tasks.cbed.generate data.prepare.num_images=200000 data.prepare.image_size=128 \\
        data.dataset.path=/scratch/$USER/cbed_128px_200k.h5 --processes 32
Generation runs in parallel processes, is bit-identical for a given seed whatever their number, and writes to
a temporary file renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from hpctrain.config import ConfigError
from hpctrain.launch import compose_config, fail
from hpctrain.tasks.cbed.generator import CBEDGeneratorConfig, generate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpctrain.tasks.cbed.generate", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.prepare.num_images=200000")
    parser.add_argument("--processes", type=int, default=0, help="worker processes (default: one per CPU)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing file")
    existing.add_argument("--skip-existing", action="store_true", help="do nothing if the file exists")
    args = parser.parse_args(argv)
    try:
        config = compose_config(args.overrides)
    except ConfigError as error:
        fail(str(error))
    prepare = dict(config.data.prepare or {})
    if not prepare.get("_target_", "").startswith("hpctrain.tasks.cbed."):
        fail("data.prepare is not the cbed_distortion task's generator (use task=cbed_distortion)")
    path = Path(config.data.dataset["path"])
    if path.exists() and args.skip_existing:
        print(f"{path} exists: nothing to do")
        return 0
    if path.exists() and not args.overwrite:
        fail(f"data.dataset.path={path} exists; pass --overwrite to replace it")
    settings = {key: value for key, value in prepare.items()
                if key not in ("_target_", "path", "generate_if_missing", "num_processes")}
    try:
        generator = CBEDGeneratorConfig(**settings)
    except (TypeError, ValueError) as error:
        fail(f"data.prepare: {error}")
    started = time.perf_counter()
    generate_dataset(path, generator, num_processes=args.processes)
    elapsed = time.perf_counter() - started
    print(f"wrote {generator.num_images} images of {generator.image_size}x{generator.image_size} to {path} "
          f"in {elapsed:.1f} s ({generator.num_images / elapsed:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
