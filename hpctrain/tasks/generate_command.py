"""The command line the built-in tasks' `generate` modules share: write the synthetic dataset that a task's
`data.prepare` node describes to `data.dataset.path`, composing the launcher's config with the same Hydra
overrides, so the file a run expects is the file this makes.

A task's own `generate` module names its task, its generator's settings class and its `generate_dataset`
function; everything else (overrides, --processes, what happens to an existing file, checks, the summary line) is
here, and the same for every task.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hpctrain.config import ConfigError
from hpctrain.launching.app import compose_config, fail

# Keys of a `data.prepare` node that are the hook's, not the generator's.
HOOK_KEYS = ("_target_", "path", "generate_if_missing", "num_processes")


@dataclass(frozen=True)
class Generator:
    task: str  # the task's config name (task=...)
    package: str  # the task's package: its `data.prepare` hook lives there
    settings: Callable[..., Any]  # the generator's settings dataclass, built from the rest of `data.prepare`
    generate: Callable[..., Path]  # generate(path, settings, *, num_processes=...)
    count: str  # the settings field with the number of samples, and what they are, e.g. ("num_images", "images")
    unit: str


def main(generator: Generator, doc: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {generator.package}.generate", description=doc.splitlines()[0])
    parser.add_argument("overrides", nargs="*",
                        help=f"Hydra overrides, e.g. data.prepare.{generator.count}=100000 (task={generator.task} "
                             f"is implied)")
    parser.add_argument("--processes", type=int, default=0, help="worker processes (default: one per CPU)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace an existing file")
    existing.add_argument("--skip-existing", action="store_true", help="do nothing if the file exists")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.processes < 0:
        fail(f"--processes must be >= 0, got {args.processes}")
    overrides = list(args.overrides)
    if not any(override.startswith("task=") for override in overrides):
        overrides.insert(0, f"task={generator.task}")
    try:
        config = compose_config(overrides)
    except ConfigError as error:
        fail(str(error))
    prepare = dict(config.data.prepare or {})
    if not str(prepare.get("_target_", "")).startswith(f"{generator.package}."):
        fail(f"data.prepare is not the {generator.task} task's generator (use task={generator.task})")
    path = Path(config.data.dataset["path"])
    if path.exists() and args.skip_existing:
        print(f"{path} exists: nothing to do")
        return 0
    if path.exists() and not args.overwrite:
        fail(f"data.dataset.path={path} exists; pass --overwrite to replace it")
    try:
        settings = generator.settings(**{key: value for key, value in prepare.items() if key not in HOOK_KEYS})
    except (TypeError, ValueError) as error:
        fail(f"data.prepare: {error}")
    started = time.perf_counter()
    generator.generate(path, settings, num_processes=args.processes, progress=True)
    elapsed = time.perf_counter() - started
    count = getattr(settings, generator.count)
    print(f"wrote {count} {generator.unit} of {settings.image_size}x{settings.image_size} to {path} "
          f"in {elapsed:.1f} s ({count / elapsed:.0f} {generator.unit}/s)")
    return 0
