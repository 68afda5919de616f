"""Fine-tuning from another run (`trainer.init_from`): the model's initial weights taken from another run's
checkpoint (verified), by parameter-name patterns, before the first step of a run that has no checkpoint of its
own. Only the model's weights: the optimizer, the step and the RNG states start fresh. A resumed fine-tuning run
loads its own newest checkpoint and never initialises again, so its resume is as bit-exact as any run's.

With `optim.freeze` or `optim.param_groups` (VirtuaLearn3D's workflow): initialise the backbone, leave out the new
head (`exclude: [head.*]`), and freeze the backbone or give it a smaller learning rate; both act on names, after
the weights are in place.

Checked before anything runs (hpctrain.components.check_run_inputs): the run and its checkpoint exist and are
intact, every pattern matches, and each weight taken fits this model (the error lists the keys and shapes).
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import torch
from torch import nn

from hpctrain.config import ConfigError, InitFromConfig

log = logging.getLogger(__name__)

KEY = "trainer.init_from"


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def initial_weights(model: nn.Module, config: InitFromConfig) -> dict[str, torch.Tensor]:
    """The weights `config` takes from the other run for `model`; a ConfigError naming the keys at fault."""
    from hpctrain.run.averaging import weights_of
    from hpctrain.run.checkpoint import choose_checkpoint, load_checkpoint

    assert config.run is not None
    run_dir = Path(config.run).absolute()
    if not run_dir.is_dir():
        raise ConfigError(f"{KEY}.run: {run_dir} is not a run directory")
    try:
        info = choose_checkpoint(run_dir, config.checkpoint)
        source = weights_of(load_checkpoint(info), raw=config.raw_weights)  # its weight average, if it keeps one
    except ConfigError as error:
        raise ConfigError(f"{KEY}: {error}") from None
    for key, patterns in (("include", config.include), ("exclude", config.exclude)):
        unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(name, pattern) for name in source)]
        if unmatched:
            raise ConfigError(f"{KEY}.{key}: {_listed(unmatched)} match no weight of {info.path} (it has "
                              f"{_listed(sorted(source))})")
    taken = {name: value for name, value in source.items()
             if (not config.include or _matches(name, config.include)) and not _matches(name, config.exclude)}
    if not taken:
        raise ConfigError(f"{KEY}: include/exclude leave no weight of {info.path} to take")
    target = model.state_dict()
    misshaped = [f"{name} {tuple(value.shape)} -> {tuple(target[name].shape)}" for name, value in taken.items()
                 if name in target and value.shape != target[name].shape]
    unexpected = sorted(name for name in taken if name not in target)
    missing = sorted(name for name in target if name not in taken)
    if misshaped:
        raise ConfigError(f"{KEY}: weights of {info.path} do not fit this model's (checkpoint -> model): "
                          f"{_listed(misshaped)}; leave them out with {KEY}.exclude")
    if config.strict and (unexpected or missing):
        raise ConfigError(f"{KEY}.strict=true: " + "; ".join(filter(None, [
            f"not in this model: {_listed(unexpected)}" if unexpected else "",
            f"not initialised: {_listed(missing)}" if missing else ""])))
    if unexpected:
        log.info("%s: %d weights of %s are not in this model, left out: %s", KEY, len(unexpected), info.path,
                 _listed(unexpected))
    return {name: value for name, value in taken.items() if name in target}


def initialise_from(model: nn.Module, config: InitFromConfig) -> None:
    """Copy the other run's weights into `model` (in place: an optimizer built on it keeps its parameters); nothing
    while `config.run` is null."""
    if config.run is None:
        return
    weights = initial_weights(model, config)
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)
    kept = sorted(set(model.state_dict()) - set(weights))
    log.info("%s: %d weights taken from %s (checkpoint %s)%s", KEY, len(weights), config.run, config.checkpoint,
             f"; keeping this model's own initialisation for {_listed(kept)}" if kept else "")
