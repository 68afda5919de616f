"""Building one object from a `_target_` config node, with any error reported as one ConfigError that names the
node's key. The one primitive under the composition root (hpctrain.components) and the optimizers and schedules
(hpctrain.optim), which both import it: neither imports the other for it.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate

from hpctrain.config import ConfigError


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if "\n" in text else text


def root_cause(error: BaseException) -> BaseException:
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


def build(key: str, node: Any, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(node, *args, **kwargs)`; any error becomes one ConfigError naming `key`.

    A TypeError (raised where the user's code meets an argument it did not expect) also names the node's
    arguments whose type is not that of their parameter's default or annotation (a string where a number is
    expected: `model.hidden=abc`), else its string arguments; and a function called without the arguments it
    needs is told about `_partial_: true`."""
    try:
        return instantiate(node, *args, **kwargs)
    except Exception as error:  # a user's constructor may raise anything: report it with the key, no traceback
        cause = root_cause(error)
        message = first_line(cause)
        if not isinstance(cause, (ValueError, TypeError, KeyError, OSError, ConfigError)):
            message = f"{type(cause).__name__}: {message}"
        if isinstance(cause, TypeError) and isinstance(node, Mapping) and isinstance(node.get("_target_"), str):
            try:
                target = get_object(node["_target_"])
                parameters = inspect.signature(target).parameters
            except Exception:  # no signature to compare with (a builtin): the message as it is
                target, parameters = None, {}
            target_name = node["_target_"].rpartition(".")[2]
            arguments = {name: value for name, value in node.items() if not str(name).startswith("_")}
            types = {"int": int, "float": float, "bool": bool, "str": str}
            wrong = []
            for name, value in arguments.items():
                parameter = parameters.get(name)
                if parameter is None or value is None:
                    continue
                hint = parameter.annotation if parameter.default in (inspect.Parameter.empty, None) \
                    else type(parameter.default)
                expected = types.get(getattr(hint, "__name__", hint))  # a type, or a postponed annotation's name
                if expected is not None and not isinstance(value, expected) and not (
                        expected is float and isinstance(value, int)):
                    wrong.append(f"{key}.{name}={value!r}: a {type(value).__name__} where {target_name} expects "
                                 f"{expected.__name__}")
            strings = [f"{key}.{name}={value!r}" for name, value in arguments.items() if isinstance(value, str)]
            if wrong:
                message += f" ({'; '.join(wrong)})"
            elif "'str'" in message and strings:
                message += f" (string arguments: {', '.join(strings)})"
            if ("required positional argument" in message and target is not None and not inspect.isclass(target)
                    and not node.get("_partial_", False)):
                message += (f"; {target_name} is a function: add `_partial_: true` to {key}, so that it is called "
                            f"later with its own arguments (e.g. outputs, batch), not now")
        raise ConfigError(f"{key}: {message}") from None
