"""A study's search space: Hydra's Optuna-sweeper expressions (interval, tag(log, ...), int(...), choice, range)
turned into Optuna distributions, and a trial's parameter values turned back into `key=value` overrides.

The expressions are parsed by Hydra's own override parser, so they mean exactly what they mean for Hydra's
Optuna sweeper (hydra_plugins.hydra_optuna_sweeper), which maps them the same way.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException

from hpctrain.config import ConfigError


def flatten(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested keys as dotted ones: {optim: {lr: ...}} -> {optim.lr: ...}."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line's plain overrides, and its sweep overrides (`key=interval(...)`, `key=a,b`) as search
    space entries, like Hydra's Optuna sweeper takes them."""
    parser = OverridesParser.create()
    plain: list[str] = []
    sweeps: dict[str, str] = {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as error:
            shown = "tune.storage=<the URL>" if text.startswith("tune.storage=") else text  # may hold a password
            raise ConfigError(f"{shown}: {str(error).splitlines()[0]}; quote a value holding ?, = or spaces: "
                              f"'key=\"...\"'") from None
        if override.is_sweep_override():
            sweeps[override.get_key_element()] = text.split("=", 1)[1]
        else:
            plain.append(text)
    return plain, sweeps


def distribution(key: str, expression: Any) -> Any:
    """The Optuna distribution of one search space entry; a ConfigError naming tune.search_space.<key>."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"tune.search_space.{key}"
    try:
        value = OverridesParser.create().parse_override(f"{key}={expression}").value()
    except HydraException as error:
        raise ConfigError(f"{where}={expression}: not an expression Hydra can parse "
                          f"({str(error).splitlines()[0]})") from None
    try:
        if isinstance(value, ChoiceSweep):
            if not value.list:
                raise ValueError("choice() needs at least one value")
            return CategoricalDistribution(list(value.list))
        if isinstance(value, IntervalSweep):
            log = "log" in value.tags
            start, end = value.start, value.end
            if isinstance(start, int) and isinstance(end, int):
                return IntDistribution(start, end, log=log)
            return FloatDistribution(float(start), float(end), log=log)
        if isinstance(value, RangeSweep):
            start, stop, step = value.start, value.stop, value.step
            if all(isinstance(v, int) for v in (start, stop, step)):
                return IntDistribution(start, stop - 1, step=step)  # range's stop is exclusive
            last = start + step * (math.ceil((stop - start) / step) - 1)
            return FloatDistribution(float(start), float(last), step=float(step))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}={expression}: {error}") from None
    raise ConfigError(f"{where}={expression}: not a search space expression; use interval(a, b), "
                      f"tag(log, interval(a, b)), int(interval(a, b)), choice(a, b, ...) or range(a, b, step=s)")


def distributions(space: Mapping[str, Any]) -> dict[str, Any]:
    if not space:
        raise ConfigError("tune.search_space is empty: give at least one key, e.g. "
                          "optim.lr='tag(log, interval(1e-4, 1e-2))'")
    return {key: distribution(key, expression) for key, expression in flatten(space).items()}


def override_value(value: Any) -> str:
    """A parameter value as Hydra reads it back (floats unrounded, strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def trial_overrides(params: Mapping[str, Any]) -> list[str]:
    return [f"{key}={override_value(value)}" for key, value in sorted(params.items())]


def representative(distribution: Any) -> Any:
    """A value of the distribution, to compose and check a config with before anything runs."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low
