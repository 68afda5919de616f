"""What the adapters of a tracker's private files share (wandb_offline_log, comet_offline_archive): the version range
each was tested with, and the one loud warning when the installed version is outside it or the files do not parse.

A private format can change in any release without notice, and nothing would fail: a reader of a changed format
would just see fewer or no steps, and a resumed run would log steps twice or leave them out. So an adapter reads
only under the versions its extra pins (pyproject.toml; tests/test_loggers.py checks both say the same range), and
otherwise says so once (logging.WARNING and warnings.warn), naming the installed version, the tested range and the
guarantee lost, and its caller falls back to what its docstring defines.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Messages already given in this process: one warning per tracker and problem, not one per read.
_warned: set[str] = set()


class TrackerFormatWarning(UserWarning):
    """A tracker's private files are read under an untested version or no longer parse: a guarantee is lost."""


class FormatChanged(Exception):
    """The files do not have the shape the adapter was tested with (or are corrupt)."""


@dataclass(frozen=True)
class PinnedFormat:
    package: str  # the distribution's name, as pip and importlib.metadata know it
    lowest: str   # the tested range: lowest <= installed < below (release numbers, e.g. "0.17", "0.32")
    below: str
    extra: str    # the extra of pyproject.toml that pins the same range
    tracker: str  # the tracker and mode, e.g. "W&B offline"
    reader: str   # what is read, e.g. "W&B's offline transaction log (wandb/offline-run-*/run-<id>.wandb)"
    lost: str     # the guarantee lost and what hpctrain does instead

    @property
    def tested(self) -> str:
        return f">={self.lowest},<{self.below}"

    def installed(self) -> str:
        try:
            return version(self.package)
        except PackageNotFoundError:
            return "(not installed)"

    def supported(self) -> bool:
        """True if the installed version is in the tested range; otherwise the warning, and False."""
        installed = self.installed()
        if release(self.lowest) <= release(installed) < release(self.below):
            return True
        self.warn(f"{self.package} {installed} is outside the versions this reading was tested with "
                  f"({self.package}{self.tested})",
                  f"To keep it, install {self.package}{self.tested} (pip install 'hpctrain[{self.extra}]').")
        return False

    def read(self, reader: Callable[..., T], *args: Any) -> T | None:
        """`reader(*args)`, or None (after the one warning) under an untested version or when the files do not
        parse: what each adapter's callers use."""
        if not self.supported():
            return None
        try:
            return reader(*args)
        except FormatChanged as error:
            self.unreadable(str(error))
            return None

    def unreadable(self, reason: str) -> None:
        """The warning for files that do not parse under the installed (tested) version."""
        self.warn(f"they do not parse under {self.package} {self.installed()} (tested: {self.package}{self.tested}): "
                  f"{reason}", "The file was damaged, or the format changed within the tested range (report it).")

    def warn(self, problem: str, advice: str) -> None:
        message = (f"{self.tracker}: hpctrain reads {self.reader} to log each step once across kills and requeues, "
                   f"but {problem}. Guarantee lost: {self.lost}. {advice}")
        if message in _warned:
            return
        _warned.add(message)
        log.warning("%s", message)
        warnings.warn(message, TrackerFormatWarning, stacklevel=3)


def release(text: str) -> tuple[int, ...]:
    """The release numbers a version starts with: "0.31.0rc1" -> (0, 31, 0); () for none (sorts below all)."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in match.group().split(".")) if match else ()
