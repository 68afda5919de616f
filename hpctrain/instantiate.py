"""Building one object from a `_target_` config node, with any error reported as one ConfigError that names the
node's key. The one primitive under the composition root (hpctrain.components) and the optimizers and schedules
(hpctrain.optim), which both import it: neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from hpctrain.config import ConfigError


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if "\n" in text else text


def root_cause(error: BaseException) -> BaseException:
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def build(key: str, node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, *args, **kwargs)`; any error becomes one ConfigError naming `key`."""
    try:
        return instantiate(node, *args, **kwargs)
    except Exception as error:  # a user's constructor may raise anything: report it with the key, no traceback
        cause = root_cause(error)
        message = first_line(cause)
        if not isinstance(cause, (ValueError, TypeError, KeyError, OSError, ConfigError)):
            message = f"{type(cause).__name__}: {message}"
        raise ConfigError(f"{key}: {message}") from None
