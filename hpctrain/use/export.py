"""`python -m hpctrain.export RUN_DIR [--format torch.export|torchscript] [--checkpoint best|latest|STEP]
[--output PATH] [--input FILE.h5] [OVERRIDES]`: the trained model as a self-contained artefact that loads without
hpctrain or the user's package.

- `torch.export` (default): `torch.export.export` of the model on one real batch, every input axis dynamic where
  the model allows it (`Dim.AUTO`), saved with `torch.export.save` (`.pt2`); load it with
  `torch.export.load(path).module()`.
- `torchscript`: `torch.jit.trace` on one real batch (`.torchscript.pt`); load it with `torch.jit.load(path)`.
  Tracing records the path the batch took: control flow that depends on the data is frozen.

The batch is the first of the run's validation samples (or of `--input`, the run's data.dataset node with another
file), through the run's transforms; the artefact is reloaded and its outputs on that batch compared with the
model's before anything is kept. Beside it: `<artefact>.config.json`, the run's config (hpctrain.config.from_json
reads it). Inside it (extra file `hpctrain.json`): the inputs in order, the checkpoint step and SHA-256, the model
digest. Both are written to temporary names and renamed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpctrain.config import ConfigError, to_json

log = logging.getLogger(__name__)

FORMATS = {"torch.export": ".pt2", "torchscript": ".torchscript.pt"}
EXPORT_DIRNAME = "export"
METADATA_NAME = "hpctrain.json"


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], form: str, path: Path,
            metadata: str) -> None:
    if form == "torch.export":
        from torch.export import Dim

        program = torch.export.export(model, inputs,
                                      dynamic_shapes=tuple({axis: Dim.AUTO for axis in range(value.ndim)}
                                                           for value in inputs))
        torch.export.save(program, str(path), extra_files={METADATA_NAME: metadata})
    else:
        traced = torch.jit.trace(model, inputs, strict=False, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_NAME: metadata})


def _reload(path: Path, form: str) -> Any:
    if form == "torch.export":
        return torch.export.load(str(path)).module()
    return torch.jit.load(str(path))


def compare_outputs(expected: Any, actual: Any, batch_size: int) -> float:
    """The largest difference |a - b| / (1 + |a|) between two outputs of the same structure (absolute for small
    values, relative for large ones); ValueError if they differ in names or shapes."""
    from hpctrain.use.predict import named_outputs

    want, got = named_outputs(expected, batch_size), named_outputs(actual, batch_size)
    if set(want) != set(got):
        raise ValueError(f"the reloaded artefact returns {sorted(got)}, the model {sorted(want)}")
    worst = 0.0
    for name in want:
        pairs = zip(want[name], got[name]) if isinstance(want[name], list) else [(want[name], got[name])]
        for a, b in pairs:
            if a.shape != b.shape:
                raise ValueError(f"output {name!r}: the reloaded artefact gives shape {b.shape}, the model {a.shape}")
            if a.size:
                a, b = a.astype(np.float64), b.astype(np.float64)
                worst = max(worst, float(np.max(np.abs(a - b) / (1.0 + np.abs(a)))))
    return worst


def export_run(run_dir: Path, *, form: str, checkpoint: str = "best", output: Path | None = None,
               input_path: Path | None = None, overrides: list[str] = (), tolerance: float = 1e-5,
               raw_weights: bool = False) -> Path:
    """Export a run's model (see the module's docstring; the checkpoint's weight average where it holds one,
    unless `raw_weights`); returns the artefact's path."""
    from hpctrain.run.checkpoint import checkpoint_sha256
    from hpctrain.run.contract import model_inputs
    from hpctrain.use.predict import build_reader, dataset_node, first_batch
    from hpctrain.use.runs import load_run

    if form not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {form!r}")
    run = load_run(run_dir, checkpoint=checkpoint, overrides=list(overrides), raw_weights=raw_weights)
    config = run.config
    model = run.model()
    if input_path is not None:
        node = dataset_node(config, input_path=input_path, node_text=None, inputs_only=False)
        reader = build_reader(node, config, seed=config.seed, stage="predict")
        batch = first_batch(reader, config, config.data.val_batch_size or config.trainer.micro_batch_size)
    else:
        from hpctrain.data.dataset import BatchReader

        split = run.components.split
        reader = BatchReader(split.val_dataset, transforms=run.components.transforms, seed=config.seed,
                             stage="validation")
        batch = reader[split.val_indices[:config.data.val_batch_size or config.trainer.micro_batch_size]]
    inputs = tuple(model_inputs(batch, config.task.inputs))
    output = (output or run.run_dir / EXPORT_DIRNAME / f"model_step_{run.checkpoint.step:09d}{FORMATS[form]}"
              ).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    metadata = json.dumps({"format": form, "inputs": list(config.task.inputs), "task": config.task.name,
                           "checkpoint_step": run.checkpoint.step, "checkpoint": str(run.checkpoint.path),
                           "checkpoint_sha256": checkpoint_sha256(run.checkpoint),
                           "model_sha256": run.model_sha256, "weights": run.weights,
                           "example_shapes": [list(value.shape) for value in inputs]}, indent=1)
    # The temporary file ends in the format's suffix: torch.export.load warns about any file not ending in .pt2.
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}{FORMATS[form]}")
    try:
        with torch.no_grad():
            expected = model(*inputs)
            try:
                _export(model, inputs, form, temporary, metadata)
            except Exception as error:
                raise ConfigError(f"--format {form}: exporting {type(model).__name__} failed: "
                                  f"{type(error).__name__}: {str(error).strip().splitlines()[0]}") from None
            difference = compare_outputs(expected, _reload(temporary, form)(*inputs), len(batch["index"]))
        if difference > tolerance:
            raise ConfigError(f"--format {form}: the reloaded artefact's outputs differ from the model's by up to "
                              f"{difference:.3g} on a real batch (tolerance {tolerance:g}); not kept")
        config_path = output.with_name(output.name + ".config.json")
        config_temporary = config_path.with_name(f".{config_path.name}.tmp-{os.getpid()}")
        config_temporary.write_text(to_json(config))
        os.replace(temporary, output)
        os.replace(config_temporary, config_path)
    finally:
        temporary.unlink(missing_ok=True)
    log.info("exported %s (%s) of step %d to %s; reloaded outputs match on a batch of %d (max difference %.3g)",
             type(model).__name__, form, run.checkpoint.step, output, len(batch["index"]), difference)
    return output


def main(argv: list[str] | None = None) -> int:
    from hpctrain.process.exit import skip_final_collection

    skip_final_collection()
    from hpctrain.launching.app import fail

    parser = argparse.ArgumentParser(prog="python -m hpctrain.export", description=(
        "Export a run's model as a self-contained torch.export or TorchScript artefact, checked on a real batch."))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    parser.add_argument("--format", default="torch.export", help="torch.export (default) or torchscript")
    parser.add_argument("--checkpoint", default="best", help="best (default), latest, or a step")
    parser.add_argument("--output", type=Path, default=None, help="default: RUN_DIR/export/model_step_<n>.<ext>")
    parser.add_argument("--raw-weights", action="store_true",
                        help="export the raw weights where the run keeps a weight average (optim.weight_averaging)")
    parser.add_argument("--input", type=Path, default=None, help="take the example batch from this file (the run's "
                                                                 "data.dataset format) instead of the validation set")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    try:
        path = export_run(args.run_dir, form=args.format, checkpoint=args.checkpoint, output=args.output,
                          input_path=args.input, overrides=list(args.overrides), raw_weights=args.raw_weights)
    except ConfigError as error:
        fail(str(error))
    print(f"exported -> {path}\n  config  -> {path}.config.json", flush=True)
    return 0

