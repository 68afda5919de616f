"""Using what a run learned: a finished (or stopped) run directory opened for use, in a notebook or a script.

`load_model(run_dir)` rebuilds the user's own model class from the run's resolved config (the JSON stored in each
checkpoint, so the run directory is all it needs), loads the checkpoint's weights after checking them against the
manifest's CRC-32 (a corrupt checkpoint is refused with its file named), and returns it in eval mode on `device`.
`load_run(run_dir)` gives the config, the checkpoint list and, when asked for, the components (datasets, loss,
metrics, transforms) built from that config.

A run moved to another machine or directory: its config still names the old data paths. `overrides` are
`key=value` pairs on the run's config (the same as `python -m hpctrain.test`'s), e.g.
`["data.dataset.path=/new/place/train.h5"]`; the model itself needs no data and loads anywhere its package is
installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpctrain.run.averaging import weights_kind, weights_of
from hpctrain.run.checkpoint import CheckpointInfo, CheckpointManager, choose_checkpoint, load_checkpoint
from hpctrain.config import Config, ConfigError, to_config, to_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hpctrain.run.contract import Components


def config_with_overrides(config_json: str, overrides: Sequence[str]) -> Config:
    """A run's config (its JSON, as stored in a checkpoint) with `key=value` overrides applied, checked."""
    config = to_dict(to_config(OmegaConf.create(json.loads(config_json))))
    try:
        merged = OmegaConf.merge(OmegaConf.create(config), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ConfigError(f"bad override: {str(error).splitlines()[0]}") from None
    return to_config(merged)


def run_config(info: CheckpointInfo, overrides: Sequence[str] = ()) -> Config:
    """The config the run trained with (from the checkpoint) with the overrides applied."""
    return config_with_overrides(load_checkpoint(info)["config"], overrides)


def build_model(config: Config, state: dict[str, Any], device: Any = "cpu", *, raw: bool = False) -> "nn.Module":
    """The config's model with the checkpoint state's weights (its weight average if it holds one and not `raw`:
    hpctrain.run.averaging.weights_of), in eval mode, on `device`."""
    from torch import nn

    from hpctrain.components import build

    model = build("model", config.model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {type(model).__name__} is not a torch.nn.Module")
    try:
        model.load_state_dict(weights_of(state, raw=raw))
    except RuntimeError as error:
        raise ConfigError(f"model: the checkpoint's weights do not fit the model the config builds "
                          f"({str(error).splitlines()[0]}); was model.* overridden?") from None
    return model.to(device).eval()


@dataclass
class Run:
    """A run directory opened for use: its config, its checkpoints, the chosen one, and (built on first use) its
    components."""

    run_dir: Path
    config: Config
    checkpoint: CheckpointInfo  # the chosen one
    # The chosen checkpoint's state (verified): model weights, optimizer state, train_state, config.
    state: dict[str, Any]
    checkpoints: list[CheckpointInfo] = field(default_factory=list)  # every complete one, newest first
    raw_weights: bool = False  # take the raw weights even where the checkpoint holds a weight average

    @cached_property
    def components(self) -> "Components":
        """The datasets, loss, metrics, transforms and (untrained) model the config builds; needs the data files."""
        from hpctrain.components import build_components

        return build_components(self.config)

    def model(self, device: Any = "cpu") -> "nn.Module":
        """The trained model (the chosen checkpoint's weights), in eval mode on `device`."""
        return build_model(self.config, self.state, device, raw=self.raw_weights)

    @property
    def weights(self) -> str:
        """Which weights `model()` loads: 'raw', or the kind of the checkpoint's weight average ('ema', 'swa')."""
        return weights_kind(self.state, raw=self.raw_weights)

    @property
    def model_sha256(self) -> str:
        from hpctrain.run.checkpoint import state_dict_digest

        return state_dict_digest(weights_of(self.state, raw=self.raw_weights))


def load_run(run_dir: str | Path, *, checkpoint: str | int = "best", overrides: Sequence[str] = (),
             raw_weights: bool = False) -> Run:
    """Open a run directory: `run.config` (with `overrides`), `run.checkpoints`, `run.checkpoint` (the one
    `checkpoint` names: best, latest or a step), `run.model()` (the weight average where the run keeps one, unless
    `raw_weights`), `run.components`."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory")
    info = choose_checkpoint(run_dir, checkpoint)
    state = load_checkpoint(info)
    return Run(run_dir=run_dir, config=config_with_overrides(state["config"], overrides), checkpoint=info,
               state=state, checkpoints=CheckpointManager(run_dir, keep_last=2).complete(), raw_weights=raw_weights)


def load_model(run_dir: str | Path, checkpoint: str | int = "best", device: "str | torch.device" = "cpu", *,
               overrides: Sequence[str] = (), raw_weights: bool = False) -> "nn.Module":
    """The run's model (the user's own class, rebuilt from the run's config) with the weights of `checkpoint`
    (best, latest or a step), verified, in eval mode, on `device`: the weight average where the run keeps one
    (optim.weight_averaging), the raw weights with `raw_weights=True`."""
    return load_run(run_dir, checkpoint=checkpoint, overrides=overrides, raw_weights=raw_weights).model(device)
